package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/sink"
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
//
// The rule holds only for the relay's own slot, continuous with what the relay published: a
// slot of another tool, or one recreated or advanced past events the relay never saw, has a
// catalog_xmin past rows that are not in the stream (and that backfill would need). So prune
// first compares the slot with the relay's position record (checkSourceSlot).
func cmdPrune(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) (string, bool)) error {
	fs := newFlagSet("prune", "Delete outbox rows that were published and are older than --older-than, in batches.", stderr)
	var (
		lf                 logFlags
		auth               natsAuth
		pgURL, table, slot string
		natsURL, bucket    string
		template           string
		scfg               sink.Config
		olderThan          time.Duration
		batch              int
		dryRun, skipCheck  bool
	)
	fs.StringVar(&pgURL, "pg-url", "", "Postgres connection URL or DSN (required)")
	fs.StringVar(&table, "table", "public.outbox", "outbox table, schema.table")
	fs.StringVar(&slot, "slot", "outbox_relay", "the relay's replication slot: only rows it has confirmed are deleted")
	fs.DurationVar(&olderThan, "older-than", 0, "delete rows whose created_at is older than this, e.g. 72h (required)")
	fs.IntVar(&batch, "batch", 10000, "rows deleted per transaction")
	fs.BoolVar(&dryRun, "dry-run", false, "count the rows that would be deleted, delete nothing")
	fs.StringVar(&natsURL, "nats-url", nats.DefaultURL, "NATS server URL(s), comma separated: prune reads the relay's position record there")
	auth.register(fs)
	fs.StringVar(&scfg.Stream, "stream", sink.DefaultStream, "as for run: whose position record names the relay's slot")
	fs.StringVar(&scfg.SubjectPrefix, "subject-prefix", sink.DefaultSubjectPrefix, "as for run")
	fs.StringVar(&template, "subject-template", decoder.DefaultSubjectTemplate, "as for run (its leading literal tokens name the position record)")
	fs.StringVar(&bucket, "position-bucket", sink.DefaultPositionBucket, "as for run")
	fs.BoolVar(&skipCheck, "skip-source-check", false, "prune without comparing the slot with the relay's position record (for a relay run with --position-bucket ''); rows in a slot gap are then deleted before they can be backfilled")
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
	if bucket == "" && !skipCheck {
		return usageError{errors.New("--position-bucket '' leaves prune nothing to check the slot against: pass --skip-source-check to prune without the check")}
	}
	if _, err := subjectTemplate(template, &scfg); err != nil {
		return err
	}
	natsOpts, err := auth.options(natsURL)
	if err != nil {
		return usageError{err}
	}
	conn, err := relay.ConnectPG(ctx, pgURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())

	var (
		catalogXmin *string
		confirmed   *string
		sysID       string
	)
	err = conn.QueryRow(ctx, `SELECT catalog_xmin::text, confirmed_flush_lsn::text, (SELECT system_identifier::text FROM pg_control_system())
		FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()`, slot).Scan(&catalogXmin, &confirmed, &sysID)
	if errors.Is(err, pgx.ErrNoRows) {
		return relay.Fatal(fmt.Errorf("replication slot %q does not exist in this database: prune deletes only rows the relay's slot has confirmed; pass the relay's --slot", slot))
	}
	if err != nil {
		return fmt.Errorf("read slot %q: %w", slot, err)
	}
	if catalogXmin == nil {
		return relay.Fatal(fmt.Errorf("replication slot %q has no catalog_xmin (not a logical slot, or invalidated): nothing can be proven published", slot))
	}
	if skipCheck {
		log.Warn().Str("slot", slot).Msg("--skip-source-check: the slot is not compared with the relay's position record; if it is not the relay's, or skipped events, rows that were never published are deleted")
	} else {
		var slotLSN pglogrepl.LSN
		if confirmed != nil {
			if slotLSN, err = pglogrepl.ParseLSN(*confirmed); err != nil {
				return fmt.Errorf("read slot %q: %w", slot, err)
			}
		}
		if err := checkSourceSlot(ctx, natsURL, natsOpts, bucket, scfg, sysID, slot, slotLSN); err != nil {
			return err
		}
	}
	ident := pgx.Identifier{schema, tbl}.Sanitize()
	cutoff := time.Now().Add(-olderThan)
	// xmin precedes the horizon: age() counts back from the next xid with wraparound, so the
	// older transaction has the larger age; frozen rows have the largest.
	where := `created_at < $1 AND age(xmin) > age($2::text::xid)`
	kept := func() error {
		var n int64
		if err := conn.QueryRow(ctx, fmt.Sprintf(`SELECT count(*) FROM %s WHERE created_at < $1 AND NOT (age(xmin) > age($2::text::xid))`, ident), cutoff, *catalogXmin).Scan(&n); err != nil {
			return fmt.Errorf("count the rows kept in %s: %w", ident, err)
		}
		if n > 0 {
			fmt.Fprintf(stdout, "kept %d rows older than the cutoff: their transactions are not yet behind slot %q's catalog_xmin %s (not published yet, or published but Postgres has not moved catalog_xmin past them yet: that clears within seconds to minutes, as Postgres writes running-transactions records and the relay confirms past them)\n", n, slot, *catalogXmin)
		}
		return nil
	}
	log.Info().Str("table", schema+"."+tbl).Time("cutoff", cutoff).Str("slot_catalog_xmin", *catalogXmin).Msg("pruning")
	if dryRun {
		var n int64
		if err := conn.QueryRow(ctx, fmt.Sprintf(`SELECT count(*) FROM %s WHERE %s`, ident, where), cutoff, *catalogXmin).Scan(&n); err != nil {
			return fmt.Errorf("count rows to prune in %s: %w", ident, err)
		}
		fmt.Fprintf(stdout, "would delete %d rows from %s\n", n, ident)
		return kept()
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
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return kept()
}

// checkSourceSlot refuses a slot that is not the relay's recorded source: the position record
// of scfg's stream and subject prefix must exist, name this cluster and this slot, and the
// slot must not be ahead of the recorded position (a slot gap the relay has not accepted: rows
// committed in it are not in the stream, and backfill needs them in the table).
func checkSourceSlot(ctx context.Context, natsURL string, natsOpts []nats.Option, bucket string, scfg sink.Config, sysID, slot string, slotLSN pglogrepl.LSN) error {
	nc, err := sink.Connect(natsURL, natsOpts...)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	rec, ok, err := sink.ReadPositionRecord(ctx, js, bucket, scfg)
	if err != nil {
		return err
	}
	key := sink.PositionKey(scfg.Stream, scfg.SubjectPrefix)
	if !ok {
		return relay.Fatal(fmt.Errorf("prune refuses: there is no position record %s/%s, so nothing shows that slot %q is the relay's. Fix: pass the --stream, --subject-prefix and --position-bucket the relay runs with (and its --nats-url), or start the relay once; --skip-source-check prunes without the check", bucket, key, slot))
	}
	where := fmt.Sprintf("the relay feeding stream %s (record %s/%s, updated %s) last confirmed %s on slot %q of cluster %s", scfg.Stream, bucket, key, rec.UpdatedAt.UTC().Format(time.RFC3339), rec.LSN, rec.Slot, rec.SystemID)
	switch {
	case rec.SystemID != sysID:
		return relay.Fatal(fmt.Errorf("%w: prune refuses: this database is on Postgres cluster %s (system identifier), but %s. Its slot's catalog_xmin proves nothing about what the relay published. Fix: point --pg-url at the relay's database; if the database was replaced, start the relay, which refuses with this gap: accept it with --accept-slot-gap and run the backfill it names, then prune", relay.ErrSlotGap, sysID, where))
	case rec.Slot != slot:
		return relay.Fatal(fmt.Errorf("%w: prune refuses slot %q: %s. Fix: pass --slot %s, or the --stream/--subject-prefix/--position-bucket of the relay that uses slot %q", relay.ErrSlotGap, slot, where, rec.Slot, slot))
	case slotLSN > rec.LSN:
		return relay.Fatal(fmt.Errorf("%w: prune refuses: replication slot %q is at %s, ahead of what the relay recorded: %s. The slot was dropped and recreated, or advanced by someone else: rows committed in between are not in the stream and backfill needs them in the table. Fix: start the relay, which refuses with this gap; accept it with --accept-slot-gap and run the backfill it names (outbox-relay backfill --since %s), then prune", relay.ErrSlotGap, slot, slotLSN, where, relay.BackfillSince(rec.UpdatedAt)))
	}
	return nil
}
