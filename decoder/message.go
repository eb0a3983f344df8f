package decoder

import (
	"encoding/json"
	"fmt"
	"time"
)

// messageContent is the JSON a logical decoding message carries in table-less mode, as written
// by the outbox_emit SQL function (migrations/emit.sql):
//
//	{"id": "<uuid>", "aggregate_type": "...", "aggregate_id": "...", "event_type": "...",
//	 "payload": <any JSON>, "headers": {"k": "v"} or null, "created_at": "<timestamptz>"}
//
// id, aggregate_type, aggregate_id, event_type and payload are required.
type messageContent struct {
	ID            string          `json:"id"`
	AggregateType string          `json:"aggregate_type"`
	AggregateID   string          `json:"aggregate_id"`
	EventType     string          `json:"event_type"`
	Payload       json.RawMessage `json:"payload"`
	Headers       json.RawMessage `json:"headers"`
	CreatedAt     string          `json:"created_at"`
}

// decodeMessage handles a pgoutput Message (protocol 1, no streaming): Int8 flags (1 =
// transactional), Int64 LSN, String prefix, Int32 length, Byte[n] content.
func (d *Decoder) decodeMessage(r *reader) (Change, error) {
	flags := r.u8()
	r.u64() // the message's LSN
	prefix := r.cstring()
	content := r.bytes(int(int32(r.u32())))
	if r.err != nil {
		return Change{}, fmt.Errorf("decode Message: %w", r.err)
	}
	if d.cfg.MessagePrefix == "" || string(prefix) != d.cfg.MessagePrefix {
		return Change{}, nil
	}
	if flags&1 == 0 {
		return Change{Kind: NonTransactional}, nil
	}
	if !d.inTx {
		return Change{}, fmt.Errorf("transactional Message with prefix %q outside a transaction", prefix)
	}
	idx := d.txIndex
	d.txIndex++
	ev := &d.ev
	*ev = Event{CommitLSN: d.commitLSN, TxIndex: idx, Headers: ev.Headers[:0]}
	m := &d.msg
	*m = messageContent{}
	poison := func(format string, args ...any) (Change, error) {
		// The message is consumed (the decoder stays in step); what can be salvaged of it
		// goes back with the error so a dead-letter policy can publish it: the fields that
		// decoded, and the payload, or the whole content when there is no payload.
		if ev.ID == nil {
			ev.ID, ev.AggregateType, ev.AggregateID, ev.EventType = []byte(m.ID), []byte(m.AggregateType), []byte(m.AggregateID), []byte(m.EventType)
		}
		if ev.Payload == nil {
			ev.Payload = m.Payload
			if len(ev.Payload) == 0 {
				ev.Payload = content
			}
		}
		return Change{Kind: Poison, Event: ev}, Poisonf(d.commitLSN, idx, m.ID, "outbox row cannot become an event: message %d of transaction committed at %s (prefix %q, id %q): %s",
			idx, d.commitLSN, prefix, m.ID, fmt.Sprintf(format, args...))
	}
	if err := json.Unmarshal(content, m); err != nil {
		// A field of the wrong type: json.Unmarshal still decodes the others.
		return poison("content is not the JSON object outbox_emit writes: %v", err)
	}
	for _, f := range []struct{ v, name string }{{m.ID, "id"}, {m.AggregateType, "aggregate_type"}, {m.AggregateID, "aggregate_id"}, {m.EventType, "event_type"}} {
		if f.v == "" {
			return poison("%s is missing or empty", f.name)
		}
	}
	if len(m.Payload) == 0 {
		return poison("payload is missing")
	}
	ev.ID, ev.AggregateType, ev.AggregateID, ev.EventType = []byte(m.ID), []byte(m.AggregateType), []byte(m.AggregateID), []byte(m.EventType)
	ev.Payload = m.Payload
	if len(m.Headers) > 0 {
		h, err := parseHeaders(ev.Headers, m.Headers)
		if err != nil {
			return poison("headers is not a JSON object: %v", err)
		}
		ev.Headers = h
	}
	if m.CreatedAt != "" {
		t, err := time.Parse(time.RFC3339Nano, m.CreatedAt)
		if err != nil {
			return poison("created_at %q is not an RFC 3339 time", m.CreatedAt)
		}
		d.created = t.UTC().AppendFormat(d.created[:0], "2006-01-02T15:04:05.000000Z07:00")
		ev.CreatedAt = d.created
	}
	d.setSubject(ev, d.tables[0].Subject)
	return Change{Kind: Insert, Event: ev}, nil
}
