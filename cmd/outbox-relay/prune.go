package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pgx/v5"
)

// cmdPrune deletes published outbox rows older than --older-than, in batches.
//
// Which rows are published: a row is deleted only if the transaction that inserted it (its
// xmin) precedes the slot's catalog_xmin. Postgres moves a logical slot's catalog_xmin forward
// only to the oldest transaction still running at a WAL position the slot has already
// confirmed (confirmed_flush_lsn); so every transaction preceding it had committed, or
// aborted, before a position the relay confirmed, which the relay does only after JetStream
// stored every event up to it. The rule needs no waiting and no commit timestamps; it lags
// the relay by the time between two running-transactions WAL records (seconds to minutes),
// which does not matter for a retention measured in hours.
func cmdPrune(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) (string, bool)) error {
	fs := newFlagSet("prune", "Delete outbox rows that were published and are older than --older-than, in batches.", stderr)
	var (
		lf                 logFlags
		pgURL, table, slot string
		olderThan          time.Duration
		batch              int
		dryRun             bool
	)
	fs.StringVar(&pgURL, "pg-url", "", "Postgres connection URL or DSN (required)")
	fs.StringVar(&table, "table", "public.outbox", "outbox table, schema.table")
	fs.StringVar(&slot, "slot", "outbox_relay", "the relay's replication slot: only rows it has confirmed are deleted")
	fs.DurationVar(&olderThan, "older-than", 0, "delete rows whose created_at is older than this, e.g. 72h (required)")
	fs.IntVar(&batch, "batch", 10000, "rows deleted per transaction")
	fs.BoolVar(&dryRun, "dry-run", false, "count the rows that would be deleted, delete nothing")
	lf.register(fs)
	log, err := parseCommand(fs, args, env, &lf, stderr, &pgURL)
	if err != nil {
		return err
	}
	if olderThan <= 0 {
		return usageError{errors.New("--older-than is required, e.g. --older-than 72h")}
	}
	if batch < 1 {
		return usageError{errors.New("--batch must be at least 1")}
	}
	schema, tbl, err := splitTable(table)
	if err != nil {
		return usageError{err}
	}
	conn, err := connectPG(ctx, pgURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())

	var catalogXmin *string
	err = conn.QueryRow(ctx, `SELECT catalog_xmin::text FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()`, slot).Scan(&catalogXmin)
	if errors.Is(err, pgx.ErrNoRows) {
		return fatalError{fmt.Errorf("replication slot %q does not exist in this database: prune deletes only rows the relay's slot has confirmed; pass the relay's --slot", slot)}
	}
	if err != nil {
		return fmt.Errorf("read slot %q: %w", slot, err)
	}
	if catalogXmin == nil {
		return fatalError{fmt.Errorf("replication slot %q has no catalog_xmin (not a logical slot, or invalidated): nothing can be proven published", slot)}
	}
	ident := pgx.Identifier{schema, tbl}.Sanitize()
	cutoff := time.Now().Add(-olderThan)
	// xmin precedes the horizon: age() counts back from the next xid with wraparound, so the
	// older transaction has the larger age; frozen rows have the largest.
	where := `created_at < $1 AND age(xmin) > age($2::text::xid)`
	log.Info().Str("table", schema+"."+tbl).Time("cutoff", cutoff).Str("slot_catalog_xmin", *catalogXmin).Msg("pruning")
	if dryRun {
		var n int64
		if err := conn.QueryRow(ctx, fmt.Sprintf(`SELECT count(*) FROM %s WHERE %s`, ident, where), cutoff, *catalogXmin).Scan(&n); err != nil {
			return fmt.Errorf("count rows to prune in %s: %w", ident, err)
		}
		fmt.Fprintf(stdout, "would delete %d rows from %s\n", n, ident)
		return nil
	}
	del := fmt.Sprintf(`DELETE FROM %s WHERE ctid = ANY (ARRAY(SELECT ctid FROM %s WHERE %s LIMIT $3))`, ident, ident, where)
	var total int64
	start := time.Now()
	for ctx.Err() == nil {
		tag, err := conn.Exec(ctx, del, cutoff, *catalogXmin, batch)
		if err != nil {
			return fmt.Errorf("delete from %s after %d rows: %w", ident, total, err)
		}
		total += tag.RowsAffected()
		log.Debug().Int64("deleted", tag.RowsAffected()).Int64("total", total).Msg("batch")
		if tag.RowsAffected() < int64(batch) {
			break
		}
	}
	log.Info().Int64("deleted", total).Dur("took", time.Since(start)).Msg("pruned")
	fmt.Fprintf(stdout, "deleted %d rows from %s\n", total, ident)
	return ctx.Err()
}
