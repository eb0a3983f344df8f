package sink

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Fast-ingest batches (Config.Publish fast; nats-server 2.14+, stream allow_batched).
//
// The batch's state travels in each message's reply subject,
// <inbox><batch id>.<ack every>.fail.<batch sequence>.<operation>.$FI, and the server answers
// on it: with a flow ack {"type":"ack","seq":N} once the batch's messages 1..N are stored
// (every <ack every> messages, which the server may lower while other fast batches are open
// on the stream), with {"type":"gap"} when a batch sequence is missing (a message lost on a
// cut connection) and {"type":"err","seq":N} when it refused message N, and after either of
// those or an end-of-batch commit with a PubAck {"stream":..,"seq":..,"batch":..,"count":C}:
// messages 1..C are stored, none after them. Gap mode "fail": nothing after a missing or
// refused message is stored, so the batch sequence is the chain inside a batch. A message the
// stream already holds (Nats-Msg-Id in the duplicate window) is skipped and the batch goes
// on (flow acks count it), also as a batch's first message.
//
// The sink keeps one batch open while events flow. The newest event is held back until the
// next one comes or fastLinger passed; then it goes out as the batch's commit, whose PubAck
// confirms the batch's tail without waiting for the next flow ack, and the next event starts a
// new batch. (An end-of-batch commit without a message would do the same without the wait,
// but it is a message on an event subject that core NATS subscribers of the stream's subjects
// receive.) A failure ends the batch too. Every batch's
// first message carries Nats-Expected-Last-Sequence (the sequence chain): a batch that would
// be stored after a part of the previous one that was not is refused whole. An event is
// confirmed only once a flow ack or PubAck covers it.

// Fast batch operations (the last token before .$FI).
const (
	fastOpStart     = 0
	fastOpAppend    = 1
	fastOpCommit    = 2
	fastOpCommitEOB = 3 // an end-of-batch commit without a message (not used by the sink)
)

// fastLinger: the newest event, held back this long without a next one, is sent as its
// batch's commit, so the batch's tail is confirmed without waiting for the next flow ack.
const fastLinger = 200 * time.Microsecond

// MaxFastAckEvery is the most messages the server lets go between flow acks (nats-server
// v2.15.2 caps the client's value at 500).
const MaxFastAckEvery = 500

// JetStream error codes of fast batches.
const (
	jsErrCodeBatchDisabled    jetstream.ErrorCode = 10205 // batch publish is disabled
	jsErrCodeBatchUnknownID   jetstream.ErrorCode = 10208 // batch publish ID unknown
	jsErrCodeBatchTooManyOpen jetstream.ErrorCode = 10211 // batch publish too many inflight
)

// errFastBatchEnded: the server ended the batch before this event (a gap, a refused event
// before it, or a commit); it is not stored and is re-published in a new batch.
var errFastBatchEnded = errors.New("fast batch ended before this event")

// fastAckEvery is the flow ack interval asked of the server: a quarter of the window, so that
// acks come while the window still has room, at most MaxFastAckEvery.
func fastAckEvery(window int) int { return max(1, min(MaxFastAckEvery, window/4)) }

// fastSend publishes the message of e (headers h) as the next message of the open fast batch,
// or as the first of a new one; commit: as the batch's last (its PubAck comes once every
// message of the batch is stored); alone: as a batch of its own (the probe). p.mu is held.
func (p *Publisher) fastSend(e *entry, h nats.Header, commit, alone bool) error {
	delete(h, jetstream.ExpectedLastMsgIDHeader)
	op := fastOpAppend
	if !p.fastOpen || alone {
		p.fastN++
		p.fastSeq = 0
		p.fastID = p.fastPrefix + strconv.FormatUint(p.fastN, 10)
		p.fastOpen = true
		op = fastOpStart
		// The chain's expectation and Nats-Expected-Stream (set by send) stay on a batch's
		// first message only: the batch lives in the stream that took its first message (a
		// later message another stream took would find no batch there and be refused).
	} else {
		delete(h, jetstream.ExpectedLastSeqHeader)
		delete(h, jetstream.ExpectedStreamHeader)
	}
	p.fastSeq++
	if commit || alone {
		op, p.fastOpen = fastOpCommit, false
	}
	e.fb, e.fseq = p.fastN, p.fastSeq
	return p.sendTo(e, h, p.fastReply(p.fastSeq, op))
}

// fastReply builds the reply subject of the open batch's message seq with operation op in
// p.replyBuf.
func (p *Publisher) fastReply(seq uint64, op int) []byte {
	b := append(p.replyBuf[:0], p.inbox...)
	b = append(b, p.fastID...)
	b = append(b, '.')
	b = strconv.AppendInt(b, int64(p.fastFlow), 10)
	b = append(b, ".fail."...)
	b = strconv.AppendUint(b, seq, 10)
	b = append(b, '.')
	b = strconv.AppendInt(b, int64(op), 10)
	b = append(b, ".$FI"...)
	p.replyBuf = b
	return b
}

