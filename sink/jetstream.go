package sink

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/decoder"
)

// ErrPoison marks an event the broker will never store as it is (too large for the server's
// max_payload or the stream's max_msg_size, a header key nats.go refuses). Retrying cannot
// help; the relay stops.
var ErrPoison = errors.New("event cannot be published")

// JetStream publishes events with a bounded, gap-free in-flight window (see the package doc).
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
type JetStream struct {
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

	// Publish-goroutine scratch: header values of one event are built in one buffer and
	// converted to one string; the subject string is reused while it does not change.
	scratch     []byte
	prevIDLen   int // length of the previous event's id (its Nats-Expected-Last-Msg-Id)
	subject     string
	streamValue []string // the Nats-Expected-Stream header value, shared read-only by every message

	// send's scratch (j.mu): the header map of a message that carries only the relay's
	// headers is filled here for the publish instead of being allocated per message, and the
	// reply subject is built in replyBuf.
	sendHeader nats.Header
	replyBuf   []byte
}

// Stats are counters of the sink, read with (*JetStream).Stats.
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
	vals   [8]string // the relay's header values (one allocation for all) and the chain's expectation
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

	// Headers-column keys nats.go refuses (see validHeaderKey), left out of msg by buildMsg:
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

// NewJetStream returns a sink publishing through js. confirm receives the ticket of every
// stored event.
func NewJetStream(js jetstream.JetStream, cfg Config, confirm func(checkpoint.Ticket), log zerolog.Logger) *JetStream {
	cfg.fill()
	j := &JetStream{
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
		j.nc = js.Conn()
	}
	if cfg.Publish == PublishAtomic {
		j.atomic = true
		j.batchMax = min(MaxAtomicBatch, cfg.Window)
		var b [8]byte
		_, _ = rand.Read(b[:])
		j.batchPrefix = hex.EncodeToString(b[:]) + "-"
	}
	return j
}

