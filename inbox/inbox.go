// Package inbox consumes outbox events from JetStream with exactly-once effects on Postgres.
//
// The relay delivers at least once (JetStream redelivers until acked; a relay crash can
// re-publish outside the duplicate window). A Consumer calls the handler inside a Postgres
// transaction that also inserts the event id (Nats-Msg-Id) into a processed_events table:
//
//	BEGIN
//	INSERT INTO processed_events (event_id, ...) ON CONFLICT DO NOTHING   -- 0 rows: duplicate, skip
//	handler(ctx, tx, msg)                                                 -- the business effects
//	COMMIT
//	ack
//
// so the handler's effects and the record of the event commit together or not at all. A
// delivery whose id is already recorded is acked without calling the handler. Two concurrent
// deliveries of one id serialize on the primary key: the second waits for the first to commit,
// then sees a conflict. The ack comes after the commit; if it is lost, the redelivery is a
// duplicate. Only effects inside tx are exactly once: a handler that also calls an external
// service must make that call idempotent itself.
package inbox

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"
)

// Handler applies one event's effects inside tx. Returning an error rolls tx back and the
// event is redelivered after the configured backoff, up to MaxDeliver deliveries.
type Handler func(ctx context.Context, tx pgx.Tx, msg jetstream.Msg) error

// Config of a Consumer.
type Config struct {
	// Stream to read (default OUTBOX).
	Stream string
	// Durable is the JetStream durable consumer name (required): the position survives
	// restarts, and several processes with the same name share the work.
	Durable string
	// FilterSubjects limits the subjects (default: the whole stream).
	FilterSubjects []string
	// Table records processed event ids (default processed_events); create it with
	// EnsureTable or the SQL in TableSQL.
	Table string
	// MaxDeliver: deliveries of one event at most, then it is terminated and OnGiveUp called
	// (default 10).
	MaxDeliver int
	// Backoff: delay before redelivery after the n-th failed delivery is Backoff[n-1], the
	// last entry repeating (default 100ms, 1s, 5s, 30s).
	Backoff []time.Duration
	// AckWait: a delivery not acked after this long is redelivered by the server, for
	// example when the process died (default 30s). Keep it above the handler's duration.
	AckWait time.Duration
	// OnError is told about failed deliveries (handler errors, Postgres errors); optional.
	OnError func(msg jetstream.Msg, err error)
	// OnGiveUp is called when an event failed MaxDeliver times and is terminated; optional.
	OnGiveUp func(msg jetstream.Msg, err error)
}

func (c *Config) fill() error {
	if c.Durable == "" {
		return errors.New("inbox: Config.Durable is required")
	}
	if c.Stream == "" {
		c.Stream = "OUTBOX"
	}
	if c.Table == "" {
		c.Table = "processed_events"
	}
	if c.MaxDeliver <= 0 {
		c.MaxDeliver = 10
	}
	if len(c.Backoff) == 0 {
		c.Backoff = []time.Duration{100 * time.Millisecond, time.Second, 5 * time.Second, 30 * time.Second}
	}
	if c.AckWait <= 0 {
		c.AckWait = 30 * time.Second
	}
	return nil
}

// Stats are counters of a Consumer.
type Stats struct {
	Processed  uint64 // handler committed
	Duplicates uint64 // already recorded, skipped
	Failures   uint64 // handler or Postgres failed; redelivered later
	GaveUp     uint64 // terminated after MaxDeliver
}

// Consumer runs a durable JetStream consumer and the inbox transaction per event.
type Consumer struct {
	js   jetstream.JetStream
	pool *pgxpool.Pool
	cfg  Config
	h    Handler

	processed, duplicates, failures, gaveUp atomic.Uint64
}

// New returns a Consumer; Run starts it.
func New(js jetstream.JetStream, pool *pgxpool.Pool, cfg Config, h Handler) (*Consumer, error) {
	if err := cfg.fill(); err != nil {
		return nil, err
	}
	return &Consumer{js: js, pool: pool, cfg: cfg, h: h}, nil
}

// TableSQL creates the processed-events table name (a quoted identifier).
func TableSQL(name string) string {
	return fmt.Sprintf(`CREATE TABLE IF NOT EXISTS %s (
    event_id     text        PRIMARY KEY,
    subject      text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
)`, name)
}

