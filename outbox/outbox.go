// Package outbox writes events into the outbox inside the caller's transaction, for
// outbox-relay to publish to NATS JetStream once the transaction commits.
//
//	tx, _ := pool.Begin(ctx)
//	defer tx.Rollback(ctx)
//	_, err := tx.Exec(ctx, `INSERT INTO orders (id, total) VALUES ($1, $2)`, id, total)
//	err = outbox.Write(ctx, tx, outbox.NewEvent("order", id, "OrderCreated", order))
//	err = tx.Commit(ctx) // the event is published if and only if this commits
//
// Two destinations are supported: rows in the outbox table (TableMode, the default; many
// events go in with one COPY), or transactional logical decoding messages through the
// outbox_emit SQL function (MessageMode, for `outbox-relay run --source messages`), which
// leaves no rows behind.
package outbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// Event is one event to publish. Build it with NewEvent or as a struct literal.
type Event struct {
	// ID becomes the message's Nats-Msg-Id (JetStream deduplicates on it). Empty: Write sets
	// a new UUIDv7, which sorts by creation time.
	ID string
	// AggregateType, AggregateID and EventType are required. The subject is
	// <prefix>.<AggregateType>.<EventType>.
	AggregateType string
	AggregateID   string
	EventType     string
	// Payload is the message body: valid JSON (Postgres stores it as jsonb).
	Payload json.RawMessage
	// Headers become message headers. Keys starting with "Nats-" or naming one of the relay's
	// Outbox-* headers are dropped by the relay.
	Headers map[string]string

	err error // from NewEvent's encoding, reported by Write
}

// NewEvent returns an event whose payload is payload encoded as JSON. A json.RawMessage or
// []byte payload is used as is (it must be valid JSON). An encoding error is returned by Write.
func NewEvent(aggregateType, aggregateID, eventType string, payload any) Event {
	e := Event{AggregateType: aggregateType, AggregateID: aggregateID, EventType: eventType}
	switch p := payload.(type) {
	case json.RawMessage:
		e.Payload = p
	case []byte:
		e.Payload = p
	default:
		e.Payload, e.err = json.Marshal(payload)
		if e.err != nil {
			e.err = fmt.Errorf("encode payload of %s event for %s %s: %w", eventType, aggregateType, aggregateID, e.err)
		}
	}
	return e
}

// WithID returns e with the given id instead of a generated UUIDv7 (the id must be a UUID in
// table mode, where the id column is uuid).
func (e Event) WithID(id string) Event { e.ID = id; return e }

// WithHeader returns e with header key set to value. It copies the header map, so events
// built from a common base do not share headers.
func (e Event) WithHeader(key, value string) Event {
	h := make(map[string]string, len(e.Headers)+1)
	for k, v := range e.Headers {
		h[k] = v
	}
	h[key] = value
	e.Headers = h
	return e
}

func (e *Event) check() error {
	if e.err != nil {
		return e.err
	}
	switch {
	case e.AggregateType == "":
		return errors.New("outbox event without AggregateType")
	case e.AggregateID == "":
		return errors.New("outbox event without AggregateID")
	case e.EventType == "":
		return errors.New("outbox event without EventType")
	case len(e.Payload) == 0:
		return fmt.Errorf("outbox event %s for %s %s without Payload (use {} or null)", e.EventType, e.AggregateType, e.AggregateID)
	case !json.Valid(e.Payload):
		return fmt.Errorf("outbox event %s for %s %s: Payload is not valid JSON", e.EventType, e.AggregateType, e.AggregateID)
	}
	return nil
}

// Mode says where Write puts events.
type Mode uint8

const (
	// TableMode inserts rows into the outbox table (outbox-relay run --source table).
	TableMode Mode = iota
	// MessageMode calls the outbox_emit function, which writes a transactional logical
	// decoding message and no row (outbox-relay run --source messages).
	MessageMode
)

// Writer writes events. The zero value writes rows into public.outbox and propagates the
// traceparent set with ContextWithTraceparent.
type Writer struct {
	// Mode: TableMode (default) or MessageMode.
	Mode Mode
	// Table is the outbox table, "table" or "schema.table" (default public.outbox). In
	// MessageMode, its schema is where outbox_emit lives.
	Table string
	// Prefix is the logical decoding message prefix in MessageMode (default "outbox"); it
	// must match the relay's --message-prefix.
	Prefix string
	// CopyThreshold: from this many events on, Write uses one COPY instead of INSERTs
	// (default 8; table mode only).
	CopyThreshold int
	// Propagate adds trace context headers (traceparent, tracestate, ...) from ctx to each
	// event's headers; headers the event already has win. Default: TraceparentFromContext.
	// With OpenTelemetry:
	//
	//	w.Propagate = func(ctx context.Context, h map[string]string) {
	//		otel.GetTextMapPropagator().Inject(ctx, propagation.MapCarrier(h))
	//	}
	Propagate func(ctx context.Context, headers map[string]string)
}

