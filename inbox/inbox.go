// Package inbox consumes outbox events from JetStream with exactly-once effects on Postgres.
//
// The relay delivers at least once (JetStream redelivers until acked; a relay crash can
// re-publish outside the duplicate window). A Consumer calls the handler inside a Postgres
// transaction that also inserts the consumer's name and the event id (Nats-Msg-Id) into a
// processed_events table:
//
//	BEGIN
//	INSERT INTO processed_events (consumer, event_id, ...) ON CONFLICT DO NOTHING  -- 0 rows: duplicate, skip
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
//
// Consumers with different names (Config.Consumer, default the durable name) may share the
// table: each processes every event once. A dead-letter message of the relay (it carries
// Outbox-Poison-Reason) is recorded as "dead-letter:<id>", so the corrected event, published
// later with the same id, is still processed.
//
// Tables created before the consumer column (primary key event_id alone) keep working as
// before, deduplicating on the id alone for every consumer, until migrated with MigrateTable;
// rows recorded before the migration count as processed by every consumer.
package inbox

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
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
	// Consumer is the name events are recorded under in Table (default Durable): consumers
	// with different names sharing the table each process every event.
	Consumer string
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
	if err := checkName(c.Table); err != nil {
		return err
	}
	if c.Consumer == "" {
		c.Consumer = c.Durable
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

	mu     sync.Mutex
	legacy bool // Table has no consumer column (see MigrateTable): deduplicate on the id alone
	known  bool // legacy was read from the table
}

// HeaderPoisonReason marks the relay's dead-letter messages (sink.HeaderPoisonReason).
const HeaderPoisonReason = "Outbox-Poison-Reason"

// DeadLetterKeyPrefix is prepended to the id of a dead-letter message in Table.
const DeadLetterKeyPrefix = "dead-letter:"

// New returns a Consumer; Run starts it.
func New(js jetstream.JetStream, pool *pgxpool.Pool, cfg Config, h Handler) (*Consumer, error) {
	if err := cfg.fill(); err != nil {
		return nil, err
	}
	return &Consumer{js: js, pool: pool, cfg: cfg, h: h}, nil
}

// TableSQL creates the processed-events table name (a quoted identifier). consumer ” is
// what rows recorded before MigrateTable have: processed by every consumer.
func TableSQL(name string) string {
	return fmt.Sprintf(`CREATE TABLE IF NOT EXISTS %s (
    consumer     text        NOT NULL DEFAULT '',
    event_id     text        NOT NULL,
    subject      text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
)`, name)
}

// EnsureTable creates the processed-events table if it is missing. Rows may be deleted once
// older than any redelivery or re-publication can be (e.g. the stream's max age). A table
// of the earlier layout (primary key event_id alone) is left as it is: see MigrateTable.
func EnsureTable(ctx context.Context, pool *pgxpool.Pool, table string) error {
	if table == "" {
		table = "processed_events"
	}
	if err := checkName(table); err != nil {
		return err
	}
	if _, err := pool.Exec(ctx, TableSQL(pgx.Identifier{table}.Sanitize())); err != nil {
		return fmt.Errorf("inbox: create table %s: %w", table, err)
	}
	return nil
}

// MigrateTable moves a processed-events table of the earlier layout (primary key event_id
// alone) to the (consumer, event_id) key; a table already migrated is left as it is. Its
// rows get consumer ” and keep counting as processed by every consumer. Run it once every
// consumer sharing the table runs a version with this function: earlier versions' INSERT ...
// ON CONFLICT (event_id) fails on the new key. By hand, for the default name:
//
//	ALTER TABLE processed_events ADD COLUMN consumer text NOT NULL DEFAULT '';
//	ALTER TABLE processed_events DROP CONSTRAINT processed_events_pkey, ADD PRIMARY KEY (consumer, event_id);
func MigrateTable(ctx context.Context, pool *pgxpool.Pool, table string) error {
	if table == "" {
		table = "processed_events"
	}
	if err := checkName(table); err != nil {
		return err
	}
	ident := pgx.Identifier{table}.Sanitize()
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `LOCK TABLE `+ident+` IN ACCESS EXCLUSIVE MODE`); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `ALTER TABLE `+ident+` ADD COLUMN IF NOT EXISTS consumer text NOT NULL DEFAULT ''`); err != nil {
			return err
		}
		var pkey string
		var cols int
		err := tx.QueryRow(ctx, `SELECT conname, cardinality(conkey) FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'p'`, ident).Scan(&pkey, &cols)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			pkey = ""
		case err != nil:
			return err
		case cols != 1:
			return nil // already (consumer, event_id)
		}
		alter := `ALTER TABLE ` + ident + ` ADD PRIMARY KEY (consumer, event_id)`
		if pkey != "" {
			alter = `ALTER TABLE ` + ident + ` DROP CONSTRAINT ` + pgx.Identifier{pkey}.Sanitize() + `, ADD PRIMARY KEY (consumer, event_id)`
		}
		_, err = tx.Exec(ctx, alter)
		return err
	})
	if err != nil {
		return fmt.Errorf("inbox: migrate table %s: %w", table, err)
	}
	return nil
}

// checkName refuses a table name with a control character.
func checkName(table string) error {
	for i := 0; i < len(table); i++ {
		if c := table[i]; c < 0x20 || c == 0x7f {
			return fmt.Errorf("inbox: table %q: contains a control character (byte 0x%02x); identifiers may not", table, c)
		}
	}
	return nil
}

// layout reads whether Table has the consumer column, once, and again after a failure to
// record an event (the table may have been migrated meanwhile).
func (c *Consumer) layout(ctx context.Context, reread bool) (legacy bool, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.known && !reread {
		return c.legacy, nil
	}
	var has bool
	err = c.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = $1::regclass AND attname = 'consumer' AND NOT attisdropped)`,
		pgx.Identifier{c.cfg.Table}.Sanitize()).Scan(&has)
	if err != nil {
		return false, fmt.Errorf("inbox: read the columns of %s: %w", c.cfg.Table, err)
	}
	c.legacy, c.known = !has, true
	return c.legacy, nil
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
	if msg.Headers().Get(HeaderPoisonReason) != "" {
		id = DeadLetterKeyPrefix + id
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
	legacy, err := c.layout(ctx, false)
	if err != nil {
		return false, err
	}
	table := pgx.Identifier{c.cfg.Table}.Sanitize()
	recordFailed := false
	err = pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		var tag pgconn.CommandTag
		var err error
		if legacy {
			tag, err = tx.Exec(ctx, `INSERT INTO `+table+` (event_id, subject) VALUES ($1, $2) ON CONFLICT (event_id) DO NOTHING`, id, msg.Subject())
		} else {
			// A row of consumer '' was recorded before MigrateTable: processed by everyone.
			tag, err = tx.Exec(ctx, `INSERT INTO `+table+` (consumer, event_id, subject) SELECT $1, $2::text, $3
				WHERE NOT EXISTS (SELECT 1 FROM `+table+` WHERE consumer = '' AND event_id = $2::text)
				ON CONFLICT (consumer, event_id) DO NOTHING`, c.cfg.Consumer, id, msg.Subject())
		}
		if err != nil {
			recordFailed = true
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
	if recordFailed {
		_, _ = c.layout(ctx, true) // migrated meanwhile? the redelivery uses what the table is now
	}
	return dup, err
}
