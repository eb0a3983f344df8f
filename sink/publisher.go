package sink

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/decoder"
)

// Publisher publishes events with a bounded, gap-free in-flight window (see the package doc).
//
// Goroutines: Wait and Publish are called by one goroutine (the replication loop); Run is the
// ack loop in its own goroutine. confirm is called from Run, once per published event, after
// JetStream stored it (or reported it a duplicate of a stored one).
//
// Messages are published with core NATS, each with its own reply subject <inbox>.<token> under
// one wildcard subscription of the sink; JetStream answers there with the publish ack. Run reads
// the replies, resolves the entry waiting under that token, and times acks out with one timer
// for the whole window. This is what jetstream.PublishMsgAsync does, without its per-message
// future, channels, timer and reflection-based JSON decoding.
type Publisher struct {
	js      jetstream.JetStream
	nc      *nats.Conn
	cfg     Config
	log     zerolog.Logger
	confirm func(checkpoint.Ticket)

	sem     chan struct{} // one token per event in flight
	held    bool          // the publishing goroutine holds a token (Wait succeeded)
	started bool          // the publishing goroutine tried to start the chain (startChain)
	// startErr: why the chain could not start; entries queued meanwhile carry it.
	startErr error

	// Bytes in flight (the sizes of the entries in the window), added by the publishing
	// goroutine, subtracted by pop, which then signals freed; peakBytes is their maximum.
	bytes     atomic.Int64
	peakBytes atomic.Int64
	freed     chan struct{}

	mu sync.Mutex
	q  []*entry // in publish order; q[0] is the oldest unconfirmed event
	// The chain (see send). seqChain: the stream is replicated, the chain is
	// Nats-Expected-Last-Sequence = lastSeq, the stream sequence the previous message sent gets
	// when stored; otherwise it is Nats-Expected-Last-Msg-Id = lastID, the id of the newest
	// message sent ("" after a resync: the chain restarts without an expectation). Valid while
	// !recovering; the first Publish reads the stream (startChain), recover after a failure.
	seqChain   bool
	lastSeq    uint64
	lastID     string
	recovering bool // the chain is broken or not started: Publish only queues, Run (re-)publishes
	notify     chan struct{}

	// Hand-over (see Pause). paused: nothing is sent; drained is closed by Run once no send is
	// awaiting its outcome; resume asks Run to restart the chain. fenced: the sequence chain's
	// next message goes alone, and the rest of the window waits for its ack (probe is it).
	paused  bool
	drained chan struct{}
	resume  bool
	fenced  bool
	probe   *entry

	// Ack routing, guarded by mu. token numbers the sends (never reused, so a late reply to
	// an earlier send of a re-published entry finds nothing); pending maps the token of every
	// send without an outcome yet to its entry. sub and status are set up by listen.
	token   uint64
	pending map[uint64]*entry
	sub     *nats.Subscription
	inbox   string           // "<inbox>." of sub
	status  chan nats.Status // RECONNECTING and CLOSED: acks in flight are lost
	// CONNECTED (a reconnect): a retry waiting out its backoff goes at once.
	connected chan nats.Status
	replies   chan *nats.Msg // sub's messages, read by Run

	// Run-goroutine state: when the ack timer fires (zero: not armed).
	timerAt time.Time

	stats Stats

	// Atomic mode (guarded by mu): open holds the entries of the batch being collected (the
	// tail of q, unsealed); sendingBatch is the batch whose messages send is numbering
	// (bseq the last number given), under Nats-Batch-Id batchID (batchPrefix and batchN).
	atomic       bool
	batchMax     int
	open         []*entry
	sendingBatch *entry
	bseq         int
	batchPrefix  string
	batchN       uint64
	batchID      []string

	// Fast mode (guarded by mu, see fast.go): fastOpen: a fast batch is open, numbered
	// fastN, with id fastID (fastPrefix and fastN), asking for a flow ack every fastFlow
	// messages; fastSeq is the last batch sequence sent in it.
	fast       bool
	fastFlow   int
	fastPrefix string
	fastN      uint64
	fastID     string
	fastOpen   bool
	fastSeq    uint64
	// fastHeld: the newest event, not sent yet (since fastHeldAt; see fastEnqueue);
	// fastCommitNext: send sends the entry as its batch's commit.
	fastHeld       *entry
	fastHeldAt     time.Time
	fastCommitNext bool
	linger         *lingerTimer // wakes Run when the held event is due (nil outside fast mode)
	streamBytes    []byte       // the stream's name, as a flow-acked entry's ackStream

	// Publish-goroutine state: msgs builds the messages.
	msgs        msgBuilder
	prevIDLen   int      // length of the previous event's id (its Nats-Expected-Last-Msg-Id)
	streamValue []string // the Nats-Expected-Stream header value, shared read-only by every message

	// send's scratch (p.mu): the header map of a message that carries only the relay's
	// headers is filled here for the publish instead of being allocated per message, and the
	// reply subject is built in replyBuf.
	sendHeader nats.Header
	replyBuf   []byte
}

