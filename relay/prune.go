package relay

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/outbox-relay/outbox-relay/sink"
)

// PruneOptions say which published rows Prune deletes.
type PruneOptions struct {
	OlderThan       time.Duration // rows whose Config.Columns.CreatedAt is older than this (required)
	Batch           int           // rows deleted per transaction
	DryRun          bool          // count the rows that would be deleted, delete nothing
	SkipSourceCheck bool          // do not compare the slot with the relay's position record
}

// PruneResult says what Prune did.
type PruneResult struct {
	Table       string // the table, quoted
	CatalogXmin string // the slot's catalog_xmin: rows of transactions before it are published
	Counted     bool   // DryRun: Deleted is the number of rows that would be deleted
	Pruned      bool   // the deletes ran; Deleted rows were deleted
	Deleted     int64
	Kept        int64 // rows older than the cutoff kept: not yet behind catalog_xmin
}

// Prune deletes published outbox rows older than p.OlderThan, in batches.
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
// first compares the slot with the relay's position record (checkSourceSlot) unless
// p.SkipSourceCheck.
func Prune(ctx context.Context, cfg Config, p PruneOptions, opts ...Option) (PruneResult, error) {
	var res PruneResult
	o := newOptions(opts)
	log := o.log
	if p.OlderThan <= 0 || p.Batch < 1 {
		return res, configErr("PruneOptions.OlderThan must be positive and PruneOptions.Batch at least 1")
	}
	if cfg.PositionBucket == "" && !p.SkipSourceCheck {
		return res, configErr("Config.PositionBucket '' leaves prune nothing to check the slot against: pass PruneOptions.SkipSourceCheck to prune without the check")
	}
	cfg, err := cfg.resolve()
	if err != nil {
		return res, err
	}
	if err := cfg.oneTable("prune"); err != nil {
		return res, err
	}
	if cfg.Columns.CreatedAt == "" {
		return res, configErr("prune selects rows by Config.Columns.CreatedAt, which must name a column")
	}
	conn, err := ConnectPG(ctx, cfg.PGURL)
	if err != nil {
		return res, err
	}
	defer conn.Close(context.Background())

	var (
		catalogXmin *string
		confirmed   *string
		sysID       string
	)
	err = conn.QueryRow(ctx, `SELECT catalog_xmin::text, confirmed_flush_lsn::text, (SELECT system_identifier::text FROM pg_control_system())
		FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()`, cfg.Slot).Scan(&catalogXmin, &confirmed, &sysID)
	if errors.Is(err, pgx.ErrNoRows) {
		return res, fatalError{fmt.Errorf("replication slot %q does not exist in this database: prune deletes only rows the relay's slot has confirmed; pass the relay's Config.Slot", cfg.Slot)}
	}
	if err != nil {
		return res, fmt.Errorf("read slot %q: %w", cfg.Slot, err)
	}
	if catalogXmin == nil {
		return res, fatalError{fmt.Errorf("replication slot %q has no catalog_xmin (not a logical slot, or invalidated): nothing can be proven published", cfg.Slot)}
	}
	if p.SkipSourceCheck {
		log.Warn().Str("slot", cfg.Slot).Msg("PruneOptions.SkipSourceCheck: the slot is not compared with the relay's position record; if it is not the relay's, or skipped events, rows that were never published are deleted")
	} else {
		var slotLSN pglogrepl.LSN
		if confirmed != nil {
			if slotLSN, err = pglogrepl.ParseLSN(*confirmed); err != nil {
				return res, fmt.Errorf("read slot %q: %w", cfg.Slot, err)
			}
		}
		if err := checkSourceSlot(ctx, cfg, sysID, slotLSN); err != nil {
			return res, err
		}
	}
	ident := pgx.Identifier{cfg.Schema, cfg.Table}.Sanitize()
	cutoff := time.Now().Add(-p.OlderThan)
	// xmin precedes the horizon: age() counts back from the next xid with wraparound, so the
	// older transaction has the larger age; frozen rows have the largest.
	createdAt := pgx.Identifier{cfg.Columns.CreatedAt}.Sanitize()
	where := createdAt + ` < $1 AND age(xmin) > age($2::text::xid)`
	res.Table, res.CatalogXmin = ident, *catalogXmin
	kept := func() (PruneResult, error) {
		if err := conn.QueryRow(ctx, fmt.Sprintf(`SELECT count(*) FROM %s WHERE %s < $1 AND NOT (age(xmin) > age($2::text::xid))`, ident, createdAt), cutoff, *catalogXmin).Scan(&res.Kept); err != nil {
			return res, fmt.Errorf("count the rows kept in %s: %w", ident, err)
		}
		return res, nil
	}
	log.Info().Str("table", cfg.Schema+"."+cfg.Table).Time("cutoff", cutoff).Str("slot_catalog_xmin", *catalogXmin).Msg("pruning")
	if p.DryRun {
		if err := conn.QueryRow(ctx, fmt.Sprintf(`SELECT count(*) FROM %s WHERE %s`, ident, where), cutoff, *catalogXmin).Scan(&res.Deleted); err != nil {
			return res, fmt.Errorf("count rows to prune in %s: %w", ident, err)
		}
		res.Counted = true
		return kept()
	}
	del := fmt.Sprintf(`DELETE FROM %s WHERE ctid = ANY (ARRAY(SELECT ctid FROM %s WHERE %s LIMIT $3))`, ident, ident, where)
	start := time.Now()
	for ctx.Err() == nil {
		tag, err := conn.Exec(ctx, del, cutoff, *catalogXmin, p.Batch)
		if err != nil {
			return res, fmt.Errorf("delete from %s after %d rows: %w", ident, res.Deleted, err)
		}
		res.Deleted += tag.RowsAffected()
		log.Debug().Int64("deleted", tag.RowsAffected()).Int64("total", res.Deleted).Msg("batch")
		if tag.RowsAffected() < int64(p.Batch) {
			break
		}
	}
	log.Info().Int64("deleted", res.Deleted).Dur("took", time.Since(start)).Msg("pruned")
	res.Pruned = true
	if ctx.Err() != nil {
		return res, ctx.Err()
	}
	return kept()
}

