package sink

import (
	"fmt"
	"strconv"

	"github.com/nats-io/nats.go"
)

// EndTx ends the transaction whose events were published since the last EndTx: in atomic mode
// they go out as one batch (the last part of it when it was split); otherwise it does nothing.
// Called by the publishing goroutine.
func (p *Publisher) EndTx() { p.sealBatch() }

// sealIfAlone is called when the window is full: when all it holds is the open batch, no ack
// would ever free room, so the batch goes out as it is (the transaction is split). Otherwise
// acks of earlier batches will free room and the transaction may still fit whole.
func (p *Publisher) sealIfAlone() {
	p.mu.Lock()
	alone := len(p.open) > 0 && len(p.open) == len(p.q)
	p.mu.Unlock()
	if alone {
		p.sealBatch()
	}
}

// sealBatch closes the open batch (atomic mode): its entries become one batch acknowledged by
// its last one, and are sent unless the chain is being recovered (Run then sends them).
func (p *Publisher) sealBatch() {
	p.mu.Lock()
	if len(p.open) == 0 {
		p.mu.Unlock()
		return
	}
	commit := p.open[len(p.open)-1]
	if len(p.open) == 1 {
		// One event is stored whole anyway: it goes out on its own, which spares the server
		// a batch (on a file stream each batch is staged in a store of its own: a 1-event
		// batch costs it several times a plain publish).
		commit = nil
	}
	for _, e := range p.open {
		e.unsealed, e.batch = false, commit
	}
	for _, e := range p.open {
		if p.paused {
			continue // Run sends it after Resume
		}
		if p.recovering {
			if e.failed == nil {
				e.failed = p.startErr
			}
			continue
		}
		p.send(e)
	}
	clear(p.open)
	p.open = p.open[:0]
	p.mu.Unlock()
	p.wake()
}

// Atomic batch headers (nats-server 2.12+).
const (
	headerBatchID     = "Nats-Batch-Id"
	headerBatchSeq    = "Nats-Batch-Sequence"
	headerBatchCommit = "Nats-Batch-Commit"
)

var batchCommitValue = []string{"1"}

// batchHeaders sets the atomic batch headers of e, the next message of its batch, on h. The
// first message sent of a batch starts a new batch id, so a batch re-sent after a failure (or
// re-sent from a later entry, its first ones found stored) is numbered from 1 again. It
// returns e's number in the batch. p.mu is held.
func (p *Publisher) batchHeaders(e *entry, h nats.Header) int {
	if p.sendingBatch != e.batch {
		p.sendingBatch, p.bseq = e.batch, 0
		p.batchN++
		p.batchID = []string{p.batchPrefix + strconv.FormatUint(p.batchN, 10)}
	}
	p.bseq++
	h[headerBatchID] = p.batchID
	h[headerBatchSeq] = []string{strconv.Itoa(p.bseq)}
	if e == e.batch {
		h[headerBatchCommit] = batchCommitValue
		p.sendingBatch = nil
	} else {
		delete(h, headerBatchCommit)
	}
	return p.bseq
}

// confirmBatch confirms every entry of the batch whose commit entry is c (stored: its ack
// came) and pops the stored entries off the window.
func (p *Publisher) confirmBatch(c *entry) {
	p.mu.Lock()
	var stored []*entry
	for _, e := range p.q {
		if e.batch == c && !e.done {
			stored = append(stored, e)
		}
		if e == c {
			break
		}
	}
	p.mu.Unlock()
	for _, e := range stored {
		e.done = true
		p.confirm(e.ticket)
	}
	p.popDone()
}

// batchFailed handles the refusal of the atomic batch whose commit entry is c. Its ack does
// not say which event the stream refused, so a batch refused for what an event is (reason) is
// published again event by event, where that event is found and stopped at or dead-lettered
// as in single mode; so is a batch refused as incomplete three times (the stream's pre-checks
// refuse a message inside a batch without a reply, and the batch then has a gap). Other
// refusals are retried as a batch.
func (p *Publisher) batchFailed(c *entry, err error, reason string) error {
	switch code := apiErrorCode(err); {
	case code == jsErrCodeAtomicDisabled:
		return fmt.Errorf("stream %s refuses atomic batches (%v): set allow_atomic: true in its config (nats-server 2.12+), or set Config.Sink.Publish to single", p.cfg.Stream, err)
	case code == jsErrCodeBatchIncomplete:
		if c.incomplete++; c.incomplete >= 3 {
			reason = fmt.Sprintf("refused as incomplete %d times: %v", c.incomplete, err)
		}
	}
	if reason != "" {
		p.mu.Lock()
		n := 0
		for _, e := range p.q {
			if e.batch == c {
				e.batch = nil
				n++
			}
		}
		p.mu.Unlock()
		p.log.Warn().Err(err).Str("last_event_id", c.id).Stringer("position", c.pos).Int("events", n).Str("reason", reason).
			Msg("the stream refused an atomic batch for one of its events: publishing its events one by one, which finds the event (stopped at or dead-lettered as Config.OnPoison says); this part of the transaction is not stored atomically")
	}
	c.failed = err
	return nil
}
