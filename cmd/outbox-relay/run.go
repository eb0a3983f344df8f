package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"golang.org/x/sync/errgroup"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
)

type runConfig struct {
	pgURL, natsURL             string
	schema, table              string
	publication, slot          string
	createSlot                 bool
	sink                       sink.Config
	repl                       replication.Config
	drainTimeout               time.Duration
	reconnectMin, reconnectMax time.Duration
	failpoint                  string
}

func cmdRun(ctx context.Context, args []string, stderr io.Writer, env func(string) (string, bool)) error {
	fs := newFlagSet("run", "Relay every row inserted into the outbox table to NATS JetStream.", stderr)
	var (
		cfg   runConfig
		lf    logFlags
		table string
	)
	fs.StringVar(&cfg.pgURL, "pg-url", "", "Postgres connection URL or DSN (required); the relay adds replication=database for its replication connection")
	fs.StringVar(&cfg.natsURL, "nats-url", nats.DefaultURL, "NATS server URL(s), comma separated")
	fs.StringVar(&table, "table", "public.outbox", "outbox table, schema.table")
	fs.StringVar(&cfg.publication, "publication", "outbox_pub", "publication of the outbox table's inserts")
	fs.StringVar(&cfg.slot, "slot", "outbox_relay", "logical replication slot (pgoutput)")
	fs.BoolVar(&cfg.createSlot, "create-slot", false, "create the slot if it does not exist")
	fs.StringVar(&cfg.sink.Stream, "stream", sink.DefaultStream, "JetStream stream; created with subjects <subject-prefix>.> if missing")
	fs.StringVar(&cfg.sink.SubjectPrefix, "subject-prefix", sink.DefaultSubjectPrefix, "first token(s) of every subject: <prefix>.<aggregate_type>.<event_type>")
	fs.DurationVar(&cfg.sink.DuplicateWindow, "duplicate-window", sink.DefaultDuplicateWindow, "duplicate window of a stream the relay creates")
	fs.IntVar(&cfg.sink.Window, "max-in-flight", sink.DefaultWindow, "events published and not yet acknowledged by JetStream, at most")
	fs.DurationVar(&cfg.sink.AckTimeout, "ack-timeout", sink.DefaultAckTimeout, "a publish not acknowledged after this long is re-published")
	fs.DurationVar(&cfg.repl.StatusInterval, "status-interval", replication.DefaultStatusInterval, "longest time between two standby status updates to Postgres")
	fs.DurationVar(&cfg.drainTimeout, "drain-timeout", 10*time.Second, "on SIGINT/SIGTERM, how long to wait for in-flight acks before the final status update")
	lf.register(fs)
	if err := parseFlags(fs, args, env); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	log, err := lf.logger(stderr)
	if err != nil {
		return usageError{err}
	}
	if cfg.pgURL == "" {
		return usageError{fmt.Errorf("--pg-url is required (or %s)", envName("pg-url"))}
	}
	if cfg.schema, cfg.table, err = splitTable(table); err != nil {
		return usageError{err}
	}
	if !decoder.ValidPrefix(cfg.sink.SubjectPrefix) {
		return usageError{fmt.Errorf("--subject-prefix %q is not a valid NATS subject prefix (tokens separated by dots, no spaces, '*' or '>')", cfg.sink.SubjectPrefix)}
	}
	if cfg.sink.Window < 1 {
		return usageError{fmt.Errorf("--max-in-flight must be at least 1")}
	}
	cfg.repl.Slot, cfg.repl.Publication = cfg.slot, cfg.publication
	cfg.reconnectMin, cfg.reconnectMax = 200*time.Millisecond, 15*time.Second
	cfg.failpoint, _ = env("OUTBOX_RELAY_FAILPOINT")
	return relay(ctx, cfg, log)
}

// fatalError marks errors that reconnecting cannot fix.
type fatalError struct{ error }

func (e fatalError) Unwrap() error { return e.error }

func isFatal(err error) bool {
	var f fatalError
	return errors.As(err, &f) ||
		errors.Is(err, replication.ErrSlotInvalidated) ||
		errors.Is(err, replication.ErrPublicationMissing) ||
		errors.Is(err, replication.ErrSlotMissing) ||
		errors.Is(err, decoder.ErrPoison) ||
		errors.Is(err, sink.ErrPoison)
}