// checkSourceSlot refuses a slot that is not the relay's recorded source: the position record
// of scfg's stream and subject prefix must exist, name this cluster and this slot, and the
// slot must not be ahead of the recorded position (a slot gap the relay has not accepted: rows
// committed in it are not in the stream, and backfill needs them in the table).
func checkSourceSlot(ctx context.Context, cfg Config, sysID string, slotLSN pglogrepl.LSN) error {
	bucket, scfg, slot := cfg.PositionBucket, cfg.Sink, cfg.Slot
	nc, err := sink.Connect(cfg.NATSURL, cfg.NATSOptions...)
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
		return fatalError{fmt.Errorf("prune refuses: there is no position record %s/%s, so nothing shows that slot %q is the relay's. Fix: pass the Config.Sink.Stream, Config.Sink.SubjectPrefix and Config.PositionBucket the relay runs with (and its Config.NATSURL), or start the relay once; PruneOptions.SkipSourceCheck prunes without the check", bucket, key, slot)}
	}
	where := fmt.Sprintf("the relay feeding stream %s (record %s/%s, updated %s) last confirmed %s on slot %q of cluster %s", scfg.Stream, bucket, key, rec.UpdatedAt.UTC().Format(time.RFC3339), rec.LSN, rec.Slot, rec.SystemID)
	switch {
	case rec.SystemID != sysID:
		return fatalError{fmt.Errorf("%w: prune refuses: this database is on Postgres cluster %s (system identifier), but %s. Its slot's catalog_xmin proves nothing about what the relay published. Fix: point Config.PGURL at the relay's database; if the database was replaced, start the relay, which refuses with this gap: accept it with Config.AcceptSlotGap and run the backfill it names, then prune", ErrSlotGap, sysID, where)}
	case rec.Slot != slot:
		return fatalError{fmt.Errorf("%w: prune refuses slot %q: %s. Fix: pass Config.Slot %s, or the Config.Sink.Stream/Config.Sink.SubjectPrefix/Config.PositionBucket of the relay that uses slot %q", ErrSlotGap, slot, where, rec.Slot, slot)}
	case slotLSN > rec.LSN:
		return fatalError{fmt.Errorf("%w: prune refuses: replication slot %q is at %s, ahead of what the relay recorded: %s. The slot was dropped and recreated, or advanced by someone else: rows committed in between are not in the stream and backfill needs them in the table. Fix: start the relay, which refuses with this gap; accept it with Config.AcceptSlotGap and run the backfill it names (outbox-relay backfill --since %s), then prune", ErrSlotGap, slot, slotLSN, where, backfillSince(rec.UpdatedAt))}
	}
	return nil
}
