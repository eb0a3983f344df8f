package sink

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/decoder"
)

// PublishDeadLetter publishes what is known of an outbox row that cannot become an event (a
// *decoder.PoisonError) to <prefix>.dead-letter, with reason, in its place in the order. Its
// Nats-Msg-Id is the row's id, or dead-letter:<commit LSN>:<tx index> when it has none.
func (p *Publisher) PublishDeadLetter(ctx context.Context, ev *decoder.Event, reason string, tk checkpoint.Ticket) error {
	if err := p.Wait(ctx); err != nil {
		return err
	}
	p.held = false
	if !p.started {
		p.startChain(ctx)
	}
	e := &entry{ticket: tk, pos: Position{ev.CommitLSN, ev.TxIndex}}
	if p.cfg.Tracer != nil {
		e.traced = p.cfg.Tracer.Start(ev)
	}
	p.msgs.build(e, ev)
	if e.id == "" {
		e.id = fmt.Sprintf("dead-letter:%s:%d", ev.CommitLSN, ev.TxIndex)
	}
	p.deadLetter(e, reason, true, p.prevIDLen)
	return p.enqueue(ctx, e, msgSize(&e.msg)+p.controlSize(p.prevIDLen))
}

// deadLetter turns e's message into its dead-letter message, which always fits the server's
// max_payload and JetStream's MaxHeaderSize as long as the id does: Nats-Msg-Id,
// Outbox-Commit-Lsn and Outbox-Tx-Index are kept, Outbox-Poison-Reason and
// Outbox-Original-Subject are cut to the room left, then the relay's other headers and the
// remaining headers (in key order, values cut at 1024 bytes) are kept while they fit; headers
// left out (no room, or a key nats.go refuses) are counted in Outbox-Dropped-Headers. The
// payload is kept only when keepPayload and it still fits. prevIDLen is (at most) the length
// of the id send will put in Nats-Expected-Last-Msg-Id.
func (p *Publisher) deadLetter(e *entry, reason string, keepPayload bool, prevIDLen int) {
	e.header()
	m := e.msg
	dl := &nats.Msg{Subject: p.cfg.SubjectPrefix + "." + DeadLetterToken}
	orig, dropped := m.Subject, e.badKeys
	if m.Subject == dl.Subject {
		// Already a dead letter (refused by the stream): keep what it says.
		orig = m.Header.Get(HeaderOriginalSubject)
		dropped, _ = strconv.Atoi(m.Header.Get(HeaderDroppedHeaders))
		if r := m.Header.Get(HeaderPoisonReason); r != "" {
			reason = r
		}
	}
	room, hroom := p.deadLetterRoom(len(dl.Subject), prevIDLen, e.minimal)
	f := &headerFit{h: make(nats.Header, len(m.Header)+3), room: hroom}
	f.put(HeaderMsgID, e.id)
	for _, k := range []string{HeaderCommitLSN, HeaderTxIndex} {
		if v := m.Header.Get(k); v != "" {
			f.put(k, v)
		}
	}
	f.fit(HeaderPoisonReason, headerSafe(reason), true)
	f.fit(HeaderOriginalSubject, headerSafe(clip(orig, 256)), true)
	for _, k := range []string{HeaderAggregateType, HeaderEventType, HeaderAggregateID, HeaderCreatedAt} {
		if v := m.Header.Get(k); v != "" && !f.fit(k, clip(v, 1024), false) {
			dropped++
		}
	}
	keys := slices.Sorted(maps.Keys(m.Header))
	for _, k := range keys {
		if _, done := f.h[k]; done || reservedHeader(k) || len(m.Header[k]) == 0 ||
			k == HeaderPoisonReason || k == HeaderOriginalSubject || k == HeaderDroppedHeaders {
			continue
		}
		if !validHeaderKey(k) || !f.fit(k, clip(m.Header[k][0], 1024), false) {
			dropped++
		}
	}
	if dropped > 0 {
		f.put(HeaderDroppedHeaders, strconv.Itoa(dropped))
	}
	dl.Header = f.h
	if keepPayload && (room < 0 || f.used+len(m.Data) <= room) {
		dl.Data = m.Data
	}
	e.msg = *dl
	p.mu.Lock()
	p.stats.DeadLetter++
	p.mu.Unlock()
	p.log.Warn().Str("event_id", e.id).Stringer("position", e.pos).Str("reason", reason).
		Str("subject", dl.Subject).Int("dropped_headers", dropped).Msg("poison event sent to the dead-letter subject")
}

