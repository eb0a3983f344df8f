package sink

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// listen sets up the reply subscription and the connection status listener, once. j.mu is
// held.
func (j *Publisher) listen() error {
	if j.nc == nil {
		return nats.ErrInvalidConnection
	}
	if j.status == nil {
		// A reconnect loses the acks in flight (and the server may never have seen the
		// messages): they fail at once, as with PublishMsgAsync, instead of timing out.
		j.status = j.nc.StatusChanged(nats.RECONNECTING, nats.CLOSED)
	}
	if j.connected == nil {
		j.connected = j.nc.StatusChanged(nats.CONNECTED)
	}
	if j.sub != nil {
		return nil
	}
	inbox := j.nc.NewInbox() + "."
	sub, err := j.nc.ChanSubscribe(inbox+"*", j.replies)
	if err != nil {
		return fmt.Errorf("subscribe to the publish ack subject: %w", err)
	}
	j.sub, j.inbox = sub, inbox
	return nil
}

// stopListening removes the reply subscription and the status listener (Run returns; a later
// send sets them up again).
func (j *Publisher) stopListening() {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.sub != nil {
		_ = j.sub.Unsubscribe()
		j.sub = nil
	}
	if j.status != nil {
		j.nc.RemoveStatusListener(j.status)
		j.status = nil
	}
	if j.connected != nil {
		j.nc.RemoveStatusListener(j.connected)
		j.connected = nil
	}
}

// Run resolves acks in publish order, confirms stored events and re-publishes after failures.
// It returns when ctx ends (events still in flight stay unconfirmed: Postgres re-sends them) or
// on an error that retrying cannot fix.
func (j *Publisher) Run(ctx context.Context) error {
	defer j.stopListening()
	j.mu.Lock()
	_ = j.listen() // a failure shows at the next send, which retries it
	status := j.status
	j.mu.Unlock()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	j.timerAt = time.Time{}
	defer timer.Stop()

	backoff := newBackoff(100*time.Millisecond, 10*time.Second)
	for {
		if ctx.Err() != nil {
			return nil // the recovery path below does not wait on ctx when nothing is in flight
		}
		j.mu.Lock()
		var e *entry
		if len(j.q) > 0 && !j.q[0].unsealed {
			e = j.q[0]
			if e.batch != nil {
				e = e.batch // a batch's commit is acknowledged for all of it
			}
		}
		j.mu.Unlock()
		if e == nil {
			select {
			case <-j.notify:
			case m := <-j.replies:
				j.reply(m) // late: nothing is waiting for it
			case <-status:
				j.disconnected()
			case <-ctx.Done():
				return nil
			}
			continue
		}
		if e.token == 0 {
			if err := j.recover(ctx, backoff, timer, status); err != nil {
				return err
			}
			continue
		}
		if !j.await(ctx, e, timer, status) {
			return nil
		}
		if e.ackErr == nil {
			if err := j.checkAck(e); err != nil {
				return err
			}
			if e.batch != nil {
				j.confirmBatch(e)
			} else {
				j.pop(e)
			}
			backoff.reset()
			continue
		}
		if err := j.failed(e, e.ackErr); err != nil {
			return err
		}
		// The send's one outcome is consumed: recover must not wait on it again.
		e.token = 0
		if err := j.recover(ctx, backoff, timer, status); err != nil {
			return err
		}
	}
}

// await reads replies until e's send has an outcome (an ack, an error reply, a reconnect, or
// no reply within AckTimeout of the send); false when ctx ended first. One timer serves the
// whole window: it is armed for the awaited entry's deadline unless it already fires earlier
// (sends are awaited in send order, so deadlines only grow) and re-armed when it fires.
func (j *Publisher) await(ctx context.Context, e *entry, timer *time.Timer, status <-chan nats.Status) bool {
	for !e.resolved {
		deadline := e.sent.Add(j.cfg.AckTimeout)
		if j.timerAt.IsZero() || deadline.Before(j.timerAt) {
			timer.Reset(time.Until(deadline))
			j.timerAt = deadline
		}
		select {
		case m := <-j.replies:
			j.reply(m)
			for n := len(j.replies); n > 0; n-- {
				j.reply(<-j.replies)
			}
		case <-status:
			j.disconnected()
		case <-timer.C:
			j.timerAt = time.Time{}
			if !time.Now().Before(deadline) {
				j.resolve(e, jetstream.ErrAsyncPublishTimeout)
			}
		case <-ctx.Done():
			return false
		}
	}
	return true
}

// reply resolves the entry waiting for m (an ack or error reply); a reply nothing waits for
// (its send timed out, or the entry was re-sent under a new token) is dropped.
func (j *Publisher) reply(m *nats.Msg) {
	tok, ok := replyToken(m.Subject)
	if !ok {
		return
	}
	j.mu.Lock()
	e := j.pending[tok]
	delete(j.pending, tok)
	j.mu.Unlock()
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
func (j *Publisher) resolve(e *entry, err error) {
	j.mu.Lock()
	if j.pending[e.token] == e {
		delete(j.pending, e.token)
	}
	j.mu.Unlock()
	if !e.resolved {
		e.resolved, e.ackErr = true, err
	}
}

// disconnected fails every send waiting for an ack: the connection they went out on is gone.
func (j *Publisher) disconnected() {
	j.mu.Lock()
	for tok, e := range j.pending {
		e.resolved, e.ackErr = true, nats.ErrDisconnected
		delete(j.pending, tok)
	}
	j.mu.Unlock()
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

func (j *Publisher) checkAck(e *entry) error {
	if string(e.ackStream) != j.cfg.Stream {
		return fmt.Errorf("event %s was stored in stream %q, not %q: two streams take subject %s; fix the stream subjects", e.id, e.ackStream, j.cfg.Stream, e.msg.Subject)
	}
	n := uint64(1)
	j.mu.Lock()
	if e.batch != nil {
		n = 0
		for _, q := range j.q {
			if q.batch == e && !q.done {
				n++
			}
		}
	}
	j.stats.Published += n
	if e.ackDup {
		j.stats.Duplicates++
	}
	j.mu.Unlock()
	return nil
}

// pop confirms the oldest entry e (stored) and releases its window slot.
func (j *Publisher) pop(e *entry) {
	j.mu.Lock()
	j.q[0] = nil
	j.q = j.q[1:]
	if len(j.q) == 0 {
		j.q = j.q[:0:0]
	}
	j.mu.Unlock()
	if !e.done {
		e.done = true
		j.confirm(e.ticket)
	}
	j.bytes.Add(-e.size)
	<-j.sem
	select {
	case j.freed <- struct{}{}:
	default:
	}
}
