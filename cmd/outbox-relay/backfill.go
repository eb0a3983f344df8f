package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/outbox-relay/outbox-relay/relay"
)

const backfillUsage = `Republish outbox rows created in a time range from the table itself, e.g. after a slot gap.

  outbox-relay backfill --since <RFC 3339 time> [--until <time>] [--dry-run] --pg-url ... --nats-url ...

Rows with created_at in [since, until) are published in (created_at, id) order with the same
subject, body and headers as the relay, Nats-Msg-Id = id, and Outbox-Backfill: true. JetStream
drops those it still holds within its duplicate window. Per-aggregate order between backfilled
and live events is not guaranteed. Next to a live relay it may run on a single-replica stream
only; on a replicated stream stop the relay first.`

func cmdBackfill(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) (string, bool)) error {
	fs := newFlagSet("backfill", backfillUsage, stderr)
	d := relay.DefaultConfig()
	cfg := d
	var (
		lf           logFlags
		auth         natsAuth
		since, until string
		headers      string
		dryRun       bool
	)
	fs.StringVar(&cfg.PGURL, "pg-url", d.PGURL, "Postgres connection URL or DSN (required)")
	fs.StringVar(&cfg.NATSURL, "nats-url", d.NATSURL, "NATS server URL(s), comma separated")
	auth.register(fs)
	table := newTableFlag(d.Schema + "." + d.Table)
	table.single = true
	fs.Var(table, "table", "outbox table, schema.table (one: run backfill once per table; the config file's entry of that name lends its columns and subject template)")
	fs.StringVar(&cfg.Sink.Stream, "stream", d.Sink.Stream, "JetStream stream (must exist)")
	fs.StringVar(&cfg.Sink.SubjectPrefix, "subject-prefix", d.Sink.SubjectPrefix, "as for run")
	fs.StringVar(&cfg.SubjectTemplate, "subject-template", d.SubjectTemplate, "as for run")
	registerColumnFlags(fs, &cfg.Columns)
	fs.StringVar(&since, "since", "", "republish rows with created_at at or after this RFC 3339 time (required)")
	fs.StringVar(&until, "until", "", "and before this RFC 3339 time (default: no bound)")
	fs.BoolVar(&dryRun, "dry-run", false, "count the rows, publish nothing")
	fs.StringVar(&cfg.PositionBucket, "position-bucket", d.PositionBucket, "as for run")
	fs.StringVar(&headers, "headers", "outbox", "as for run: outbox or cloudevents (give the relay's value: backfilled messages carry the same headers as live ones)")
	fs.StringVar(&cfg.Sink.CloudEventsSource, "cloudevents-source", d.Sink.CloudEventsSource, "as for run")
	lf.register(fs)
	log, err := parseCommand(fs, args, env, &lf, stderr, &cfg.PGURL)
	if err != nil {
		return err
	}
	switch headers {
	case "outbox":
	case "cloudevents":
		cfg.Sink.CloudEvents = true
	default:
		return usageError{fmt.Errorf("--headers %q: use outbox or cloudevents", headers)}
	}
	var r relay.BackfillRange
	if r.Since, err = time.Parse(time.RFC3339Nano, since); err != nil {
		return usageError{fmt.Errorf("--since %q: use an RFC 3339 time, e.g. 2026-05-01T12:00:00Z", since)}
	}
	if until != "" {
		t, err := time.Parse(time.RFC3339Nano, until)
		if err != nil {
			return usageError{fmt.Errorf("--until %q: use an RFC 3339 time", until)}
		}
		r.Until = &t
	}
	r.DryRun = dryRun
	if err := table.apply(&cfg, "backfill"); err != nil {
		return usageError{err}
	}
	if cfg.NATSOptions, err = auth.options(cfg.NATSURL); err != nil {
		return usageError{err}
	}
	res, err := relay.Backfill(ctx, cfg, r, relay.WithLogger(log))
	if err != nil {
		return err
	}
	if dryRun {
		fmt.Fprintf(stdout, "dry run: %d rows with %s in range would be republished to stream %s\n", res.Rows, cfg.Columns.CreatedAt, cfg.Sink.Stream)
		return nil
	}
	fmt.Fprintf(stdout, "backfill: %d rows read, %d newly stored, %d duplicates (already in the stream)\n", res.Rows, res.Stored-res.Duplicates, res.Duplicates)
	return nil
}