// deadLetterRoom is the room of a dead-letter message on subject of subjectLen bytes, as
// msgSize counts it, with the control headers send adds (prevIDLen: see deadLetter) and room
// for Outbox-Dropped-Headers: room for headers and payload under max_payload (-1: unlimited),
// and hroom for headers under MaxHeaderSize (and room; minimalDeadLetterHeaders when minimal).
func (p *Publisher) deadLetterRoom(subjectLen, prevIDLen int, minimal bool) (room, hroom int) {
	reserved := 12 + p.controlSize(prevIDLen) + len(HeaderDroppedHeaders) + 10 + 4
	room = -1
	if max := p.maxPayload(); max > 0 {
		room = max - subjectLen - reserved
	}
	hroom = MaxHeaderSize - reserved
	if room >= 0 && room < hroom {
		hroom = room
	}
	if minimal {
		hroom = min(hroom, minimalDeadLetterHeaders)
	}
	return room, hroom
}

// headerFit fills the headers h of a dead-letter message within room bytes (used so far), as
// msgSize counts them.
type headerFit struct {
	h          nats.Header
	used, room int
}

func (f *headerFit) put(k, v string) {
	f.h[k] = []string{v}
	f.used += len(k) + len(v) + 4
}

// fit adds k: v if it fits, cut to the room left when cut allows; false when left out.
func (f *headerFit) fit(k, v string, cut bool) bool {
	left := f.room - f.used - len(k) - 4
	if len(v) > left {
		if !cut || left <= 0 {
			return false
		}
		v = v[:left]
	}
	f.put(k, v)
	return true
}

// minimalDeadLetterHeaders bounds the headers of a minimal dead-letter message (besides the
// control headers): the one sent when the stream refused a metadata-only one (its
// max_msg_size is below the event's headers).
const minimalDeadLetterHeaders = 512

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

// failed classifies a publish error: permanent ones end the relay, others are retried.
func (p *Publisher) failed(e *entry, err error) error {
	p.mu.Lock()
	p.stats.Errors++
	p.mu.Unlock()
	code := apiErrorCode(err)
	if code == jsErrCodeBatchDisabled {
		return fmt.Errorf("stream %s refuses fast batches (%v): set allow_batched: true in its config (nats-server 2.14+), or set Config.Sink.Publish to single", p.cfg.Stream, err)
	}
	var reason string
	switch {
	case code == jetstream.JSErrCodeStreamMessageExceedsMaximum:
		reason = fmt.Sprintf("larger than stream %s allows (max_msg_size): %v", p.cfg.Stream, err)
	case code == jsErrCodeHeaderExceedsMaximum:
		reason = fmt.Sprintf("headers over the %d bytes JetStream stores: %v", MaxHeaderSize, err)
	case code == jsErrCodeMessageTTLDisabled:
		reason = fmt.Sprintf("a %s header, and stream %s does not allow per-message TTLs (enable allow_msg_ttl: nats stream edit %s --allow-msg-ttl, nats-server 2.11+): %v", HeaderTTL, p.cfg.Stream, p.cfg.Stream, err)
	case code == jsErrCodeMessageTTLInvalid:
		reason = fmt.Sprintf("its %s header is not a valid TTL (a Go duration such as 30s, a number of seconds, or never): %v", HeaderTTL, err)
	case errors.Is(err, nats.ErrMaxPayload):
		reason = fmt.Sprintf("%v (the server's max_payload is %d)", err, p.maxPayload())
	case refused(err):
		reason = err.Error()
	}
	if e.batch != nil {
		return p.batchFailed(e, err, reason)
	}
	if reason != "" {
		isDL := e.msg.Subject == p.cfg.SubjectPrefix+"."+DeadLetterToken
		if !p.cfg.DeadLetter || isDL && e.minimal {
			return decoder.Poisonf(e.pos.CommitLSN, e.pos.TxIndex, e.id, "event cannot be published: event %s (position %s, transaction committed at %s) rejected by the stream: %s", e.id, e.pos, e.pos.CommitLSN, reason)
		}
		// A dead letter without payload refused as well: its headers are over the stream's
		// max_msg_size; send the minimal one.
		e.minimal = isDL && e.msg.Data == nil
		// Re-published from here in order, as the dead-letter message.
		// prevIDLen is publishing-goroutine state: bound the id it will chain to by the
		// longest one in the window.
		p.mu.Lock()
		prev := len(p.lastID)
		for _, q := range p.q {
			prev = max(prev, len(q.id))
		}
		p.mu.Unlock()
		p.deadLetter(e, "stream rejected the event: "+reason, false, prev)
	}
	e.failed = err
	return nil
}

// refused reports whether err is nats.go refusing a message before sending it for what the
// message is (too big, a header key it does not accept, a subject it does not accept):
// publishing the same message again can never succeed.
func refused(err error) bool {
	return errors.Is(err, nats.ErrMaxPayload) || errors.Is(err, nats.ErrBadHeaderMsg) || errors.Is(err, nats.ErrBadSubject)
}
