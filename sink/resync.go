package sink

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// startChain reads the stream's replicas (which chain to use) and last sequence (where a
// sequence chain starts) before the first publish. Without an answer the events queue and
// Run's recovery starts the chain (resync). Called once, by the publishing goroutine, while
// nothing is queued.
func (p *Publisher) startChain(ctx context.Context) {
	p.started = true
	var err error
	var info *jetstream.StreamInfo
	if p.js == nil {
		err = nats.ErrInvalidConnection
	} else {
		lctx, cancel := context.WithTimeout(ctx, p.cfg.AckTimeout)
		var s jetstream.Stream
		if s, err = p.js.Stream(lctx, p.cfg.Stream); err == nil {
			info = s.CachedInfo()
		}
		cancel()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if err != nil {
		p.startErr = fmt.Errorf("read the last sequence of stream %s: %w", p.cfg.Stream, err)
		p.stats.Errors++
		return
	}
	// Atomic batches refuse Nats-Expected-Last-Msg-Id, fast batches chain from one batch to
	// the next: they chain on the sequence.
	p.seqChain = info.Config.Replicas > 1 || p.seqChained()
	p.lastSeq, p.recovering = info.State.LastSeq, false
	// A session's first message on a replicated stream goes alone (see Pause).
	p.fenced = p.seqChain
}

// recover restores the chain after a failed publish: wait until every message in flight has
// an outcome, then re-publish, in order, everything not known to be stored.
func (p *Publisher) recover(ctx context.Context, backoff *backoff, timer *time.Timer, status <-chan nats.Status) error {
	p.mu.Lock()
	p.recovering = true
	q := append([]*entry(nil), p.q...)
	p.mu.Unlock()

	first, ok, err := p.settle(ctx, q, timer, status)
	if !ok {
		return err
	}
	p.popDone()
	wait := p.retryDelay(first, backoff, len(q))
	p.mu.Lock()
	connected := p.connected
	p.mu.Unlock()
	select {
	case <-time.After(wait):
	case <-connected:
		// Reconnected (now or while the window resolved): what failed with the old
		// connection may go through the new one.
		backoff.reset()
	case <-ctx.Done():
		return nil
	}
	p.resync(ctx)
	return nil
}

// settle waits until every send in q (the window when recovery began) has an outcome, and
// consumes it: stored events are confirmed, failures classified (failed). It returns the first
// failure; ok is false when ctx ended first (err nil) or on an error retrying cannot fix (err).
func (p *Publisher) settle(ctx context.Context, q []*entry, timer *time.Timer, status <-chan nats.Status) (first error, ok bool, err error) {
	for _, e := range q {
		if e.unsealed {
			break // not sent yet: its batch is still open
		}
		if e.batch != nil && e.batch != e {
			// Inside an atomic batch: its outcome is its commit's.
			if first == nil && e.failed != nil {
				first = e.failed // its send failed (disconnected)
			}
			continue
		}
		if e.token == 0 {
			if refused(e.failed) {
				// nats.go refused to send it: the same message would be refused again.
				if err := p.failed(e, e.failed); err != nil {
					return nil, false, err
				}
			}
			if first == nil {
				first = e.failed
			}
			continue
		}
		if !p.await(ctx, e, timer, status) {
			return nil, false, nil
		}
		if e.ackErr == nil {
			if err := p.checkAck(e); err != nil {
				return nil, false, err
			}
			if e.batch != nil {
				p.confirmBatch(e)
			} else {
				e.done = true
				p.confirm(e.ticket)
			}
		} else {
			if err := p.failed(e, e.ackErr); err != nil {
				return nil, false, err
			}
			if first == nil {
				first = e.ackErr
			}
		}
		e.token = 0
	}
	return first, true, nil
}

// retryDelay counts and logs first, the failure that broke the chain (inFlight events were in
// the window), and returns how long to wait before re-publishing.
func (p *Publisher) retryDelay(first error, backoff *backoff, inFlight int) time.Duration {
	var wait time.Duration
	switch {
	case wrongLastSequence(first) || apiErrorCode(first) == jsErrCodeBatchDuplicate:
		// The broker is up; the stream did not end where the chain expected (a duplicate
		// took no new sequence, or another publisher stored a message): re-chain at once.
		wait = 10 * time.Millisecond
		p.mu.Lock()
		p.stats.Resyncs++
		p.mu.Unlock()
		p.log.Debug().Err(first).Int("in_flight", inFlight).Msg("chain broken; re-publishing from the first event not stored, in order")
	case streamFull(first):
		wait = backoff.next()
		p.mu.Lock()
		p.stats.StreamFull++
		p.mu.Unlock()
		p.log.Error().Err(first).Str("stream", p.cfg.Stream).Int("in_flight", inFlight).Dur("retry_in", wait).
			Msg("the stream is full (a max_bytes, max_msgs or max_msgs_per_subject limit with discard: new): nothing from this event on is stored or confirmed, and Postgres keeps the WAL. The relay retries until space frees: raise the limit (nats stream edit), or let max_age or consumers (work-queue/interest retention) remove messages")
	default:
		wait = backoff.next()
		p.log.Warn().Err(first).Int("in_flight", inFlight).Dur("retry_in", wait).
			Msg("publish failed; re-publishing from the first event not stored, in order")
	}
	return wait
}

// JetStream error codes nats.go names no constant for.
const (
	jsErrCodeWrongLastMsgID       jetstream.ErrorCode = 10070 // wrong last msg ID
	jsErrCodeStoreFailed          jetstream.ErrorCode = 10077 // storing failed ({err}), e.g. a limit with discard: new
	jsErrCodeHeaderExceedsMaximum jetstream.ErrorCode = 10097 // header size exceeds maximum allowed of 64k
	jsErrCodeMessageTTLInvalid    jetstream.ErrorCode = 10165 // invalid per-message TTL
	jsErrCodeMessageTTLDisabled   jetstream.ErrorCode = 10166 // per-message TTL is disabled
	jsErrCodeAtomicDisabled       jetstream.ErrorCode = 10174 // atomic publish is disabled
	jsErrCodeBatchIncomplete      jetstream.ErrorCode = 10176 // atomic publish batch is incomplete
	jsErrCodeBatchDuplicate       jetstream.ErrorCode = 10201 // atomic publish batch contains duplicate message id
)

// apiErrorCode is err's JetStream error code, or 0 when err is no JetStream API error.
func apiErrorCode(err error) jetstream.ErrorCode {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		return apiErr.ErrorCode
	}
	return 0
}