// relay runs sessions until ctx ends or a fatal error; each session reconnects to Postgres and
// resumes from the highest position confirmed so far.
func relay(ctx context.Context, cfg runConfig, log zerolog.Logger) error {
	log = log.With().Str("slot", cfg.slot).Logger()
	if err := preflight(ctx, cfg, log); err != nil {
		return err
	}
	nc, err := sink.Connect(cfg.natsURL,
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn().Err(err).Msg("disconnected from NATS; reconnecting")
			}
		}),
		nats.ReconnectHandler(func(c *nats.Conn) {
			log.Info().Str("url", c.ConnectedUrlRedacted()).Msg("reconnected to NATS")
		}))
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := sink.NewJetStreamContext(nc, cfg.sink)
	if err != nil {
		return err
	}
	if _, err := sink.EnsureStream(ctx, js, cfg.sink, log); err != nil {
		return err
	}

	var resume pglogrepl.LSN
	wait := cfg.reconnectMin
	for {
		started := time.Now()
		err := session(ctx, cfg, js, &resume, log)
		if ctx.Err() != nil {
			if err != nil && !errors.Is(err, context.Canceled) {
				log.Warn().Err(err).Msg("error during shutdown")
			}
			log.Info().Stringer("lsn", resume).Msg("stopped")
			return nil
		}
		if err == nil {
			err = errors.New("replication session ended")
		}
		if isFatal(err) {
			return err
		}
		if time.Since(started) > time.Minute {
			wait = cfg.reconnectMin
		}
		log.Warn().Err(err).Stringer("lsn", resume).Dur("retry_in", wait).Msg("replication interrupted; reconnecting")
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return nil
		}
		if wait *= 2; wait > cfg.reconnectMax {
			wait = cfg.reconnectMax
		}
	}
}