// Stats are counters of the sink, read with (*Publisher).Stats.
type Stats struct {
	Published  uint64 // events stored (new or duplicate)
	Duplicates uint64 // acks with Duplicate: true
	Retries    uint64 // re-publishes after a failure
	Errors     uint64 // failed publish attempts
	Skipped    uint64 // re-publishes skipped: the stream already held the event (LastStored)
	Resyncs    uint64 // chain restarts after the stream's tail was not the expected one (broker up)
	DeadLetter uint64 // events replaced by a dead-letter message
	StreamFull uint64 // publishes refused because the stream is full (discard: new)
	// PeakInFlightBytes is the most message bytes that were in flight at once.
	PeakInFlightBytes int64
}

type entry struct {
	// msg.Header is nil while the message carries only the relay's own headers, whose values
	// are in vals: send fills a reused map from them (header builds the message's own map
	// when it needs one: other headers, CloudEvents, dead-letter).
	msg    nats.Msg
	vals   [numVals]string // the relay's header values (one allocation for all) and the chain's expectation
	id     string
	pos    Position
	ticket checkpoint.Ticket
	// token of the send whose outcome is awaited; 0: not sent (yet) in the current chain, or
	// its outcome was consumed.
	token  uint64
	sent   time.Time
	size   int64 // bytes counted in flight for it
	done   bool  // stored; confirm was called
	failed error

	// Headers-column keys nats.go refuses (see validHeaderKey), left out of msg by build:
	// the first one and how many.
	badKey  string
	badKeys int
	// Atomic mode (see Config.Publish): unsealed while the event waits in the open batch
	// (its transaction's events not all read yet, nothing of it sent); batch is then the
	// last entry of its batch, the one sent with Nats-Batch-Commit and acknowledged for all
	// (nil: published on its own). incomplete counts the batch's refusals as incomplete.
	unsealed   bool
	batch      *entry
	incomplete int
	// Fast mode: the fast batch (its number) and batch sequence of the entry's latest send.
	fb, fseq uint64

	// schedKey is a headers-column key asking for a JetStream message schedule (the smallest
	// one), which the relay refuses (see scheduleRefused).
	schedKey string
	// minimal: msg is the smallest dead-letter message (the stream refused a metadata-only
	// one); if the stream refuses this too, the relay stops.
	minimal bool

	// The outcome of the send under token, set by Run: resolved, then ackErr (not stored) or
	// ackStream/ackDup (stored). ackStream points into the reply's data.
	resolved  bool
	ackDup    bool
	ackErr    error
	ackStream []byte

	// traced: Config.Tracer's function for this event, until called (nil without a tracer).
	traced func(seq uint64, duplicate bool)
}