// wrongLastSequence reports whether err is the stream's refusal of the chain's expectation.
func wrongLastSequence(err error) bool {
	switch apiErrorCode(err) {
	case jetstream.JSErrCodeStreamWrongLastSequence, jetstream.JSErrCodeStreamWrongLastSequenceConstant, jsErrCodeWrongLastMsgID:
		return true
	}
	return false
}

// resync starts the chain at the stream's last sequence and sends the queue, in order, from
// the first event the stream does not hold. Nothing may be in flight. It reports false when
// the stream could not be read (the queue stays unsent; call it again later).
//
// The outcome of a failed publish is unknown (a lost ack, a reset connection), and the outage
// may have outlasted the duplicate window: ask the stream how far it got, and do not
// re-publish what it holds.
func (p *Publisher) resync(ctx context.Context) bool {
	lctx, cancel := context.WithTimeout(ctx, p.cfg.AckTimeout)
	last, ok, info, err := lastStored(lctx, p.js, p.cfg)
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			p.log.Warn().Err(err).Msg("cannot read the stream's last stored event; retrying")
		}
		return false
	}
	if ok && last.Seq > p.cfg.SeqFloor {
		p.skipStored(last.Position)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	// Nothing is in flight: a disconnect reported but not read yet (it came while Run waited
	// out its backoff or read the stream) is older than every send below, and must not fail
	// them once they are out on the new connection.
	for drained := false; !drained && p.status != nil; {
		select {
		case <-p.status:
		default:
			drained = true
		}
	}
	p.seqChain = info.Config.Replicas > 1 || p.seqChained()
	p.lastSeq = info.State.LastSeq
	p.lastID = ""
	p.recovering = false
	p.sendingBatch = nil
	p.fastOpen = false // re-published events start a new fast batch
	p.fastHeld = nil   // sent below
	if p.paused {
		return true // Run restarts the chain after Resume
	}
	p.sendQueued()
	return true
}

// sendQueued sends, in order, the window's entries not yet sent in the current chain, until
// a send fails or the chain holds the rest behind a probe. p.mu is held.
func (p *Publisher) sendQueued() {
	for i, e := range p.q {
		if e.unsealed {
			break // its batch is still open: sealBatch sends it
		}
		if e.done {
			// Stored after an entry whose outcome was unknown but which was stored too (it
			// is its predecessor in the chain): keep the chain's view of the stream's tail.
			p.lastID = e.id
			continue
		}
		if e.token != 0 {
			continue // sent in this chain (the probe)
		}
		if p.fast && i == len(p.q)-1 && !p.fenced {
			// The newest event waits for the next one, or goes as the batch's commit.
			p.fastHeld, p.fastHeldAt = e, time.Now()
			break
		}
		if e.sent != (time.Time{}) {
			p.stats.Retries++
		}
		p.send(e)
		if p.recovering {
			break // the broker is still unreachable (Run comes back here), or a probe is out
		}
	}
}

// streamFull reports a refusal by a stream at one of its limits with discard: new.
func streamFull(err error) bool {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) || apiErr.ErrorCode != jsErrCodeStoreFailed {
		return false
	}
	switch apiErr.Description {
	case "maximum bytes exceeded", "maximum messages exceeded", "maximum messages per subject exceeded":
		return true
	}
	return false
}

// skipStored confirms the queued events at or before last, which the stream holds.
func (p *Publisher) skipStored(last Position) {
	p.mu.Lock()
	var stored []*entry
	for _, e := range p.q {
		if !e.pos.AtOrBefore(last) {
			break
		}
		if !e.done {
			stored = append(stored, e)
			p.stats.Skipped++
		}
	}
	p.mu.Unlock()
	for _, e := range stored {
		e.done = true
		p.confirm(e.ticket)
		if e.traced != nil { // stored, with no ack to tell the sequence
			e.traced(0, false)
			e.traced = nil
		}
	}
	p.popDone()
}

// popDone pops the stored (done) entries off the front of the window.
func (p *Publisher) popDone() {
	for {
		p.mu.Lock()
		if len(p.q) == 0 || !p.q[0].done {
			p.mu.Unlock()
			return
		}
		e := p.q[0]
		p.mu.Unlock()
		p.pop(e)
	}
}

type backoff struct {
	min, max, cur time.Duration
}

func newBackoff(min, max time.Duration) *backoff { return &backoff{min: min, max: max} }

func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	} else if b.cur *= 2; b.cur > b.max {
		b.cur = b.max
	}
	return b.cur
}

func (b *backoff) reset() { b.cur = 0 }
