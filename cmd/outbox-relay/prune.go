package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/outbox-relay/outbox-relay/relay"
)

func cmdPrune(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) (string, bool)) error {
	fs := newFlagSet("prune", "Delete outbox rows that were published and are older than --older-than, in batches.", stderr)
	d := relay.DefaultConfig()
	cfg := d
	var (
		lf   logFlags
		auth natsAuth
		p    relay.PruneOptions
	)
	fs.StringVar(&cfg.PGURL, "pg-url", d.PGURL, "Postgres connection URL or DSN (required)")
	table := newTableFlag(d.Schema + "." + d.Table)
	table.single = true
	fs.Var(table, "table", "outbox table, schema.table (one: run prune once per table; the config file's entry of that name lends its column-created-at)")
	fs.StringVar(&cfg.Slot, "slot", d.Slot, "the relay's replication slot: only rows it has confirmed are deleted")
	fs.DurationVar(&p.OlderThan, "older-than", 0, "delete rows whose --column-created-at is older than this, e.g. 72h (required)")
	fs.StringVar(&cfg.Columns.CreatedAt, "column-created-at", d.Columns.CreatedAt, "as for run: the timestamp column --older-than compares")
	fs.IntVar(&p.Batch, "batch", 10000, "rows deleted per transaction")
	fs.BoolVar(&p.DryRun, "dry-run", false, "count the rows that would be deleted, delete nothing")
	fs.StringVar(&cfg.NATSURL, "nats-url", d.NATSURL, "NATS server URL(s), comma separated: prune reads the relay's position record there")
	auth.register(fs)
	fs.StringVar(&cfg.Sink.Stream, "stream", d.Sink.Stream, "as for run: whose position record names the relay's slot")
	fs.StringVar(&cfg.Sink.SubjectPrefix, "subject-prefix", d.Sink.SubjectPrefix, "as for run")
	fs.StringVar(&cfg.SubjectTemplate, "subject-template", d.SubjectTemplate, "as for run (its leading literal tokens name the position record)")
	fs.StringVar(&cfg.PositionBucket, "position-bucket", d.PositionBucket, "as for run")
	fs.BoolVar(&p.SkipSourceCheck, "skip-source-check", false, "prune without comparing the slot with the relay's position record (for a relay run with --position-bucket ''); rows in a slot gap are then deleted before they can be backfilled")
	lf.register(fs)
	log, err := parseCommand(fs, args, env, &lf, stderr, &cfg.PGURL)
	if err != nil {
		return err
	}
	if p.OlderThan <= 0 {
		return usageError{errors.New("--older-than is required, e.g. --older-than 72h")}
	}
	if p.Batch < 1 {
		return usageError{errors.New("--batch must be at least 1")}
	}
	if err := table.apply(&cfg, "prune"); err != nil {
		return usageError{err}
	}
	if cfg.PositionBucket == "" && !p.SkipSourceCheck {
		return usageError{errors.New("--position-bucket '' leaves prune nothing to check the slot against: pass --skip-source-check to prune without the check")}
	}
	if cfg.NATSOptions, err = auth.options(cfg.NATSURL); err != nil {
		return usageError{err}
	}
	res, err := relay.Prune(ctx, cfg, p, relay.WithLogger(log))
	switch {
	case res.Counted:
		fmt.Fprintf(stdout, "would delete %d rows from %s\n", res.Deleted, res.Table)
	case res.Pruned:
		fmt.Fprintf(stdout, "deleted %d rows from %s\n", res.Deleted, res.Table)
	}
	if err != nil {
		return err
	}
	if res.Kept > 0 {
		fmt.Fprintf(stdout, "kept %d rows older than the cutoff: their transactions are not yet behind slot %q's catalog_xmin %s (not published yet, or published but Postgres has not moved catalog_xmin past them yet: that clears within seconds to minutes, as Postgres writes running-transactions records and the relay confirms past them)\n", res.Kept, cfg.Slot, res.CatalogXmin)
	}
	return nil
}