// NewPublisher returns a sink publishing through js. confirm receives the ticket of every
// stored event.
func NewPublisher(js jetstream.JetStream, cfg Config, confirm func(checkpoint.Ticket), log zerolog.Logger) *Publisher {
	cfg.fill()
	p := &Publisher{
		js:      js,
		cfg:     cfg,
		log:     log.With().Str("component", "sink").Logger(),
		confirm: confirm,
		sem:     make(chan struct{}, cfg.Window),
		notify:  make(chan struct{}, 1),
		freed:   make(chan struct{}, 1),
		pending: make(map[uint64]*entry, cfg.Window),
		// Room for a window of acks plus late replies to an earlier window; a reply that finds
		// the channel full is dropped by nats.go (slow consumer) and its publish times out.
		replies: make(chan *nats.Msg, 2*cfg.Window+64),

		streamValue: []string{cfg.Stream},
		sendHeader:  make(nats.Header, 10),
		recovering:  true, // until the chain starts (startChain)
	}
	if js != nil {
		p.nc = js.Conn()
	}
	if cfg.Publish == PublishFast {
		p.fast = true
		p.fastFlow = fastAckEvery(cfg.Window)
		p.streamBytes = []byte(cfg.Stream)
		var b [8]byte
		_, _ = rand.Read(b[:])
		p.fastPrefix = hex.EncodeToString(b[:]) + "-"
		p.linger = newLingerTimer()
	}
	if cfg.Publish == PublishAtomic {
		p.atomic = true
		p.batchMax = min(MaxAtomicBatch, cfg.Window)
		var b [8]byte
		_, _ = rand.Read(b[:])
		p.batchPrefix = hex.EncodeToString(b[:]) + "-"
	}
	return p
}

