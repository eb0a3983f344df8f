package sink

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/outbox-relay/outbox-relay/decoder"
)

// msgBuilder builds the message of each event, on the publishing goroutine: the header values of
// one event are built in one buffer and converted to one string, and the subject string is
// reused while it does not change. Its zero value is ready to use.
type msgBuilder struct {
	scratch []byte
	subject string
}

// Indexes of entry.vals: the relay's header values, in the order of relayHeaderKeys, then the
// chain's expectation (set by send).
const (
	valMsgID = iota
	valAggregateType
	valAggregateID
	valEventType
	valCreatedAt // "" when the event has no created_at: Outbox-Created-At is left out
	valCommitLSN
	valTxIndex
	valExpect // Nats-Expected-Last-Sequence or Nats-Expected-Last-Msg-Id
	numVals
)

// build copies the event into e.msg: the payload bytes as Postgres sent them and the relay's
// headers, then the string entries of the headers column. A headers-column key that names a
// relay header or starts with "Nats-" (JetStream's control headers) is skipped; one nats.go
// refuses (validHeaderKey) is left out and counted in e.badKeys (Publish makes it poison). It returns the
// message size the server's max_payload applies to (without the control headers).
//
// This runs once per event on the publishing goroutine, so it allocates little: the relay's
// header values share one string (built in mb.scratch) and one []string backing array
// (e.vals), there is no header map unless the headers column has entries (send fills a reused
// one), and the subject string is reused while consecutive events share it.
func (mb *msgBuilder) build(e *entry, ev *decoder.Event) int {
	b := mb.scratch[:0]
	var ends [valExpect]int
	b = append(b, ev.ID...)
	ends[valMsgID] = len(b)
	b = append(b, ev.AggregateType...)
	ends[valAggregateType] = len(b)
	b = append(b, ev.AggregateID...)
	ends[valAggregateID] = len(b)
	b = append(b, ev.EventType...)
	ends[valEventType] = len(b)
	b = append(b, ev.CreatedAt...)
	ends[valCreatedAt] = len(b)
	b = appendLSN(b, ev.CommitLSN)
	ends[valCommitLSN] = len(b)
	b = strconv.AppendInt(b, int64(ev.TxIndex), 10)
	ends[valTxIndex] = len(b)
	mb.scratch = b
	all := string(b)
	start := 0
	for i, end := range ends {
		e.vals[i] = all[start:end]
		start = end
	}
	e.id = e.vals[valMsgID]

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
		if i == valCreatedAt && len(ev.CreatedAt) == 0 {
			continue
		}
		size += len(k) + len(e.vals[i]) + 4
	}
	if h != nil {
		e.setRelayHeaders(h)
	}
	if string(ev.Subject) != mb.subject {
		mb.subject = string(ev.Subject)
	}
	e.msg = nats.Msg{
		Subject: mb.subject,
		Data:    append([]byte(nil), ev.Payload...),
		Header:  h,
	}
	return size + len(e.msg.Data) + len(e.msg.Subject)
}

// relayHeaderKeys are the names of the relay's headers, in the order of entry.vals.
var relayHeaderKeys = [valExpect]string{
	valMsgID:         HeaderMsgID,
	valAggregateType: HeaderAggregateType,
	valAggregateID:   HeaderAggregateID,
	valEventType:     HeaderEventType,
	valCreatedAt:     HeaderCreatedAt,
	valCommitLSN:     HeaderCommitLSN,
	valTxIndex:       HeaderTxIndex,
}

// setRelayHeaders sets the relay's headers of e on h (Outbox-Created-At only when known).
func (e *entry) setRelayHeaders(h nats.Header) {
	for i, k := range relayHeaderKeys {
		if i == valCreatedAt && e.vals[i] == "" {
			continue
		}
		h[k] = e.vals[i : i+1 : i+1]
	}
}

// header returns e's header map, building it from the relay's headers if build left it out.
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

// MaxHeaderSize is the largest header block JetStream stores (it encodes the length in 16
// bits; a larger one is refused with error 10097).
const MaxHeaderSize = 65535

// MaxSubjectLen is the longest subject the relay publishes; a longer one is poison (the
// server would close the connection over its max_control_line).
const MaxSubjectLen = 3072

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

// controlHeadersSize is what send's headers add to a message at most: Nats-Expected-Stream,
// and Nats-Expected-Last-Sequence (up to 20 digits) or Nats-Expected-Last-Msg-Id with an id
// of prevIDLen bytes (at least a UUID's 36: a re-publish after a dead-lettered event may chain
// to another id).
func controlHeadersSize(stream string, prevIDLen int) int {
	expect := max(len(jetstream.ExpectedLastSeqHeader)+20, len(jetstream.ExpectedLastMsgIDHeader)+max(prevIDLen, 36))
	return len(jetstream.ExpectedStreamHeader) + len(stream) + 4 + expect + 4
}

// msgSize is the size max_payload applies to, for a message whose headers were changed after
// build (CloudEvents attributes).
func msgSize(m *nats.Msg) int {
	n := len(m.Data) + len(m.Subject)
	for k, vs := range m.Header {
		for _, v := range vs {
			n += len(k) + len(v) + 4
		}
	}
	return n + 12 // "NATS/1.0\r\n" + final CRLF
}

// HeaderTTL is JetStream's per-message TTL header (nats-server 2.11+, stream allow_msg_ttl): the
// one Nats- header a headers-column entry may set.
const HeaderTTL = "Nats-TTL"
