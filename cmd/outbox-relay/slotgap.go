package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/sink"
)

// errSlotGap: the slot is ahead of the position the relay recorded, or another slot or cluster
// feeds the stream now; events may be missing from the WAL stream.
var errSlotGap = errors.New("replication slot gap")

// backfillSince is the --since to propose for a gap that began at t: a margin before it, for
// clock skew between the relay and the database's created_at defaults and for transactions
// that committed late.
func backfillSince(t time.Time) string {
	return t.Add(-5 * time.Minute).UTC().Format(time.RFC3339)
}

// slotGapMessage explains a gap: what was recorded, what is found, the likely cause, the way out.
func slotGapMessage(cfg runConfig, rec sink.SourcePosition, key, found, cause string) string {
	return fmt.Sprintf(`%s, but this relay last confirmed %s on slot %q of cluster %s (recorded %s in %s/%s): %s. Events committed in between are not in the WAL stream and would be silently lost. Way out: restart once with --accept-slot-gap, then republish the gap from the table: outbox-relay backfill --pg-url ... --nats-url ... --since %s (ids deduplicate the overlap within the stream's duplicate window; per-aggregate order between backfilled and live events is not guaranteed)`,
		found, rec.LSN, rec.Slot, rec.SystemID, rec.UpdatedAt.UTC().Format(time.RFC3339), cfg.positionBucket, key, cause, backfillSince(rec.UpdatedAt))
}

// slotGuard is the outcome of checkSlotGap for one session.
type slotGuard struct {
	record   *sink.PositionRecord
	recorded pglogrepl.LSN // what the record holds now
	seqFloor uint64        // stream messages up to here came from an earlier cluster
}

// checkSlotGap compares the slot with the feed's position record at session start (after the
// slot was acquired, so that a standby never writes the record). A slot ahead of the record,
// another slot, or another cluster (system identifier) is a gap: fatal, or with
// --accept-slot-gap logged and recorded as the new truth. A slot behind the record is normal
// (Postgres 15 saves confirmed_flush_lsn only at checkpoints, so it moves back after a crash).
// The record ends at least at start, the position the session begins at.
func checkSlotGap(ctx context.Context, cfg runConfig, js jetstream.JetStream, systemID string, slotLSN, start pglogrepl.LSN, last sink.Position, lastSeq uint64, log zerolog.Logger) (slotGuard, error) {
	record, err := sink.OpenPositionRecord(ctx, js, cfg.positionBucket, cfg.sink)
	if err != nil {
		return slotGuard{}, fatalError{err}
	}
	g := slotGuard{record: record}
	rec, ok, err := record.Get(ctx)
	if err != nil {
		return g, err
	}
	now := sink.SourcePosition{SystemID: systemID, Slot: cfg.slot, LSN: start}
	if !ok {
		if lastSeq > 0 && slotLSN > last.CommitLSN {
			// Stored by a relay without a record (an older version, or the bucket was
			// deleted): a slot past the last event may be continuous (keepalives move it) or
			// recreated; nothing here tells.
			log.Warn().Stringer("stream_last", last).Stringer("slot_lsn", slotLSN).
				Msg("the stream holds events from an earlier run but there is no position record: the relay cannot tell whether the slot is continuous with them. If the slot was dropped or recreated since, republish the gap with outbox-relay backfill --since <the Outbox-Created-At of the stream's last message>")
		}
		log.Info().Str("bucket", cfg.positionBucket).Str("key", record.Key()).Stringer("lsn", start).
			Msg("no position record for this stream and subject prefix: first start, recording the slot's position")
		if err := record.Put(ctx, now); err != nil {
			return g, err
		}
		g.recorded = start
		return g, nil
	}
	found, cause := "", ""
	switch {
	case rec.SystemID != systemID:
		found = fmt.Sprintf("replication slot %q is on Postgres cluster %s (system identifier)", cfg.slot, systemID)
		cause = "the database was replaced (restored, upgraded, failed over to a new cluster) or the relay points at another one; positions of two clusters do not compare"
		now.SeqFloor = lastSeq
	case rec.Slot != cfg.slot:
		found = fmt.Sprintf("the stream is now fed from slot %q at %s", cfg.slot, slotLSN)
		cause = "the relay was pointed at another slot"
		now.SeqFloor = rec.SeqFloor
	case slotLSN > rec.LSN:
		found = fmt.Sprintf("replication slot %q is at %s", cfg.slot, slotLSN)
		cause = "the slot was dropped and recreated, or advanced by someone else (pg_replication_slot_advance, another consumer), while the relay was away"
		now.SeqFloor = rec.SeqFloor
	default:
		g.recorded, g.seqFloor = rec.LSN, rec.SeqFloor
		if start > rec.LSN { // --start-lsn moved ahead on purpose
			now.SeqFloor = rec.SeqFloor
			if err := record.Put(ctx, now); err != nil {
				return g, err
			}
			g.recorded = start
		}
		return g, nil
	}
	msg := slotGapMessage(cfg, rec, record.Key(), found, cause)
	if !cfg.acceptSlotGap {
		return g, fatalError{fmt.Errorf("%w: %s", errSlotGap, msg)}
	}
	log.Warn().Str("gap", msg).Str("backfill", "outbox-relay backfill --since "+backfillSince(rec.UpdatedAt)).
		Msg("--accept-slot-gap: continuing past a slot gap; events committed in it are NOT relayed from the WAL: run the backfill command")
	if err := record.Put(ctx, now); err != nil {
		return g, err
	}
	g.recorded, g.seqFloor = start, now.SeqFloor
	return g, nil
}

// startRecorder runs a Recorder of trk's position into the session's record until stop is
// called (after the session's final status update).
func startRecorder(cfg runConfig, trk *checkpoint.Tracker, guard slotGuard, log zerolog.Logger) (rec *checkpoint.Recorder, stop func()) {
	rec = checkpoint.NewRecorder(trk, guard.record, guard.recorded)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var warned time.Time
	go func() {
		defer close(done)
		rec.Run(ctx, cfg.repl.FlushInterval, func(err error) {
			cfg.obs.recordFailed()
			if time.Since(warned) >= 10*time.Second {
				warned = time.Now()
				log.Warn().Err(err).Msg("recording the position failed; Postgres is not told of newer positions until it succeeds")
			}
		})
	}()
	cfg.obs.setRecorder(rec)
	return rec, func() { cancel(); <-done }
}
