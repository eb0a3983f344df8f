package sink

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// listen sets up the reply subscription and the connection status listener, once. p.mu is
// held.
func (p *Publisher) listen() error {
	if p.nc == nil {
		return nats.ErrInvalidConnection
	}
	if p.status == nil {
		// A reconnect loses the acks in flight (and the server may never have seen the
		// messages): they fail at once, as with PublishMsgAsync, instead of timing out.
		p.status = p.nc.StatusChanged(nats.RECONNECTING, nats.CLOSED)
	}
	if p.connected == nil {
		p.connected = p.nc.StatusChanged(nats.CONNECTED)
	}
	if p.sub != nil {
		return nil
	}
	inbox := p.nc.NewInbox() + "."
	wildcard := "*"
	if p.fast {
		wildcard = ">" // <inbox><batch id>.<ack every>.fail.<batch sequence>.<operation>.$FI
	}
	sub, err := p.nc.ChanSubscribe(inbox+wildcard, p.replies)
	if err != nil {
		return fmt.Errorf("subscribe to the publish ack subject: %w", err)
	}
	p.sub, p.inbox = sub, inbox
	return nil
}

// stopListening removes the reply subscription and the status listener (Run returns; a later
// send sets them up again).
func (p *Publisher) stopListening() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sub != nil {
		_ = p.sub.Unsubscribe()
		p.sub = nil
	}
	if p.status != nil {
		p.nc.RemoveStatusListener(p.status)
		p.status = nil
	}
	if p.connected != nil {
		p.nc.RemoveStatusListener(p.connected)
		p.connected = nil
	}
}

// Run resolves acks in publish order, confirms stored events and re-publishes after failures.
// It returns when ctx ends (events still in flight stay unconfirmed: Postgres re-sends them) or
// on an error that retrying cannot fix.
func (p *Publisher) Run(ctx context.Context) error {
	defer p.stopListening()
	p.mu.Lock()
	_ = p.listen() // a failure shows at the next send, which retries it
	status := p.status
	p.mu.Unlock()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	p.timerAt = time.Time{}
	defer timer.Stop()
	if p.fast {
		lctx, stop := context.WithCancel(ctx)
		defer stop()
		go p.linger.run(lctx)
	}

	backoff := newBackoff(100*time.Millisecond, 10*time.Second)
	for {
		if ctx.Err() != nil {
			return nil // the recovery path below does not wait on ctx when nothing is in flight
		}
		if p.hold(ctx, status) {
			continue
		}
		p.mu.Lock()
		var e *entry
		if len(p.q) > 0 && !p.q[0].unsealed {
			e = p.q[0]
			if e.batch != nil {
				e = e.batch // a batch's commit is acknowledged for all of it
			}
		}
		p.mu.Unlock()
		if e == nil {
			p.idle(ctx, status)
			continue
		}
		if e.token == 0 && p.fast && p.fastHolds(e) {
			p.fastWaitHeld(ctx, status)
			continue
		}
		if e.token == 0 {
			if err := p.recover(ctx, backoff, timer, status); err != nil {
				return err
			}
			continue
		}
		if !p.await(ctx, e, timer, status) {
			return nil
		}
		if e.ackErr == nil {
			if err := p.checkAck(e); err != nil {
				return err
			}
			if e.batch != nil {
				p.confirmBatch(e)
			} else {
				p.pop(e)
			}
			backoff.reset()
			p.unfence(e)
			continue
		}
		if err := p.failed(e, e.ackErr); err != nil {
			return err
		}
		// The send's one outcome is consumed: recover must not wait on it again.
		e.token = 0
		if err := p.recover(ctx, backoff, timer, status); err != nil {
			return err
		}
	}
}

// idle waits, with no send awaiting its outcome, until the window changes, a (late) reply or a
// disconnect comes, which it handles, or ctx ends.
func (p *Publisher) idle(ctx context.Context, status <-chan nats.Status) {
	select {
	case <-p.notify:
	case m := <-p.replies:
		p.reply(m) // late: nothing is waiting for it
	case <-status:
		p.disconnected()
	case <-ctx.Done():
	}
}