// fastEnqueue sends the event held back (if any) as the next message of the batch and holds
// e back in its place: the newest event waits until the next one comes (and is then sent in
// the batch) or fastLinger passed (and Run sends it as the batch's commit). An event that
// finds fewer than fastFewInFlight others unconfirmed is not held: it goes out at once as its
// batch's commit. p.mu is held.
func (p *Publisher) fastEnqueue(e *entry) {
	if h := p.fastHeld; h != nil {
		p.fastHeld = nil
		p.send(h)
	}
	if p.recovering {
		// The send failed or is the probe: Run sends e in order.
		if e.failed == nil {
			e.failed = p.startErr
		}
		return
	}
	if p.fastFew() {
		// Hardly anything is in flight: events come one or a few at a time (at a trickle each
		// one finds the window empty), and holding e back for a next one would only delay it.
		// It goes out now as its batch's commit, whose PubAck confirms it as a plain
		// publish's would.
		p.fastSendCommit(e)
		return
	}
	p.fastHeld, p.fastHeldAt = e, time.Now()
}

// fastLingerEnd is when the held event is sent as its batch's commit; ok false: none is held,
// or flow acks are sure to come first (fastDefer).
func (p *Publisher) fastLingerEnd() (at time.Time, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.fastDue(), p.fastHeld != nil && !p.fastDefer()
}

// fastDue is when the held event goes out: fastLinger after it was held, or at once when
// fewer than fastFewInFlight events before it are unconfirmed (as fastEnqueue sends an event
// that finds so: waiting for a next event only delays this one). p.mu is held.
func (p *Publisher) fastDue() time.Time {
	if p.fastFew() {
		return p.fastHeldAt
	}
	return p.fastHeldAt.Add(fastLinger)
}

// fastFewInFlight: an event with fewer than this many others unconfirmed before it is not
// held back for a next one. One (only an empty window) held back about 6 % of the events at
// 1,000 events/s with Postgres' fsync on, where the walsender hands over the transactions of
// one WAL flush together: each waited for its predecessor's PubAck or the linger, and fast
// mode's p99 was 1.7-2 × the bare pipe's (single's 1.2-1.4 ×). Under load hundreds are in
// flight and events keep batching.
const fastFewInFlight = 4

// fastFew reports whether fewer than fastFewInFlight events are unconfirmed before the newest
// (the held one, or the one being enqueued, is the last of p.q). p.mu is held.
func (p *Publisher) fastFew() bool { return len(p.q) <= fastFewInFlight }

// fastDefer reports whether the held event's commit waits for flow acks: with two ack
// intervals or more in flight the server acks at least one more interval (the publisher is
// then waiting for room in the window, not idle), and ending the batch there would cost a
// new batch for nothing. With fewer, no ack may come (the byte bound can fill the window
// with fewer events than an ack interval), and the commit goes after fastLinger. p.mu is
// held.
func (p *Publisher) fastDefer() bool { return len(p.sem) >= 2*p.fastFlow }

// fastSendCommit sends e as its batch's commit. p.mu is held.
func (p *Publisher) fastSendCommit(e *entry) {
	p.fastCommitNext = true
	p.send(e)
	p.fastCommitNext = false
}

// fastFlush sends the held event as its batch's commit once it is due (fastDue): nothing more
// came to send after it.
func (p *Publisher) fastFlush(now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if h := p.fastHeld; h != nil && !p.paused && !p.recovering && !p.fastDefer() && !now.Before(p.fastDue()) {
		p.fastHeld = nil
		p.fastSendCommit(h)
	}
}

// fastArmLinger arms p.linger for when the held event is due, and sends one due already at
// once. armed: an event is held and p.linger fires when it is due. Run's goroutine.
func (p *Publisher) fastArmLinger() (armed bool) {
	at, ok := p.fastLingerEnd()
	if !ok {
		return false
	}
	if now := time.Now(); !now.Before(at) {
		p.fastFlush(now)
		return false
	}
	p.linger.arm(at)
	return true
}

// fastWaitHeld waits, with only the held event in the window to send, until it is due (and
// sends it), the window changes, a reply or a disconnect comes, or ctx ends.
func (p *Publisher) fastWaitHeld(ctx context.Context, status <-chan nats.Status) {
	if !p.fastArmLinger() {
		return
	}
	select {
	case <-p.linger.C:
		p.fastFlush(time.Now())
	case <-p.notify:
	case m := <-p.replies:
		p.reply(m)
	case <-status:
		p.disconnected()
	case <-ctx.Done():
	}
}