// Wait blocks until Publish can take one more event without blocking, or ctx ends: an event
// slot is free and the bytes in flight leave room for an event of up to max_payload (at most
// half of MaxInFlightBytes: Publish of a larger event may wait for more acks).
func (j *JetStream) Wait(ctx context.Context) error {
	if !j.held {
		select {
		case j.sem <- struct{}{}:
			j.held = true
		default:
			j.sealIfAlone()
			select {
			case j.sem <- struct{}{}:
				j.held = true
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	for !j.roomFor(j.reserve()) {
		j.sealIfAlone()
		select {
		case <-j.freed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// reserve is the room Wait keeps for the next event: max_payload, at most half the byte
// bound. Below half the bound there is room for it: max_payload is read only above.
func (j *JetStream) reserve() int64 {
	limit := j.cfg.MaxInFlightBytes
	if j.bytes.Load() <= limit/2 {
		return 0
	}
	return min(int64(j.maxPayload()), limit/2)
}

// roomFor reports whether n more bytes may be in flight: nothing is, or they stay within the
// bound.
func (j *JetStream) roomFor(n int64) bool {
	b := j.bytes.Load()
	return b == 0 || b+n <= j.cfg.MaxInFlightBytes
}

// Full reports whether the in-flight window is full (Publish would block).
func (j *JetStream) Full() bool {
	return (!j.held && len(j.sem) == cap(j.sem)) || !j.roomFor(j.reserve())
}

// InFlight returns the number of events published and not yet confirmed.
func (j *JetStream) InFlight() int { return len(j.sem) }

// InFlightBytes returns the message bytes published and not yet confirmed.
func (j *JetStream) InFlightBytes() int64 { return j.bytes.Load() }

// Stats returns a snapshot of the counters.
func (j *JetStream) Stats() Stats {
	j.mu.Lock()
	defer j.mu.Unlock()
	st := j.stats
	st.PeakInFlightBytes = j.peakBytes.Load()
	return st
}

// Publish copies ev into a message and sends it. It returns without waiting for the ack; it
// blocks only when called without a successful Wait and the window is full, or when the event
// is larger than the room Wait keeps (max_payload, at most half of MaxInFlightBytes) and does
// not fit the bytes in flight until acks free room. An error is
// returned only for an event that can never be published (ErrPoison) or when ctx ends; a
// broker failure is handled by Run, which re-publishes.
func (j *JetStream) Publish(ctx context.Context, ev *decoder.Event, tk checkpoint.Ticket) error {
	if err := j.Wait(ctx); err != nil {
		return err
	}
	j.held = false
	if !j.started {
		j.startChain(ctx)
	}
	e := &entry{ticket: tk}
	if j.cfg.Tracer != nil {
		e.traced = j.cfg.Tracer.Start(ev)
	}
	size := j.buildMsg(e, ev)
	e.pos = Position{ev.CommitLSN, ev.TxIndex}
	if j.cfg.CloudEvents {
		addCloudEvents(e.header(), ev, j.cfg.CloudEventsSource)
		size = msgSize(&e.msg)
	}
	// send adds Nats-Expected-Stream and the chain's expectation (Nats-Expected-Last-Msg-Id or
	// -Sequence); nats.go refuses a message over max_payload with them, and that refusal would
	// be retried forever.
	size += j.controlSize(j.prevIDLen)
	var reason string
	keepPayload := false
	if max := j.maxPayload(); max > 0 && size > max {
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
		if !j.cfg.DeadLetter {
			<-j.sem
			return fmt.Errorf("%w: event %s (position %s, transaction committed at %s): %s", ErrPoison, e.id, e.pos, ev.CommitLSN, reason)
		}
		j.deadLetter(e, reason, keepPayload, j.prevIDLen)
		size = msgSize(&e.msg) + j.controlSize(j.prevIDLen)
	}
	return j.enqueue(ctx, e, size)
}

// take counts size bytes in flight, waiting while they do not fit (unless nothing is in
// flight: an event larger than the bound goes alone). On error the event's slot is given back.
func (j *JetStream) take(ctx context.Context, size int64) error {
	for !j.roomFor(size) {
		j.sealIfAlone()
		select {
		case <-j.freed:
		case <-ctx.Done():
			<-j.sem
			return ctx.Err()
		}
	}
	// Only this goroutine adds, so the bound still holds after the check.
	if b := j.bytes.Add(size); b > j.peakBytes.Load() {
		j.peakBytes.Store(b)
	}
	return nil
}

// enqueue counts e's size bytes in flight (see take), appends e to the window and sends it,
// unless the chain is being recovered (Run then sends it in order), and wakes Run.
func (j *JetStream) enqueue(ctx context.Context, e *entry, size int) error {
	e.size = int64(size)
	if err := j.take(ctx, e.size); err != nil {
		return err
	}
	j.prevIDLen = len(e.id)
	j.mu.Lock()
	j.q = append(j.q, e)
	if j.atomic {
		e.unsealed = true
		j.open = append(j.open, e)
		full := len(j.open) >= j.batchMax
		j.mu.Unlock()
		if full {
			j.sealBatch()
		}
		return nil
	}
	if !j.recovering {
		j.send(e)
	} else if e.failed == nil {
		e.failed = j.startErr
	}
	j.mu.Unlock()
	j.wake()
	return nil
}

// wake tells Run that the window changed.
func (j *JetStream) wake() {
	select {
	case j.notify <- struct{}{}:
	default:
	}
}

// EndTx ends the transaction whose events were published since the last EndTx: in atomic mode
// they go out as one batch (the last part of it when it was split); otherwise it does nothing.
// Called by the publishing goroutine.
func (j *JetStream) EndTx() { j.sealBatch() }

// sealIfAlone is called when the window is full: when all it holds is the open batch, no ack
// would ever free room, so the batch goes out as it is (the transaction is split). Otherwise
// acks of earlier batches will free room and the transaction may still fit whole.
func (j *JetStream) sealIfAlone() {
	j.mu.Lock()
	alone := len(j.open) > 0 && len(j.open) == len(j.q)
	j.mu.Unlock()
	if alone {
		j.sealBatch()
	}
}

// sealBatch closes the open batch (atomic mode): its entries become one batch acknowledged by
// its last one, and are sent unless the chain is being recovered (Run then sends them).
func (j *JetStream) sealBatch() {
	j.mu.Lock()
	if len(j.open) == 0 {
		j.mu.Unlock()
		return
	}
	commit := j.open[len(j.open)-1]
	if len(j.open) == 1 {
		// One event is stored whole anyway: it goes out on its own, which spares the server
		// a batch (on a file stream each batch is staged in a store of its own: a 1-event
		// batch costs it several times a plain publish).
		commit = nil
	}
	for _, e := range j.open {
		e.unsealed, e.batch = false, commit
	}
	for _, e := range j.open {
		if j.recovering {
			if e.failed == nil {
				e.failed = j.startErr
			}
			continue
		}
		j.send(e)
	}
	clear(j.open)
	j.open = j.open[:0]
	j.mu.Unlock()
	j.wake()
}

// startChain reads the stream's replicas (which chain to use) and last sequence (where a
// sequence chain starts) before the first publish. Without an answer the events queue and
// Run's recovery starts the chain (resync). Called once, by the publishing goroutine, while
// nothing is queued.
func (j *JetStream) startChain(ctx context.Context) {
	j.started = true
	var err error
	var info *jetstream.StreamInfo
	if j.js == nil {
		err = nats.ErrInvalidConnection
	} else {
		lctx, cancel := context.WithTimeout(ctx, j.cfg.AckTimeout)
		var s jetstream.Stream
		if s, err = j.js.Stream(lctx, j.cfg.Stream); err == nil {
			info = s.CachedInfo()
		}
		cancel()
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if err != nil {
		j.startErr = fmt.Errorf("read the last sequence of stream %s: %w", j.cfg.Stream, err)
		j.stats.Errors++
		return
	}
	// Atomic batches refuse Nats-Expected-Last-Msg-Id: they chain on the sequence.
	j.seqChain = info.Config.Replicas > 1 || j.atomic
	j.lastSeq, j.recovering = info.State.LastSeq, false
}

// PublishDeadLetter publishes what is known of an outbox row that cannot become an event (a
// decoder.ErrPoison) to <prefix>.dead-letter, with reason, in its place in the order. Its
// Nats-Msg-Id is the row's id, or dead-letter:<commit LSN>:<tx index> when it has none.
func (j *JetStream) PublishDeadLetter(ctx context.Context, ev *decoder.Event, reason string, tk checkpoint.Ticket) error {
	if err := j.Wait(ctx); err != nil {
		return err
	}
	j.held = false
	if !j.started {
		j.startChain(ctx)
	}
	e := &entry{ticket: tk, pos: Position{ev.CommitLSN, ev.TxIndex}}
	if j.cfg.Tracer != nil {
		e.traced = j.cfg.Tracer.Start(ev)
	}
	j.buildMsg(e, ev)
	if e.id == "" {
		e.id = fmt.Sprintf("dead-letter:%s:%d", ev.CommitLSN, ev.TxIndex)
	}
	j.deadLetter(e, reason, true, j.prevIDLen)
	return j.enqueue(ctx, e, msgSize(&e.msg)+j.controlSize(j.prevIDLen))
}

// MaxHeaderSize is the largest header block JetStream stores (it encodes the length in 16
// bits; a larger one is refused with error 10097).
const MaxHeaderSize = 65535

// MaxSubjectLen is the longest subject the relay publishes; a longer one is poison (the
// server would close the connection over its max_control_line).
const MaxSubjectLen = 3072

// deadLetter turns e's message into its dead-letter message, which always fits the server's
// max_payload and JetStream's MaxHeaderSize as long as the id does: Nats-Msg-Id,
// Outbox-Commit-Lsn and Outbox-Tx-Index are kept, Outbox-Poison-Reason and
// Outbox-Original-Subject are cut to the room left, then the relay's other headers and the
// remaining headers (in key order, values cut at 1024 bytes) are kept while they fit; headers
// left out (no room, or a key nats.go refuses) are counted in Outbox-Dropped-Headers. The
// payload is kept only when keepPayload and it still fits. prevIDLen is (at most) the length
// of the id send will put in Nats-Expected-Last-Msg-Id.
func (j *JetStream) deadLetter(e *entry, reason string, keepPayload bool, prevIDLen int) {
	e.header()
	m := e.msg
	dl := &nats.Msg{Subject: j.cfg.SubjectPrefix + "." + DeadLetterToken}
	orig, dropped := m.Subject, e.badKeys
	if m.Subject == dl.Subject {
		// Already a dead letter (refused by the stream): keep what it says.
		orig = m.Header.Get(HeaderOriginalSubject)
		dropped, _ = strconv.Atoi(m.Header.Get(HeaderDroppedHeaders))
		if r := m.Header.Get(HeaderPoisonReason); r != "" {
			reason = r
		}
	}
	// Room for headers and payload under max_payload (-1: unlimited), and for headers under
	// MaxHeaderSize, as msgSize counts them, with the control headers send adds and room for
	// Outbox-Dropped-Headers.
	reserved := 12 + j.controlSize(prevIDLen) + len(HeaderDroppedHeaders) + 10 + 4
	room := -1
	if max := j.maxPayload(); max > 0 {
		room = max - len(dl.Subject) - reserved
	}
	hroom := MaxHeaderSize - reserved
	if room >= 0 && room < hroom {
		hroom = room
	}
	if e.minimal {
		hroom = min(hroom, minimalDeadLetterHeaders)
	}
	h := make(nats.Header, len(m.Header)+3)
	used := 0
	put := func(k, v string) {
		h[k] = []string{v}
		used += len(k) + len(v) + 4
	}
	// fit adds k: v if it fits, cut to the room left when cut allows; false when left out.
	fit := func(k, v string, cut bool) bool {
		left := hroom - used - len(k) - 4
		if len(v) > left {
			if !cut || left <= 0 {
				return false
			}
			v = v[:left]
		}
		put(k, v)
		return true
	}
	put(HeaderMsgID, e.id)
	for _, k := range []string{HeaderCommitLSN, HeaderTxIndex} {
		if v := m.Header.Get(k); v != "" {
			put(k, v)
		}
	}
	fit(HeaderPoisonReason, headerSafe(reason), true)
	fit(HeaderOriginalSubject, headerSafe(clip(orig, 256)), true)
	for _, k := range []string{HeaderAggregateType, HeaderEventType, HeaderAggregateID, HeaderCreatedAt} {
		if v := m.Header.Get(k); v != "" && !fit(k, clip(v, 1024), false) {
			dropped++
		}
	}
	keys := slices.Sorted(maps.Keys(m.Header))
	for _, k := range keys {
		if _, done := h[k]; done || reservedHeader(k) || len(m.Header[k]) == 0 ||
			k == HeaderPoisonReason || k == HeaderOriginalSubject || k == HeaderDroppedHeaders {
			continue
		}
		if !validHeaderKey(k) || !fit(k, clip(m.Header[k][0], 1024), false) {
			dropped++
		}
	}
	if dropped > 0 {
		put(HeaderDroppedHeaders, strconv.Itoa(dropped))
	}
	dl.Header = h
	if keepPayload && (room < 0 || used+len(m.Data) <= room) {
		dl.Data = m.Data
	}
	e.msg = *dl
	j.mu.Lock()
	j.stats.DeadLetter++
	j.mu.Unlock()
	j.log.Warn().Str("event_id", e.id).Stringer("position", e.pos).Str("reason", reason).
		Str("subject", dl.Subject).Int("dropped_headers", dropped).Msg("poison event sent to the dead-letter subject")
}

// minimalDeadLetterHeaders bounds the headers of a minimal dead-letter message (besides the
// control headers): the one sent when the stream refused a metadata-only one (its
// max_msg_size is below the event's headers).
const minimalDeadLetterHeaders = 512

// clip returns s cut to at most n bytes.
func clip(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// headerKeyForbidden are the printable ASCII bytes nats.go refuses in a header key.
const headerKeyForbidden = `"()/,:;<=>?@[\]{}`

// validHeaderKey reports whether nats.go accepts k as a header key (Msg.headerSize refuses the
// whole message with nats.ErrBadHeaderMsg otherwise): non-empty, bytes 33-126 only (no space,
// control character or non-ASCII), none of headerKeyForbidden.
func validHeaderKey(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		if c := k[i]; c < 33 || c > 126 || strings.IndexByte(headerKeyForbidden, c) >= 0 {
			return false
		}
	}
	return true
}

func headerSafe(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c == '\r' || c == '\n' {
			b[i] = ' '
		}
	}
	if len(b) > 1024 {
		b = b[:1024]
	}
	return string(b)
}

// controlHeadersSize is what send's headers add to a message at most: Nats-Expected-Stream,
// and Nats-Expected-Last-Sequence (up to 20 digits) or Nats-Expected-Last-Msg-Id with an id
// of prevIDLen bytes (at least a UUID's 36: a re-publish after a dead-lettered event may chain
// to another id).
func controlHeadersSize(stream string, prevIDLen int) int {
	expect := max(len(jetstream.ExpectedLastSeqHeader)+20, len(jetstream.ExpectedLastMsgIDHeader)+max(prevIDLen, 36))
	return len(jetstream.ExpectedStreamHeader) + len(stream) + 4 + expect + 4
}

// controlSize is controlHeadersSize for j's stream, with the atomic batch headers in atomic
// mode (an id of up to 64 bytes, a sequence of up to 4 digits, the commit flag).
func (j *JetStream) controlSize(prevIDLen int) int {
	n := controlHeadersSize(j.cfg.Stream, prevIDLen)
	if j.atomic {
		n += len(headerBatchID) + 64 + 4 + len(headerBatchSeq) + 4 + 4 + len(headerBatchCommit) + 1 + 4
	}
	return n
}

func (j *JetStream) maxPayload() int {
	if j.nc == nil {
		return 0
	}
	return int(j.nc.MaxPayload())
}

// msgSize is the size max_payload applies to, for a message whose headers were changed after
// buildMsg (CloudEvents attributes).
func msgSize(m *nats.Msg) int {
	n := len(m.Data) + len(m.Subject)
	for k, vs := range m.Header {
		for _, v := range vs {
			n += len(k) + len(v) + 4
		}
	}
	return n + 12 // "NATS/1.0\r\n" + final CRLF
}

// send publishes e as the next link of the chain. j.mu is held.
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
func (j *JetStream) send(e *entry) {
	// The control headers are set directly rather than through PublishOpts (WithMsgID,
	// WithExpectStream, WithExpectLastMsgID/Sequence), which cost an option slice, closures and a
	// Header.Set each per message. Nats-Msg-Id is set by buildMsg. A re-publish replaces the
	// expectation, or removes it when a msg id chain restarts.
	h := e.msg.Header
	if h == nil {
		h = j.sendHeader
		clear(h)
		e.setRelayHeaders(h)
	}
	h[jetstream.ExpectedStreamHeader] = j.streamValue
	switch {
	case j.cfg.unchained:
	case j.seqChain:
		e.vals[len(e.vals)-1] = strconv.FormatUint(j.lastSeq, 10)
		h[jetstream.ExpectedLastSeqHeader] = e.vals[len(e.vals)-1:]
	case j.lastID != "":
		e.vals[len(e.vals)-1] = j.lastID
		h[jetstream.ExpectedLastMsgIDHeader] = e.vals[len(e.vals)-1:]
	default:
		delete(h, jetstream.ExpectedLastMsgIDHeader)
	}
	if e.batch != nil {
		if j.batchHeaders(e, h) > 1 {
			// Only a batch's first message may carry an expectation (the server refuses
			// the batch otherwise): the batch is stored together, right after it.
			delete(h, jetstream.ExpectedLastSeqHeader)
		}
	} else if j.atomic {
		delete(h, headerBatchID)
		delete(h, headerBatchSeq)
		delete(h, headerBatchCommit)
	}
	err := j.listen()
	if err == nil && e.batch != nil && e.batch != e {
		// Inside an atomic batch: no reply (the server would answer each message with an
		// empty ack); the commit's ack or error stands for the whole batch.
		e.token, e.resolved, e.ackErr = 0, false, nil
		e.sent = time.Now()
		err = j.nc.PublishMsg(&nats.Msg{Subject: e.msg.Subject, Header: h, Data: e.msg.Data})
	} else if err == nil {
		j.token++
		tok := j.token
		j.replyBuf = strconv.AppendUint(append(j.replyBuf[:0], j.inbox...), tok, 10)
		m := nats.Msg{Subject: e.msg.Subject, Reply: string(j.replyBuf), Header: h, Data: e.msg.Data}
		e.token, e.resolved, e.ackErr = tok, false, nil
		j.pending[tok] = e // before the publish: j.mu keeps Run from reading the reply earlier
		e.sent = time.Now()
		if err = j.nc.PublishMsg(&m); err != nil {
			delete(j.pending, tok)
		}
	}
	if err != nil {
		j.sendingBatch = nil // the batch is re-sent whole, under a new id
		// Disconnected (no reconnect buffer) or closed: the chain is broken here; Run
		// re-publishes from this entry once what is in flight has resolved. A refusal of
		// the message itself (refused) is made poison by recover.
		e.token, e.failed = 0, err
		j.recovering = true
		j.stats.Errors++
		return
	}
	e.failed = nil
	j.lastSeq++
	j.lastID = e.id
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
// returns e's number in the batch. j.mu is held.
func (j *JetStream) batchHeaders(e *entry, h nats.Header) int {
	if j.sendingBatch != e.batch {
		j.sendingBatch, j.bseq = e.batch, 0
		j.batchN++
		j.batchID = []string{j.batchPrefix + strconv.FormatUint(j.batchN, 10)}
	}
	j.bseq++
	h[headerBatchID] = j.batchID
	h[headerBatchSeq] = []string{strconv.Itoa(j.bseq)}
	if e == e.batch {
		h[headerBatchCommit] = batchCommitValue
		j.sendingBatch = nil
	} else {
		delete(h, headerBatchCommit)
	}
	return j.bseq
}

// listen sets up the reply subscription and the connection status listener, once. j.mu is
// held.
func (j *JetStream) listen() error {
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
func (j *JetStream) stopListening() {
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
func (j *JetStream) Run(ctx context.Context) error {
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
func (j *JetStream) await(ctx context.Context, e *entry, timer *time.Timer, status <-chan nats.Status) bool {
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
func (j *JetStream) reply(m *nats.Msg) {
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
func (j *JetStream) resolve(e *entry, err error) {
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
func (j *JetStream) disconnected() {
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

func (j *JetStream) checkAck(e *entry) error {
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

// confirmBatch confirms every entry of the batch whose commit entry is c (stored: its ack
// came) and pops the stored entries off the window.
func (j *JetStream) confirmBatch(c *entry) {
	j.mu.Lock()
	var stored []*entry
	for _, e := range j.q {
		if e.batch == c && !e.done {
			stored = append(stored, e)
		}
		if e == c {
			break
		}
	}
	j.mu.Unlock()
	for _, e := range stored {
		e.done = true
		j.confirm(e.ticket)
	}
	j.popDone()
}

// pop confirms the oldest entry e (stored) and releases its window slot.
func (j *JetStream) pop(e *entry) {
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

// failed classifies a publish error: permanent ones end the relay, others are retried.
func (j *JetStream) failed(e *entry, err error) error {
	j.mu.Lock()
	j.stats.Errors++
	j.mu.Unlock()
	var reason string
	switch code := apiErrorCode(err); {
	case code == jetstream.JSErrCodeStreamMessageExceedsMaximum:
		reason = fmt.Sprintf("larger than stream %s allows (max_msg_size): %v", j.cfg.Stream, err)
	case code == jsErrCodeHeaderExceedsMaximum:
		reason = fmt.Sprintf("headers over the %d bytes JetStream stores: %v", MaxHeaderSize, err)
	case code == jsErrCodeMessageTTLDisabled:
		reason = fmt.Sprintf("a %s header, and stream %s does not allow per-message TTLs (enable allow_msg_ttl: nats stream edit %s --allow-msg-ttl, nats-server 2.11+): %v", HeaderTTL, j.cfg.Stream, j.cfg.Stream, err)
	case code == jsErrCodeMessageTTLInvalid:
		reason = fmt.Sprintf("its %s header is not a valid TTL (a Go duration such as 30s, a number of seconds, or never): %v", HeaderTTL, err)
	case errors.Is(err, nats.ErrMaxPayload):
		reason = fmt.Sprintf("%v (the server's max_payload is %d)", err, j.maxPayload())
	case refused(err):
		reason = err.Error()
	}
	if e.batch != nil {
		return j.batchFailed(e, err, reason)
	}
	if reason != "" {
		isDL := e.msg.Subject == j.cfg.SubjectPrefix+"."+DeadLetterToken
		if !j.cfg.DeadLetter || isDL && e.minimal {
			return fmt.Errorf("%w: event %s (position %s, transaction committed at %s) rejected by the stream: %s", ErrPoison, e.id, e.pos, e.pos.CommitLSN, reason)
		}
		// A dead letter without payload refused as well: its headers are over the stream's
		// max_msg_size; send the minimal one.
		e.minimal = isDL && e.msg.Data == nil
		// Re-published from here in order, as the dead-letter message.
		// prevIDLen is publishing-goroutine state: bound the id it will chain to by the
		// longest one in the window.
		j.mu.Lock()
		prev := len(j.lastID)
		for _, q := range j.q {
			prev = max(prev, len(q.id))
		}
		j.mu.Unlock()
		j.deadLetter(e, "stream rejected the event: "+reason, false, prev)
	}
	e.failed = err
	return nil
}

// batchFailed handles the refusal of the atomic batch whose commit entry is c. Its ack does
// not say which event the stream refused, so a batch refused for what an event is (reason) is
// published again event by event, where that event is found and stopped at or dead-lettered
// as in single mode; so is a batch refused as incomplete three times (the stream's pre-checks
// refuse a message inside a batch without a reply, and the batch then has a gap). Other
// refusals are retried as a batch.
func (j *JetStream) batchFailed(c *entry, err error, reason string) error {
	switch code := apiErrorCode(err); {
	case code == jsErrCodeAtomicDisabled:
		return fmt.Errorf("stream %s refuses atomic batches (%v): set allow_atomic: true in its config (nats-server 2.12+), or run with --publish single", j.cfg.Stream, err)
	case code == jsErrCodeBatchIncomplete:
		if c.incomplete++; c.incomplete >= 3 {
			reason = fmt.Sprintf("refused as incomplete %d times: %v", c.incomplete, err)
		}
	}
	if reason != "" {
		j.mu.Lock()
		n := 0
		for _, e := range j.q {
			if e.batch == c {
				e.batch = nil
				n++
			}
		}
		j.mu.Unlock()
		j.log.Warn().Err(err).Str("last_event_id", c.id).Stringer("position", c.pos).Int("events", n).Str("reason", reason).
			Msg("the stream refused an atomic batch for one of its events: publishing its events one by one, which finds the event (stopped at or dead-lettered as --on-poison says); this part of the transaction is not stored atomically")
	}
	c.failed = err
	return nil
}

// HeaderTTL is JetStream's per-message TTL header (nats-server 2.11+, stream allow_msg_ttl): the
// one Nats- header a headers-column entry may set.
const HeaderTTL = "Nats-TTL"

// refused reports whether err is nats.go refusing a message before sending it for what the
// message is (too big, a header key it does not accept, a subject it does not accept):
// publishing the same message again can never succeed.
func refused(err error) bool {
	return errors.Is(err, nats.ErrMaxPayload) || errors.Is(err, nats.ErrBadHeaderMsg) || errors.Is(err, nats.ErrBadSubject)
}

// recover restores the chain after a failed publish: wait until every message in flight has
// an outcome, then re-publish, in order, everything not known to be stored.
func (j *JetStream) recover(ctx context.Context, backoff *backoff, timer *time.Timer, status <-chan nats.Status) error {
	j.mu.Lock()
	j.recovering = true
	q := append([]*entry(nil), j.q...)
	j.mu.Unlock()

	var first error
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
				if err := j.failed(e, e.failed); err != nil {
					return err
				}
			}
			if first == nil {
				first = e.failed
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
				e.done = true
				j.confirm(e.ticket)
			}
		} else {
			if err := j.failed(e, e.ackErr); err != nil {
				return err
			}
			if first == nil {
				first = e.ackErr
			}
		}
		e.token = 0
	}
	j.popDone()
	var wait time.Duration
	switch {
	case wrongLastSequence(first) || apiErrorCode(first) == jsErrCodeBatchDuplicate:
		// The broker is up; the stream did not end where the chain expected (a duplicate
		// took no new sequence, or another publisher stored a message): re-chain at once.
		wait = 10 * time.Millisecond
		j.mu.Lock()
		j.stats.Resyncs++
		j.mu.Unlock()
		j.log.Debug().Err(first).Int("in_flight", len(q)).Msg("chain broken; re-publishing from the first event not stored, in order")
	case streamFull(first):
		wait = backoff.next()
		j.mu.Lock()
		j.stats.StreamFull++
		j.mu.Unlock()
		j.log.Error().Err(first).Str("stream", j.cfg.Stream).Int("in_flight", len(q)).Dur("retry_in", wait).
			Msg("the stream is full (a max_bytes, max_msgs or max_msgs_per_subject limit with discard: new): nothing from this event on is stored or confirmed, and Postgres keeps the WAL. The relay retries until space frees: raise the limit (nats stream edit), or let max_age or consumers (work-queue/interest retention) remove messages")
	default:
		wait = backoff.next()
		j.log.Warn().Err(first).Int("in_flight", len(q)).Dur("retry_in", wait).
			Msg("publish failed; re-publishing from the first event not stored, in order")
	}
	j.mu.Lock()
	connected := j.connected
	j.mu.Unlock()
	select {
	case <-time.After(wait):
	case <-connected:
		// Reconnected (now or while the window resolved): what failed with the old
		// connection may go through the new one.
		backoff.reset()
	case <-ctx.Done():
		return nil
	}
	j.resync(ctx)
	return nil
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
func (j *JetStream) resync(ctx context.Context) bool {
	lctx, cancel := context.WithTimeout(ctx, j.cfg.AckTimeout)
	last, ok, info, err := lastStored(lctx, j.js, j.cfg)
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			j.log.Warn().Err(err).Msg("cannot read the stream's last stored event; retrying")
		}
		return false
	}
	if ok && last.Seq > j.cfg.SeqFloor {
		j.skipStored(last.Position)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	// Nothing is in flight: a disconnect reported but not read yet (it came while Run waited
	// out its backoff or read the stream) is older than every send below, and must not fail
	// them once they are out on the new connection.
	for drained := false; !drained && j.status != nil; {
		select {
		case <-j.status:
		default:
			drained = true
		}
	}
	j.seqChain = info.Config.Replicas > 1 || j.atomic
	j.lastSeq = info.State.LastSeq
	j.lastID = ""
	j.recovering = false
	j.sendingBatch = nil
	for _, e := range j.q {
		if e.unsealed {
			break // its batch is still open: sealBatch sends it
		}
		if e.done {
			// Stored after an entry whose outcome was unknown but which was stored too (it
			// is its predecessor in the chain): keep the chain's view of the stream's tail.
			j.lastID = e.id
			continue
		}
		if e.sent != (time.Time{}) {
			j.stats.Retries++
		}
		j.send(e)
		if j.recovering {
			break // the broker is still unreachable; Run comes back here
		}
	}
	return true
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
func (j *JetStream) skipStored(last Position) {
	j.mu.Lock()
	var stored []*entry
	for _, e := range j.q {
		if !e.pos.AtOrBefore(last) {
			break
		}
		if !e.done {
			stored = append(stored, e)
			j.stats.Skipped++
		}
	}
	j.mu.Unlock()
	for _, e := range stored {
		e.done = true
		j.confirm(e.ticket)
		if e.traced != nil { // stored, with no ack to tell the sequence
			e.traced(0, false)
			e.traced = nil
		}
	}
	j.popDone()
}

// popDone pops the stored (done) entries off the front of the window.
func (j *JetStream) popDone() {
	for {
		j.mu.Lock()
		if len(j.q) == 0 || !j.q[0].done {
			j.mu.Unlock()
			return
		}
		e := j.q[0]
		j.mu.Unlock()
		j.pop(e)
	}
}

// buildMsg copies the event into e.msg: the payload bytes as Postgres sent them and the relay's
// headers, then the string entries of the headers column. A headers-column key that names a
// relay header or starts with "Nats-" (JetStream's control headers) is skipped; one nats.go
// refuses (validHeaderKey) is left out and counted in e.badKeys (Publish makes it poison). It returns the
// message size the server's max_payload applies to (without the control headers).
//
// This runs once per event on the publishing goroutine, so it allocates little: the relay's
// header values share one string (built in j.scratch) and one []string backing array
// (e.vals), there is no header map unless the headers column has entries (send fills a reused
// one), and the subject string is reused while consecutive events share it.
func (j *JetStream) buildMsg(e *entry, ev *decoder.Event) int {
	b := j.scratch[:0]
	var ends [7]int
	b = append(b, ev.ID...)
	ends[0] = len(b)
	b = append(b, ev.AggregateType...)
	ends[1] = len(b)
	b = append(b, ev.AggregateID...)
	ends[2] = len(b)
	b = append(b, ev.EventType...)
	ends[3] = len(b)
	b = append(b, ev.CreatedAt...)
	ends[4] = len(b)
	b = appendLSN(b, ev.CommitLSN)
	ends[5] = len(b)
	b = strconv.AppendInt(b, int64(ev.TxIndex), 10)
	ends[6] = len(b)
	j.scratch = b
	all := string(b)
	start := 0
	for i, end := range ends {
		e.vals[i] = all[start:end]
		start = end
	}
	e.id = e.vals[0]

	var h nats.Header // only for headers-column entries; see entry.msg
	size := 12        // "NATS/1.0\r\n" + final CRLF
	for _, kv := range ev.Headers {
		if reservedHeader(kv.Key) {
			if scheduleHeader(kv.Key) && (e.schedKey == "" || kv.Key < e.schedKey) {
				e.schedKey = kv.Key
			}
			continue
		}
		if !validHeaderKey(kv.Key) {
			// The headers column's entries come in no fixed order: name the smallest key,
			// so the error is the same on every try.
			if e.badKeys == 0 || kv.Key < e.badKey {
				e.badKey = kv.Key
			}
			e.badKeys++
			continue
		}
		if h == nil {
			h = make(nats.Header, 10+len(ev.Headers))
		}
		h[kv.Key] = []string{kv.Value}
		size += len(kv.Key) + len(kv.Value) + 4
	}
	for i, k := range relayHeaderKeys {
		if i == 4 && len(ev.CreatedAt) == 0 {
			continue
		}
		size += len(k) + len(e.vals[i]) + 4
	}
	if h != nil {
		e.setRelayHeaders(h)
	}
	if string(ev.Subject) != j.subject {
		j.subject = string(ev.Subject)
	}
	e.msg = nats.Msg{
		Subject: j.subject,
		Data:    append([]byte(nil), ev.Payload...),
		Header:  h,
	}
	return size + len(e.msg.Data) + len(e.msg.Subject)
}

// relayHeaderKeys are the names of the relay's headers, in the order of entry.vals.
var relayHeaderKeys = [7]string{HeaderMsgID, HeaderAggregateType, HeaderAggregateID, HeaderEventType, HeaderCreatedAt, HeaderCommitLSN, HeaderTxIndex}

// setRelayHeaders sets the relay's headers of e on h (Outbox-Created-At only when known).
func (e *entry) setRelayHeaders(h nats.Header) {
	for i, k := range relayHeaderKeys {
		if i == 4 && e.vals[i] == "" {
			continue
		}
		h[k] = e.vals[i : i+1 : i+1]
	}
}

// header returns e's header map, building it from the relay's headers if buildMsg left it out.
func (e *entry) header() nats.Header {
	if e.msg.Header == nil {
		e.msg.Header = make(nats.Header, 10)
		e.setRelayHeaders(e.msg.Header)
	}
	return e.msg.Header
}

// appendLSN appends lsn as pglogrepl.LSN.String does ("16/B374D848"), without fmt.
func appendLSN(b []byte, lsn pglogrepl.LSN) []byte {
	b = appendHexUpper(b, uint32(lsn>>32))
	b = append(b, '/')
	return appendHexUpper(b, uint32(lsn))
}

func appendHexUpper(b []byte, v uint32) []byte {
	const digits = "0123456789ABCDEF"
	var buf [8]byte
	i := len(buf)
	for {
		i--
		buf[i] = digits[v&0xF]
		v >>= 4
		if v == 0 {
			break
		}
	}
	return append(b, buf[i:]...)
}

// headerRefusal is why e's headers-column entries make it poison, "" when they do not.
func (e *entry) headerRefusal() string {
	switch {
	case e.schedKey != "":
		return fmt.Sprintf("headers column key %q asks for a JetStream message schedule, which the relay refuses: %s", clip(e.schedKey, 64), scheduleRefused)
	case e.badKeys > 0:
		// nats.go would refuse the message (nats.ErrBadHeaderMsg) on every retry.
		return fmt.Sprintf("headers column key %q is not a valid NATS header key (printable ASCII without space or any of %s)", clip(e.badKey, 64), headerKeyForbidden)
	}
	return ""
}

// scheduleRefused says why the relay does not pass JetStream message schedules (Nats-Schedule,
// its Nats-Schedule-* companions, Nats-Scheduler; nats-server 2.12+, ADR-51) through. Publishing
// the event without its schedule would deliver a delayed message at once, so it is poison
// instead. What the server does with a schedule (TestMessageSchedulesBreakTheRelaysStream):
//   - it stores the schedule message with a subject roll-up, deleting every earlier event on
//     its subject (<prefix>.<aggregate_type>.<event_type>) and any earlier schedule there;
//   - when it fires, it stores a message of its own in the relay's stream (the target must be
//     one of the stream's subjects): on a replicated stream that takes a sequence under the
//     relay's Nats-Expected-Last-Sequence chain, which can store a later event before a
//     refused earlier one, and the resync then skips the refused one as stored;
//   - that message becomes the stream's last, with the schedule's older position and no
//     Nats-Msg-Id: the replay skip falls back to the duplicate window;
//   - allow_msg_schedules cannot be set on a stream with discard: new, the policy the relay
//     creates streams with (a full stream refuses events rather than dropping unread ones).
const scheduleRefused = "a JetStream schedule rolls up (deletes) every earlier event on its subject, and the message the server produces when it fires is stored in the relay's stream outside its publish chain (see Scheduled delivery in the README). Publish the schedule from the consumer of this event instead"

// scheduleHeader reports whether k is one of JetStream's message-schedule headers
// (Nats-Schedule, Nats-Schedule-*, Nats-Scheduler), in any case.
func scheduleHeader(k string) bool {
	const p = "nats-schedule"
	return len(k) >= len(p) && strings.EqualFold(k[:len(p)], p)
}

func reservedHeader(k string) bool {
	if len(k) >= 5 && (k[:5] == "Nats-" || k[:5] == "nats-" || k[:5] == "NATS-") {
		return k != HeaderTTL // the allow-list of JetStream features a producer may ask for
	}
	switch k {
	case HeaderAggregateType, HeaderAggregateID, HeaderEventType, HeaderCreatedAt, HeaderCommitLSN, HeaderTxIndex:
		return true
	}
	return false
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