// Wait blocks until Publish can take one more event without blocking, or ctx ends: an event
// slot is free and the bytes in flight leave room for an event of up to max_payload (at most
// half of MaxInFlightBytes: Publish of a larger event may wait for more acks).
func (p *Publisher) Wait(ctx context.Context) error {
	if !p.held {
		select {
		case p.sem <- struct{}{}:
			p.held = true
		default:
			p.sealIfAlone()
			select {
			case p.sem <- struct{}{}:
				p.held = true
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	for !p.roomFor(p.reserve()) {
		p.sealIfAlone()
		select {
		case <-p.freed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// reserve is the room Wait keeps for the next event: max_payload, at most half the byte
// bound. Below half the bound there is room for it: max_payload is read only above.
func (p *Publisher) reserve() int64 {
	limit := p.cfg.MaxInFlightBytes
	if p.bytes.Load() <= limit/2 {
		return 0
	}
	return min(int64(p.maxPayload()), limit/2)
}

// roomFor reports whether n more bytes may be in flight: nothing is, or they stay within the
// bound.
func (p *Publisher) roomFor(n int64) bool {
	b := p.bytes.Load()
	return b == 0 || b+n <= p.cfg.MaxInFlightBytes
}

// Full reports whether the in-flight window is full (Publish would block).
func (p *Publisher) Full() bool {
	return (!p.held && len(p.sem) == cap(p.sem)) || !p.roomFor(p.reserve())
}

// InFlight returns the number of events published and not yet confirmed.
func (p *Publisher) InFlight() int { return len(p.sem) }

// InFlightBytes returns the message bytes published and not yet confirmed.
func (p *Publisher) InFlightBytes() int64 { return p.bytes.Load() }

// Stats returns a snapshot of the counters.
func (p *Publisher) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.stats
	st.PeakInFlightBytes = p.peakBytes.Load()
	return st
}

// Publish copies ev into a message and sends it. It returns without waiting for the ack; it
// blocks only when called without a successful Wait and the window is full, or when the event
// is larger than the room Wait keeps (max_payload, at most half of MaxInFlightBytes) and does
// not fit the bytes in flight until acks free room. An error is
// returned only for an event that can never be published (a *decoder.PoisonError) or when ctx ends; a
// broker failure is handled by Run, which re-publishes.
func (p *Publisher) Publish(ctx context.Context, ev *decoder.Event, tk checkpoint.Ticket) error {
	if err := p.Wait(ctx); err != nil {
		return err
	}
	p.held = false
	if !p.started {
		p.startChain(ctx)
	}
	e := &entry{ticket: tk}
	if p.cfg.Tracer != nil {
		e.traced = p.cfg.Tracer.Start(ev)
	}
	size := p.msgs.build(e, ev)
	e.pos = Position{ev.CommitLSN, ev.TxIndex}
	if p.cfg.CloudEvents {
		addCloudEvents(e.header(), ev, p.cfg.CloudEventsSource)
		size = msgSize(&e.msg)
	}
	// send adds Nats-Expected-Stream and the chain's expectation (Nats-Expected-Last-Msg-Id or
	// -Sequence); nats.go refuses a message over max_payload with them, and that refusal would
	// be retried forever.
	size += p.controlSize(p.prevIDLen)
	var reason string
	keepPayload := false
	if max := p.maxPayload(); max > 0 && size > max {
		reason = fmt.Sprintf("event is %d bytes with headers, over the server's max_payload of %d", size, max)
	} else if hdr := size - len(e.msg.Data) - len(e.msg.Subject); hdr > MaxHeaderSize {
		// JetStream refuses it on every retry (error 10097).
		reason = fmt.Sprintf("headers are %d bytes, over the %d JetStream stores", hdr, MaxHeaderSize)
	} else if len(e.msg.Subject) > MaxSubjectLen {
		reason = fmt.Sprintf("subject is %d bytes, over the %d the relay allows (the server's max_control_line is 4096)", len(e.msg.Subject), MaxSubjectLen)
	} else if reason = e.headerRefusal(); reason != "" {
		keepPayload = true
	}
	if reason != "" {
		if !p.cfg.DeadLetter {
			<-p.sem
			return decoder.Poisonf(e.pos.CommitLSN, e.pos.TxIndex, e.id, "event cannot be published: event %s (position %s, transaction committed at %s): %s", e.id, e.pos, ev.CommitLSN, reason)
		}
		p.deadLetter(e, reason, keepPayload, p.prevIDLen)
		size = msgSize(&e.msg) + p.controlSize(p.prevIDLen)
	}
	return p.enqueue(ctx, e, size)
}

// take counts size bytes in flight, waiting while they do not fit (unless nothing is in
// flight: an event larger than the bound goes alone). On error the event's slot is given back.
func (p *Publisher) take(ctx context.Context, size int64) error {
	for !p.roomFor(size) {
		p.sealIfAlone()
		select {
		case <-p.freed:
		case <-ctx.Done():
			<-p.sem
			return ctx.Err()
		}
	}
	// Only this goroutine adds, so the bound still holds after the check.
	if b := p.bytes.Add(size); b > p.peakBytes.Load() {
		p.peakBytes.Store(b)
	}
	return nil
}

// enqueue counts e's size bytes in flight (see take), appends e to the window and sends it,
// unless the chain is being recovered (Run then sends it in order), and wakes Run.
func (p *Publisher) enqueue(ctx context.Context, e *entry, size int) error {
	e.size = int64(size)
	if err := p.take(ctx, e.size); err != nil {
		return err
	}
	p.prevIDLen = len(e.id)
	p.mu.Lock()
	p.q = append(p.q, e)
	if p.atomic {
		e.unsealed = true
		p.open = append(p.open, e)
		full := len(p.open) >= p.batchMax
		p.mu.Unlock()
		if full {
			p.sealBatch()
		}
		return nil
	}
	if p.paused {
		// Run sends it after Resume.
	} else if p.fast && !p.recovering {
		p.fastEnqueue(e)
	} else if !p.recovering {
		p.send(e)
	} else if e.failed == nil {
		e.failed = p.startErr
	}
	p.mu.Unlock()
	p.wake()
	return nil
}

// seqChained reports a chain on the stream's sequence whatever the stream's replicas (atomic
// and fast batches), which another publisher can break as on a replicated stream.
func (p *Publisher) seqChained() bool { return p.atomic || p.fast }

// wake tells Run that the window changed.
func (p *Publisher) wake() {
	select {
	case p.notify <- struct{}{}:
	default:
	}
}

// controlSize is controlHeadersSize for p's stream, with the atomic batch headers in atomic
// mode (an id of up to 64 bytes, a sequence of up to 4 digits, the commit flag).
func (p *Publisher) controlSize(prevIDLen int) int {
	n := controlHeadersSize(p.cfg.Stream, prevIDLen)
	if p.atomic {
		n += len(headerBatchID) + 64 + 4 + len(headerBatchSeq) + 4 + 4 + len(headerBatchCommit) + 1 + 4
	}
	return n
}

func (p *Publisher) maxPayload() int {
	if p.nc == nil {
		return 0
	}
	return int(p.nc.MaxPayload())
}

// sendTo publishes e's message with headers h and reply subject reply (built in p.replyBuf)
// under the next send token, awaited in p.pending. p.mu is held.
func (p *Publisher) sendTo(e *entry, h nats.Header, reply []byte) error {
	p.token++
	tok := p.token
	p.replyBuf = reply
	m := nats.Msg{Subject: e.msg.Subject, Reply: string(reply), Header: h, Data: e.msg.Data}
	e.token, e.resolved, e.ackErr = tok, false, nil
	p.pending[tok] = e // before the publish: p.mu keeps Run from reading the reply earlier
	e.sent = time.Now()
	err := p.nc.PublishMsg(&m)
	if err != nil {
		delete(p.pending, tok)
	}
	return err
}

// send publishes e as the next link of the chain. p.mu is held.
//
// On a single-replica stream the chain is Nats-Expected-Last-Msg-Id: e is stored only if the
// stream's last message is its predecessor. On a replicated stream that check happens only
// when the entry is applied on every replica, and nats-server v2.15.2 treats a refusal there
// as a "critical write error": the replicas step down and turn observers, and the stream has
// no leader from then on. There the chain is Nats-Expected-Last-Sequence (the sequence the
// predecessor gets), which the leader checks before it proposes the message, so a refused
// message leaves nothing behind. It needs the relay to be the stream's only publisher: a
// message stored by another publisher can take the sequence a refused message of the relay
// would have had, and the next one in the window is then stored after a gap.
func (p *Publisher) send(e *entry) {
	// The control headers are set directly rather than through PublishOpts (WithMsgID,
	// WithExpectStream, WithExpectLastMsgID/Sequence), which cost an option slice, closures and a
	// Header.Set each per message. Nats-Msg-Id is set by msgBuilder.build. A re-publish replaces the
	// expectation, or removes it when a msg id chain restarts.
	h := e.msg.Header
	if h == nil {
		h = p.sendHeader
		clear(h)
		e.setRelayHeaders(h)
	}
	h[jetstream.ExpectedStreamHeader] = p.streamValue
	switch {
	case p.cfg.unchained:
	case p.seqChain:
		e.vals[valExpect] = strconv.FormatUint(p.lastSeq, 10)
		h[jetstream.ExpectedLastSeqHeader] = e.vals[valExpect:]
	case p.lastID != "":
		e.vals[valExpect] = p.lastID
		h[jetstream.ExpectedLastMsgIDHeader] = e.vals[valExpect:]
	default:
		delete(h, jetstream.ExpectedLastMsgIDHeader)
	}
	if e.batch != nil {
		if p.batchHeaders(e, h) > 1 {
			// Only a batch's first message may carry an expectation (the server refuses
			// the batch otherwise): the batch is stored together, right after it.
			delete(h, jetstream.ExpectedLastSeqHeader)
		}
	} else if p.atomic {
		delete(h, headerBatchID)
		delete(h, headerBatchSeq)
		delete(h, headerBatchCommit)
	}
	err := p.listen()
	if err == nil && p.fast {
		err = p.fastSend(e, h, p.fastCommitNext, p.fenced && p.seqChain)
	} else if err == nil && e.batch != nil && e.batch != e {
		// Inside an atomic batch: no reply (the server would answer each message with an
		// empty ack); the commit's ack or error stands for the whole batch.
		e.token, e.resolved, e.ackErr = 0, false, nil
		e.sent = time.Now()
		err = p.nc.PublishMsg(&nats.Msg{Subject: e.msg.Subject, Header: h, Data: e.msg.Data})
	} else if err == nil {
		err = p.sendTo(e, h, strconv.AppendUint(append(p.replyBuf[:0], p.inbox...), p.token+1, 10))
	}
	if err != nil {
		p.sendingBatch = nil // the batch is re-sent whole, under a new id
		p.fastOpen = false   // the fast batch too: the next send starts a new one
		// Disconnected (no reconnect buffer) or closed: the chain is broken here; Run
		// re-publishes from this entry once what is in flight has resolved. A refusal of
		// the message itself (refused) is made poison by recover.
		e.token, e.failed = 0, err
		p.recovering = true
		p.stats.Errors++
		return
	}
	e.failed = nil
	p.lastSeq++
	p.lastID = e.id
	if p.fenced && p.seqChain && (e.batch == nil || e == e.batch) {
		// The probe: nothing more is sent until it is stored (Run calls unfence). An atomic
		// batch is the probe whole: its commit, sent last, is acknowledged for all of it.
		p.probe, p.recovering = e, true
	}
}