// fastHolds reports whether e is the event held back, to be sent once due (not while the chain
// is being recovered or the stream handed over: Run's recovery or Resume sends it then).
func (p *Publisher) fastHolds(e *entry) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.fastHeld == e && !p.recovering && !p.paused
}

// fastResponse is any of the server's answers on a fast batch reply subject.
type fastResponse struct {
	Type    string              `json:"type"`
	Seq     uint64              `json:"seq"`
	LastSeq uint64              `json:"last_seq"`
	Count   uint64              `json:"count"`
	Stream  string              `json:"stream"`
	Error   *jetstream.APIError `json:"error"`
	Dup     bool                `json:"duplicate"`
}

// parseFastSubject returns the batch number and batch sequence of one of p's fast batch reply
// subjects.
func (p *Publisher) parseFastSubject(subject string) (batch, seq uint64, ok bool) {
	rest, found := strings.CutPrefix(subject, p.inbox+p.fastPrefix)
	if !found {
		return 0, 0, false
	}
	parts := strings.Split(rest, ".")
	// <n>.<flow>.fail.<seq>.<op>.$FI
	if len(parts) != 6 {
		return 0, 0, false
	}
	batch, err1 := strconv.ParseUint(parts[0], 10, 64)
	seq, err2 := strconv.ParseUint(parts[3], 10, 64)
	return batch, seq, err1 == nil && err2 == nil
}

// fastReplyMsg handles the server's answer m on a fast batch. Run's goroutine.
func (p *Publisher) fastReplyMsg(m *nats.Msg) {
	batch, seq, ok := p.parseFastSubject(m.Subject)
	if !ok {
		return
	}
	if len(m.Data) == 0 && m.Header.Get("Status") == "503" {
		// No responders: no stream takes the subject (yet), or JetStream is not available.
		p.fastOutcome(batch, seq, seq, jetstream.ErrNoStreamResponse)
		p.fastOutcome(batch, seq+1, ^uint64(0), errFastBatchEnded)
		return
	}
	var r fastResponse
	if err := json.Unmarshal(m.Data, &r); err != nil {
		p.log.Warn().Err(err).Str("reply", string(m.Data)).Msg("unreadable answer to a fast batch publish; its events are re-published when their acks time out")
		return
	}
	switch {
	case r.Type == "ack":
		p.fastStored(batch, r.Seq, false, p.streamBytes) // a flow ack names no stream
	case r.Type == "gap":
		// The PubAck that ends the batch follows and says what is stored.
		p.log.Debug().Uint64("batch", batch).Uint64("expected", r.LastSeq).Uint64("got", r.Seq).Msg("fast batch gap: a message was lost; the batch ends")
	case r.Type == "err":
		// The PubAck that ends the batch follows (up to the event before this one).
		p.fastOutcome(batch, r.Seq, r.Seq, r.Error)
	case r.Error != nil:
		// A refusal as a plain publish's: the batch's first message (the batch is gone), or a
		// message of a batch the server does not know (anymore).
		p.fastOutcome(batch, seq, seq, r.Error)
		p.fastOutcome(batch, seq+1, ^uint64(0), errFastBatchEnded)
	case r.Stream != "":
		// The PubAck: the batch ended with messages 1..Count stored.
		p.fastStored(batch, r.Count, r.Dup, []byte(r.Stream))
		p.fastOutcome(batch, r.Count+1, ^uint64(0), errFastBatchEnded)
	}
}

// fastStored resolves the sends of batch's messages 1..upto still awaiting their outcome as
// stored in stream; dup: the last of them was a duplicate.
func (p *Publisher) fastStored(batch, upto uint64, dup bool, stream []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, e := range p.q {
		if e.fb != batch || e.token == 0 || e.resolved {
			continue
		}
		if e.fseq > upto {
			break
		}
		delete(p.pending, e.token)
		e.resolved, e.ackErr, e.ackStream, e.ackDup = true, nil, stream, dup && e.fseq == upto
		if e.traced != nil {
			e.traced(0, e.ackDup) // flow acks carry no stream sequence
			e.traced = nil
		}
	}
}

// fastOutcome fails the sends of batch's messages from..to still awaiting their outcome with
// err.
func (p *Publisher) fastOutcome(batch, from, to uint64, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, e := range p.q {
		if e.fb != batch || e.token == 0 || e.resolved || e.fseq < from {
			continue
		}
		if e.fseq > to {
			break
		}
		delete(p.pending, e.token)
		e.resolved, e.ackErr = true, err
	}
	if batch == p.fastN {
		p.fastOpen = false // the server ended it: the next send starts a new one
	}
}