// DefaultWriter is used by Write.
var DefaultWriter = &Writer{}

// Write writes events with DefaultWriter inside tx. They are published if and only if tx
// commits, in the order given, after the events of transactions that committed earlier.
func Write(ctx context.Context, tx pgx.Tx, events ...Event) error {
	return DefaultWriter.Write(ctx, tx, events...)
}

// Write writes events inside tx. Events without an ID get a new UUIDv7 (in the caller's
// slice too, so the caller can log or return them).
func (w *Writer) Write(ctx context.Context, tx pgx.Tx, events ...Event) error {
	if len(events) == 0 {
		return nil
	}
	trace := map[string]string{}
	if w.Propagate != nil {
		w.Propagate(ctx, trace)
	} else {
		propagateTraceparent(ctx, trace)
	}
	for i := range events {
		e := &events[i]
		if err := e.check(); err != nil {
			return err
		}
		if e.ID == "" {
			e.ID = NewID()
		}
	}
	schema, table, err := splitTable(w.Table)
	if err != nil {
		return err
	}
	if w.Mode == MessageMode {
		return w.emit(ctx, tx, schema, events, trace)
	}
	return w.insert(ctx, tx, schema, table, events, trace)
}

var columns = []string{"id", "aggregate_type", "aggregate_id", "event_type", "payload", "headers"}

func (w *Writer) insert(ctx context.Context, tx pgx.Tx, schema, table string, events []Event, trace map[string]string) error {
	ident := pgx.Identifier{schema, table}
	threshold := w.CopyThreshold
	if threshold <= 0 {
		threshold = 8
	}
	rows := make([][]any, len(events))
	for i := range events {
		h, err := headersJSON(events[i].Headers, trace)
		if err != nil {
			return err
		}
		e := &events[i]
		rows[i] = []any{e.ID, e.AggregateType, e.AggregateID, e.EventType, string(e.Payload), h}
	}
	if len(events) >= threshold {
		n, err := tx.CopyFrom(ctx, ident, columns, pgx.CopyFromRows(rows))
		if err != nil {
			return fmt.Errorf("copy %d events into %s: %w", len(events), ident.Sanitize(), err)
		}
		if int(n) != len(events) {
			return fmt.Errorf("copy into %s wrote %d of %d events", ident.Sanitize(), n, len(events))
		}
		return nil
	}
	sql := fmt.Sprintf(`INSERT INTO %s (%s) VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb)`, ident.Sanitize(), strings.Join(columns, ", "))
	if len(rows) == 1 {
		if _, err := tx.Exec(ctx, sql, rows[0]...); err != nil {
			return fmt.Errorf("insert event into %s: %w", ident.Sanitize(), err)
		}
		return nil
	}
	b := &pgx.Batch{}
	for _, r := range rows {
		b.Queue(sql, r...)
	}
	if err := tx.SendBatch(ctx, b).Close(); err != nil {
		return fmt.Errorf("insert %d events into %s: %w", len(rows), ident.Sanitize(), err)
	}
	return nil
}

func (w *Writer) emit(ctx context.Context, tx pgx.Tx, schema string, events []Event, trace map[string]string) error {
	prefix := w.Prefix
	if prefix == "" {
		prefix = "outbox"
	}
	fn := pgx.Identifier{schema, "outbox_emit"}.Sanitize()
	sql := fmt.Sprintf(`SELECT %s($1, $2, $3, $4::jsonb, $5::jsonb, $6::uuid, $7)`, fn)
	b := &pgx.Batch{}
	for i := range events {
		h, err := headersJSON(events[i].Headers, trace)
		if err != nil {
			return err
		}
		e := &events[i]
		b.Queue(sql, e.AggregateType, e.AggregateID, e.EventType, string(e.Payload), h, e.ID, prefix)
	}
	if err := tx.SendBatch(ctx, b).Close(); err != nil {
		return fmt.Errorf("emit %d events with %s (run outbox-relay migrate --source messages to create it): %w", len(events), fn, err)
	}
	return nil
}

// headersJSON merges trace into h (h wins) and encodes the result; nil when empty.
func headersJSON(h, trace map[string]string) (any, error) {
	if len(h) == 0 && len(trace) == 0 {
		return nil, nil
	}
	m := make(map[string]string, len(h)+len(trace))
	for k, v := range trace {
		m[k] = v
	}
	for k, v := range h {
		m[k] = v
	}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	return string(b), nil
}

func splitTable(s string) (schema, table string, err error) {
	if s == "" {
		return "public", "outbox", nil
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == 0x7f {
			return "", "", fmt.Errorf("outbox table %q: contains a control character (byte 0x%02x); identifiers may not", s, c)
		}
	}
	parts := strings.Split(s, ".")
	switch {
	case len(parts) == 1:
		return "public", parts[0], nil
	case len(parts) == 2 && parts[0] != "" && parts[1] != "":
		return parts[0], parts[1], nil
	}
	return "", "", fmt.Errorf("outbox table %q: use table or schema.table", s)
}