// preflight checks what a session needs and names the fix for what is missing.
func preflight(ctx context.Context, cfg runConfig, log zerolog.Logger) error {
	conn, err := connectPG(ctx, cfg.pgURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	var walLevel string
	if err := conn.QueryRow(ctx, `SHOW wal_level`).Scan(&walLevel); err != nil {
		return fmt.Errorf("read wal_level: %w", err)
	}
	if walLevel != "logical" {
		return fatalError{fmt.Errorf("wal_level is %q, logical replication needs 'logical': run ALTER SYSTEM SET wal_level = logical; and restart Postgres", walLevel)}
	}
	var pubExists, pubHasTable bool
	err = conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1),
		EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)`,
		cfg.publication, cfg.schema, cfg.table).Scan(&pubExists, &pubHasTable)
	if err != nil {
		return fmt.Errorf("look up publication %q: %w", cfg.publication, err)
	}
	mo := migrations.Options{Schema: cfg.schema, Table: cfg.table, Publication: cfg.publication}
	if !pubExists {
		return fatalError{fmt.Errorf("publication %q does not exist: run outbox-relay migrate, or: %s", cfg.publication, migrations.PublicationSQL(mo))}
	}
	if !pubHasTable {
		return fatalError{fmt.Errorf("publication %q does not include %s.%s: run ALTER PUBLICATION %q ADD TABLE %s.%s;", cfg.publication, cfg.schema, cfg.table, cfg.publication, cfg.schema, cfg.table)}
	}
	slot, err := replication.GetSlot(ctx, conn, cfg.slot)
	if errors.Is(err, replication.ErrSlotMissing) {
		if !cfg.createSlot {
			return fatalError{fmt.Errorf("replication slot %q does not exist: pass --create-slot to create it", cfg.slot)}
		}
		lsn, err := replication.CreateSlot(ctx, conn, cfg.slot)
		if err != nil {
			return err
		}
		log.Info().Stringer("lsn", lsn).Msg("created replication slot")
		return nil
	}
	if err != nil {
		return err
	}
	switch {
	case slot.SlotType != "logical" || slot.Plugin != "pgoutput":
		return fatalError{fmt.Errorf("replication slot %q uses plugin %q (%s), the relay needs a logical pgoutput slot: choose another --slot", cfg.slot, slot.Plugin, slot.SlotType)}
	case !slot.CurrentDatabase:
		return fatalError{fmt.Errorf("replication slot %q belongs to database %q, not the one in --pg-url: choose another --slot or connect to %q", cfg.slot, slot.Database, slot.Database)}
	case slot.WALStatus == "lost":
		return fatalError{fmt.Errorf("replication slot %q is invalidated (wal_status = lost): the WAL it needed was removed, so events committed while the relay was behind are not in the replication stream any more. Drop and recreate the slot, then republish the rows committed since %s from the table", cfg.slot, slot.ConfirmedFlush)}
	}
	return nil
}

// session is one replication connection: it runs until the connection fails, a fatal error, or
// ctx ends (then it drains in-flight acks and confirms the final position).
func session(ctx context.Context, cfg runConfig, js jetstream.JetStream, resume *pglogrepl.LSN, log zerolog.Logger) error {
	conn, err := replication.Connect(ctx, cfg.pgURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())

	qconn, err := connectPG(ctx, cfg.pgURL)
	if err != nil {
		return err
	}
	slot, err := replication.GetSlot(ctx, qconn, cfg.slot)
	qconn.Close(context.Background())
	if err != nil {
		return err
	}
	if slot.WALStatus == "lost" {
		return fmt.Errorf("%w: slot %q has wal_status lost", replication.ErrSlotInvalidated, cfg.slot)
	}
	// Start from the slot's position, or from our own higher one: after a Postgres restart the
	// slot may report an older position than the relay confirmed, and starting from ours
	// avoids re-sending what is already stored.
	start := slot.ConfirmedFlush
	if *resume > start {
		start = *resume
	}
	st, err := replication.Start(ctx, conn, cfg.repl, start, log)
	if err != nil {
		return err
	}

	trk := checkpoint.New(start)
	dec := decoder.New(decoder.Config{Schema: cfg.schema, Table: cfg.table, SubjectPrefix: cfg.sink.SubjectPrefix})
	confirm := trk.Confirm
	if n, ok := failpointN(cfg.failpoint, "kill_after_acks"); ok {
		var acks atomic.Int64
		confirm = func(t checkpoint.Ticket) {
			if acks.Add(1) == n {
				// Test hook: die after JetStream stored n events, before their position is
				// confirmed to Postgres.
				_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			}
			trk.Confirm(t)
		}
	}
	pub := sink.NewJetStream(js, cfg.sink, confirm, log)
	p := &pipeline{dec: dec, trk: trk, pub: pub, log: log}

	sinkCtx, stopSink := context.WithCancel(context.Background())
	defer stopSink()
	g, gctx := errgroup.WithContext(ctx)
	sinkDone := make(chan struct{})
	g.Go(func() error {
		defer close(sinkDone)
		return pub.Run(sinkCtx)
	})
	g.Go(func() error {
		defer stopSink()
		// The sink ending (an error) must stop reading too.
		rctx, cancel := context.WithCancel(gctx)
		defer cancel()
		go func() {
			select {
			case <-sinkDone:
				cancel()
			case <-rctx.Done():
			}
		}()
		err := st.Run(rctx, p, trk)
		defer func() {
			lsn, _ := trk.Flushed()
			if lsn > *resume {
				*resume = lsn
			}
		}()
		if err != nil || ctx.Err() == nil {
			// Connection failure, or the sink failed (its error wins in g.Wait). Give acks
			// already on their way a moment to land, so the next session resumes as far
			// as possible and re-sends less.
			settle(trk, sinkDone, 2*time.Second)
			return err
		}
		// Graceful stop: wait (bounded) for in-flight acks, then confirm the final position.
		dctx, dcancel := context.WithTimeout(context.Background(), cfg.drainTimeout)
		defer dcancel()
		go func() {
			select {
			case <-sinkDone:
				dcancel()
			case <-dctx.Done():
			}
		}()
		return st.Drain(dctx, trk)
	})
	err = g.Wait()
	if lsn, _ := trk.Flushed(); lsn > *resume {
		*resume = lsn
	}
	stats := pub.Stats()
	log.Info().Uint64("published", stats.Published).Uint64("duplicates", stats.Duplicates).
		Uint64("retries", stats.Retries).Uint64("publish_errors", stats.Errors).Stringer("lsn", *resume).
		Msg("replication session ended")
	return err
}

// settle waits until no event is in flight, the sink stopped, or max elapsed.
func settle(trk *checkpoint.Tracker, sinkDone <-chan struct{}, max time.Duration) {
	deadline := time.Now().Add(max)
	for trk.Pending() > 0 && time.Now().Before(deadline) {
		select {
		case <-sinkDone:
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// pipeline is the replication handler: decode, track, publish.
type pipeline struct {
	dec *decoder.Decoder
	trk *checkpoint.Tracker
	pub *sink.JetStream
	log zerolog.Logger
}

func (p *pipeline) Ready() bool                    { return !p.pub.Full() }
func (p *pipeline) Wait(ctx context.Context) error { return p.pub.Wait(ctx) }
func (p *pipeline) Keepalive(walEnd pglogrepl.LSN) { p.trk.Keepalive(walEnd) }

func (p *pipeline) Handle(ctx context.Context, data []byte) error {
	ch, err := p.dec.Decode(data)
	if err != nil {
		return fatalError{fmt.Errorf("decode: %w", err)}
	}
	switch ch.Kind {
	case decoder.Begin:
		p.trk.Begin()
	case decoder.Insert:
		return p.pub.Publish(ctx, ch.Event, p.trk.Add())
	case decoder.Commit:
		p.trk.Commit(ch.CommitEnd)
	}
	return nil
}

// failpointN parses "name:N" from the OUTBOX_RELAY_FAILPOINT test hook.
func failpointN(fp, name string) (int64, bool) {
	v, ok := strings.CutPrefix(fp, name+":")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(v, 10, 64)
	return n, err == nil && n > 0
}