// EnsureTable creates the processed-events table if it is missing. Rows may be deleted once
// older than any redelivery or re-publication can be (e.g. the stream's max age).
func EnsureTable(ctx context.Context, pool *pgxpool.Pool, table string) error {
	if table == "" {
		table = "processed_events"
	}
	if _, err := pool.Exec(ctx, TableSQL(pgx.Identifier{table}.Sanitize())); err != nil {
		return fmt.Errorf("inbox: create table %s: %w", table, err)
	}
	return nil
}

// Stats returns the counters.
func (c *Consumer) Stats() Stats {
	return Stats{Processed: c.processed.Load(), Duplicates: c.duplicates.Load(), Failures: c.failures.Load(), GaveUp: c.gaveUp.Load()}
}

// Run creates or updates the durable consumer and processes events one at a time, in
// delivery order, until ctx ends (then it returns nil) or the consumer cannot be read.
func (c *Consumer) Run(ctx context.Context) error {
	cons, err := c.js.CreateOrUpdateConsumer(ctx, c.cfg.Stream, jetstream.ConsumerConfig{
		Durable:        c.cfg.Durable,
		AckPolicy:      jetstream.AckExplicitPolicy,
		AckWait:        c.cfg.AckWait,
		MaxDeliver:     c.cfg.MaxDeliver,
		FilterSubjects: c.cfg.FilterSubjects,
		MaxAckPending:  1000,
	})
	if err != nil {
		return fmt.Errorf("inbox: create consumer %s on stream %s: %w", c.cfg.Durable, c.cfg.Stream, err)
	}
	it, err := cons.Messages()
	if err != nil {
		return fmt.Errorf("inbox: consume %s: %w", c.cfg.Durable, err)
	}
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	defer it.Stop()
	for {
		msg, err := it.Next()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				return nil
			}
			return fmt.Errorf("inbox: next message of %s: %w", c.cfg.Durable, err)
		}
		c.process(ctx, msg)
	}
}

// process handles one delivery; its outcome is always an ack, a nak with delay or a term.
func (c *Consumer) process(ctx context.Context, msg jetstream.Msg) {
	id := msg.Headers().Get(jetstream.MsgIDHeader)
	if id == "" {
		// Without an id there is nothing to deduplicate on: not an outbox event.
		c.giveUp(msg, errors.New("message has no Nats-Msg-Id header"))
		return
	}
	dup, err := c.handle(ctx, msg, id)
	if err != nil {
		c.failures.Add(1)
		if c.cfg.OnError != nil {
			c.cfg.OnError(msg, err)
		}
		n := uint64(1)
		if md, merr := msg.Metadata(); merr == nil {
			n = md.NumDelivered
		}
		if n >= uint64(c.cfg.MaxDeliver) {
			c.giveUp(msg, err)
			return
		}
		_ = msg.NakWithDelay(c.cfg.Backoff[min(int(n), len(c.cfg.Backoff))-1])
		return
	}
	if dup {
		c.duplicates.Add(1)
	} else {
		c.processed.Add(1)
	}
	// Committed: an ack lost here only causes a redelivery, which is then a duplicate.
	actx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = msg.DoubleAck(actx)
}

func (c *Consumer) giveUp(msg jetstream.Msg, err error) {
	c.gaveUp.Add(1)
	if c.cfg.OnGiveUp != nil {
		c.cfg.OnGiveUp(msg, err)
	}
	_ = msg.TermWithReason(err.Error())
}

// handle runs the inbox transaction; dup reports an already recorded id.
func (c *Consumer) handle(ctx context.Context, msg jetstream.Msg, id string) (dup bool, err error) {
	err = pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, fmt.Sprintf(`INSERT INTO %s (event_id, subject) VALUES ($1, $2) ON CONFLICT (event_id) DO NOTHING`,
			pgx.Identifier{c.cfg.Table}.Sanitize()), id, msg.Subject())
		if err != nil {
			return fmt.Errorf("record event %s in %s: %w", id, c.cfg.Table, err)
		}
		if tag.RowsAffected() == 0 {
			dup = true
			return nil
		}
		if err := c.h(ctx, tx, msg); err != nil {
			return fmt.Errorf("handle event %s: %w", id, err)
		}
		return nil
	})
	return dup, err
}