// await reads replies until e's send has an outcome (an ack, an error reply, a reconnect, or
// no reply within AckTimeout of the send); false when ctx ended first. One timer serves the
// whole window: it is armed for the awaited entry's deadline unless it already fires earlier
// (sends are awaited in send order, so deadlines only grow) and re-armed when it fires.
func (p *Publisher) await(ctx context.Context, e *entry, timer *time.Timer, status <-chan nats.Status) bool {
	var lingered <-chan struct{} // fast mode: the held event is due
	if p.fast {
		lingered = p.linger.C
	}
	for !e.resolved {
		deadline := e.sent.Add(p.cfg.AckTimeout)
		if p.fast {
			// The held event goes out as its batch's commit once nothing more came.
			p.fastArmLinger()
		}
		if p.timerAt.IsZero() || deadline.Before(p.timerAt) {
			timer.Reset(time.Until(deadline))
			p.timerAt = deadline
		}
		select {
		case m := <-p.replies:
			p.reply(m)
			for n := len(p.replies); n > 0; n-- {
				p.reply(<-p.replies)
			}
		case <-status:
			p.disconnected()
		case <-lingered:
			p.fastFlush(time.Now())
		case <-timer.C:
			p.timerAt = time.Time{}
			if !time.Now().Before(deadline) {
				p.resolve(e, jetstream.ErrAsyncPublishTimeout)
			}
		case <-ctx.Done():
			return false
		}
	}
	return true
}

// reply resolves the entry waiting for m (an ack or error reply); a reply nothing waits for
// (its send timed out, or the entry was re-sent under a new token) is dropped.
func (p *Publisher) reply(m *nats.Msg) {
	if p.fast {
		p.fastReplyMsg(m)
		return
	}
	tok, ok := replyToken(m.Subject)
	if !ok {
		return
	}
	p.mu.Lock()
	e := p.pending[tok]
	delete(p.pending, tok)
	p.mu.Unlock()
	if e == nil {
		return
	}
	e.resolved = true
	if len(m.Data) == 0 && m.Header.Get("Status") == "503" {
		// No responders: no stream takes the subject (yet), or JetStream is not available.
		e.ackErr = jetstream.ErrNoStreamResponse
		return
	}
	e.ackStream, e.ackDup, e.ackErr = parsePubAck(m.Data)
	if e.traced != nil && e.ackErr == nil {
		e.traced(pubAckSeq(m.Data), e.ackDup)
		e.traced = nil
	}
}

// resolve fails e's send with err, unless it already has an outcome.
func (p *Publisher) resolve(e *entry, err error) {
	p.mu.Lock()
	if p.pending[e.token] == e {
		delete(p.pending, e.token)
	}
	p.mu.Unlock()
	if !e.resolved {
		e.resolved, e.ackErr = true, err
	}
}

// disconnected fails every send waiting for an ack: the connection they went out on is gone.
func (p *Publisher) disconnected() {
	p.mu.Lock()
	for tok, e := range p.pending {
		e.resolved, e.ackErr = true, nats.ErrDisconnected
		delete(p.pending, tok)
	}
	p.mu.Unlock()
}

// replyToken returns the number after the last '.' of a reply subject.
func replyToken(subject string) (uint64, bool) {
	i := len(subject)
	for i > 0 && subject[i-1] != '.' {
		i--
	}
	tok, err := strconv.ParseUint(subject[i:], 10, 64)
	return tok, err == nil && tok != 0
}

func (p *Publisher) checkAck(e *entry) error {
	if string(e.ackStream) != p.cfg.Stream {
		return fmt.Errorf("event %s was stored in stream %q, not %q: two streams take subject %s; fix the stream subjects", e.id, e.ackStream, p.cfg.Stream, e.msg.Subject)
	}
	n := uint64(1)
	p.mu.Lock()
	if e.batch != nil {
		n = 0
		for _, q := range p.q {
			if q.batch == e && !q.done {
				n++
			}
		}
	}
	p.stats.Published += n
	if e.ackDup {
		p.stats.Duplicates++
	}
	p.mu.Unlock()
	return nil
}

// pop confirms the oldest entry e (stored) and releases its window slot.
func (p *Publisher) pop(e *entry) {
	p.mu.Lock()
	p.q[0] = nil
	p.q = p.q[1:]
	if len(p.q) == 0 {
		p.q = p.q[:0:0]
	}
	p.mu.Unlock()
	if !e.done {
		e.done = true
		p.confirm(e.ticket)
	}
	p.bytes.Add(-e.size)
	<-p.sem
	select {
	case p.freed <- struct{}{}:
	default:
	}
}
