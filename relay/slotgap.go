package relay

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
)

// ErrSlotGap: the slot is ahead of the position the relay recorded, or another slot or cluster
// feeds the stream now; events may be missing from the WAL stream.
var ErrSlotGap = errors.New("replication slot gap")

// backfillSince is the --since to propose for a gap that began at t: a margin before it, for
// clock skew between the relay and the database's created_at defaults and for transactions
// that committed late.
func backfillSince(t time.Time) string {
	return t.Add(-5 * time.Minute).UTC().Format(time.RFC3339)
}

// slotGapMessage explains a gap: what was recorded, what is found, the likely cause, the way out.
func slotGapMessage(cfg Config, rec sink.SourcePosition, key, found, cause string) string {
	return fmt.Sprintf(`%s, but this relay last confirmed %s on slot %q of cluster %s (recorded %s in %s/%s): %s. Events committed in between are not in the WAL stream and would be silently lost. Way out: restart once with Config.AcceptSlotGap, then republish the gap from the table: outbox-relay backfill Config.PGURL ... Config.NATSURL ... --since %s (ids deduplicate the overlap within the stream's duplicate window; per-aggregate order between backfilled and live events is not guaranteed)`,
		found, rec.LSN, rec.Slot, rec.SystemID, rec.UpdatedAt.UTC().Format(time.RFC3339), cfg.PositionBucket, key, cause, backfillSince(rec.UpdatedAt))
}

// slotGuard is the outcome of checkSlotGap for one session.
type slotGuard struct {
	record   *sink.PositionRecord
	recorded pglogrepl.LSN // what the record holds now
	seqFloor uint64        // stream messages up to here came from an earlier cluster or history
}

// checkSlotGap compares the slot, the server and the stream with the feed's position record at
// session start (after the slot was acquired, so that a standby never writes the record). It is
// a gap (fatal, or with Config.AcceptSlotGap logged and recorded as the new truth) when:
//   - another cluster (system identifier) or another slot feeds the stream now;
//   - the server's WAL history no longer holds the recorded position or the stream's last
//     event (a restore, a point-in-time recovery, a promoted standby that lacked the latest
//     WAL): its new transactions reuse positions the stream holds (ErrForkedHistory);
//   - the stream ends before the sequence recorded with the position: the broker lost
//     messages it had acknowledged (a power loss, a restored stream backup, a recreated stream);
//   - the slot is ahead of the record (dropped and recreated, or advanced by someone else).
//
// A slot behind the record is normal (Postgres 15 saves confirmed_flush_lsn only at
// checkpoints, so it moves back after a crash). The record ends at least at start, the
// position the session begins at.
func checkSlotGap(ctx context.Context, cfg Config, js jetstream.JetStream, record *sink.PositionRecord, sys replication.System, slotLSN, start pglogrepl.LSN, last sink.StoredMsg, haveLast bool, log zerolog.Logger) (slotGuard, error) {
	g := slotGuard{record: record}
	rec, ok, err := record.Get(ctx)
	if err != nil {
		return g, err
	}
	now := sink.SourcePosition{SystemID: sys.ID, Slot: cfg.Slot, LSN: start, Timeline: sys.Timeline, StreamSeq: last.StreamLastSeq}
	if !ok {
		if haveLast && slotLSN > last.Position.CommitLSN {
			// Stored by a relay without a record (an older version, or the bucket was
			// deleted): a slot past the last event may be continuous (keepalives move it) or
			// recreated; nothing here tells.
			log.Warn().Stringer("stream_last", last.Position).Stringer("slot_lsn", slotLSN).
				Msg("the stream holds events from an earlier run but there is no position record: the relay cannot tell whether the slot is continuous with them. If the slot was dropped or recreated since, republish the gap with outbox-relay backfill --since <the Outbox-Created-At of the stream's last message>")
		}
		log.Info().Str("bucket", cfg.PositionBucket).Str("key", record.Key()).Stringer("lsn", start).
			Msg("no position record for this stream and subject prefix: first start, recording the slot's position")
		if err := record.Put(ctx, now); err != nil {
			return g, err
		}
		g.recorded = start
		return g, nil
	}
	// The stream's last event, unless it came from an earlier cluster or history.
	liveLast := haveLast && last.Seq > rec.SeqFloor
	found, cause := "", ""
	var forkAt pglogrepl.LSN
	forked := false
	switch {
	case rec.SystemID != sys.ID:
		found = fmt.Sprintf("replication slot %q is on Postgres cluster %s (system identifier)", cfg.Slot, sys.ID)
		cause = "the database was replaced (restored, upgraded, failed over to a new cluster) or the relay points at another one; positions of two clusters do not compare"
		now.SeqFloor = last.Seq
	case !holds(sys, rec.LSN, rec.Timeline, &forkAt):
		forked = true
		found = forkMessage(sys, fmt.Sprintf("the recorded position %s (timeline %d)", rec.LSN, rec.Timeline), forkAt)
	case liveLast && !holds(sys, last.Position.CommitLSN, rec.Timeline, &forkAt):
		forked = true
		found = forkMessage(sys, fmt.Sprintf("the stream's last event %s (stream sequence %d)", last.Position, last.Seq), forkAt)
	case rec.StreamSeq > last.StreamLastSeq:
		found = fmt.Sprintf("stream %s ends at sequence %d, before sequence %d, which it held when the position was recorded", cfg.Sink.Stream, last.StreamLastSeq, rec.StreamSeq)
		cause = "the broker lost messages it had acknowledged (a power loss with the default sync_interval, a stream restored from an older backup, the stream deleted and recreated); events the relay confirmed to Postgres are missing from the stream"
		now.SeqFloor = min(rec.SeqFloor, last.StreamLastSeq)
	case rec.Slot != cfg.Slot:
		found = fmt.Sprintf("the stream is now fed from slot %q at %s", cfg.Slot, slotLSN)
		cause = "the relay was pointed at another slot"
		now.SeqFloor = rec.SeqFloor
	case slotLSN > rec.LSN:
		found = fmt.Sprintf("replication slot %q is at %s", cfg.Slot, slotLSN)
		cause = "the slot was dropped and recreated, or advanced by someone else (pg_replication_slot_advance, another consumer), while the relay was away"
		now.SeqFloor = rec.SeqFloor
	default:
		g.recorded, g.seqFloor = rec.LSN, rec.SeqFloor
		if start > rec.LSN || rec.Timeline != sys.Timeline {
			// Config.StartLSN moved ahead on purpose, or the server moved to a later timeline that
			// holds the record (a switchover, a promoted standby that had all of it).
			now.SeqFloor, now.LSN = rec.SeqFloor, max(start, rec.LSN)
			now.StreamSeq = max(rec.StreamSeq, last.StreamLastSeq)
			if err := record.Put(ctx, now); err != nil {
				return g, err
			}
			g.recorded = now.LSN
		}
		return g, nil
	}
	var msg string
	if forked {
		// Everything the stream holds now is from the old history: the new one's events are
		// all published, whatever their positions.
		now.SeqFloor = max(rec.SeqFloor, last.Seq)
		note := forkedEventsNote(ctx, js, cfg.Sink, forkAt, rec.SeqFloor, last.Seq)
		msg = fmt.Sprintf("%s.%s This relay last confirmed %s on slot %q (recorded %s in %s/%s). Way out: restart once with Config.AcceptSlotGap (the relay then publishes the new history from the slot's position %s, ignoring the stream's older positions); if the slot was recreated after the fork, republish what was committed before it: outbox-relay backfill Config.PGURL ... Config.NATSURL ... --since %s",
			found, note, rec.LSN, rec.Slot, rec.UpdatedAt.UTC().Format(time.RFC3339), cfg.PositionBucket, record.Key(), slotLSN, backfillSince(rec.UpdatedAt))
		if !cfg.AcceptSlotGap {
			return g, fatalError{fmt.Errorf("%w: %s", ErrForkedHistory, msg)}
		}
	} else {
		msg = slotGapMessage(cfg, rec, record.Key(), found, cause)
		if !cfg.AcceptSlotGap {
			return g, fatalError{fmt.Errorf("%w: %s", ErrSlotGap, msg)}
		}
	}
	log.Warn().Str("gap", msg).Str("backfill", "outbox-relay backfill --since "+backfillSince(rec.UpdatedAt)).
		Msg("Config.AcceptSlotGap: continuing past a slot gap; events committed in it are NOT relayed from the WAL: run the backfill command")
	if err := record.Put(ctx, now); err != nil {
		return g, err
	}
	g.recorded, g.seqFloor = start, now.SeqFloor
	return g, nil
}

// holds is sys.Holds writing the fork point to forkAt.
func holds(sys replication.System, pos pglogrepl.LSN, tli int32, forkAt *pglogrepl.LSN) bool {
	at, ok := sys.Holds(pos, tli)
	*forkAt = at
	return ok
}

// startRecorder runs a Recorder of trk's position into the session's record until stop is
// called (after the session's final status update).
func startRecorder(cfg Config, trk *checkpoint.Tracker, guard slotGuard, log zerolog.Logger) (rec *checkpoint.Recorder, stop func()) {
	rec = checkpoint.NewRecorder(trk, guard.record, guard.recorded)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var warned time.Time
	go func() {
		defer close(done)
		rec.Run(ctx, cfg.Replication.FlushInterval, func(err error) {
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

// openRecord opens the position record for a session, before START_REPLICATION: a bucket
// that does not answer then fails the session before it holds the slot (and before the
// walsender, which expects status updates, waits on it).
func openRecord(ctx context.Context, cfg Config, js jetstream.JetStream) (*sink.PositionRecord, error) {
	octx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	record, err := sink.OpenPositionRecord(octx, js, cfg.PositionBucket, cfg.Sink)
	if err != nil {
		return nil, bucketError(js, cfg.PositionBucket, err)
	}
	return record, nil
}

// bucketError classifies an error opening the position bucket: the broker or its cluster not
// available (yet) is retried by the session loop; anything else (the server denied the relay's
// user, refused the bucket's configuration) is fatal, with the fix OpenPositionRecord names.
func bucketError(js jetstream.JetStream, bucket string, err error) error {
	// A publish permission violation reaches a request only as a timeout; the connection
	// keeps the server's message.
	if nc := js.Conn(); nc != nil {
		if last := nc.LastError(); errors.Is(last, nats.ErrPermissionViolation) && strings.Contains(last.Error(), "KV_"+bucket) {
			return fatalError{fmt.Errorf("%w (the server reported: %v)", err, last)}
		}
	}
	if jsUnavailable(err) {
		return err
	}
	return fatalError{err}
}

// JetStream error codes of a cluster that is not available (yet); nats.go names none of them.
const (
	jsErrCodeClusterIncomplete jetstream.ErrorCode = 10004 // incomplete results
	jsErrCodeClusterNoPeers    jetstream.ErrorCode = 10005 // no suitable peers for placement (nodes down)
	jsErrCodeClusterNotAvail   jetstream.ErrorCode = 10008 // JetStream system temporarily unavailable
	jsErrCodeClusterNotLeader  jetstream.ErrorCode = 10009 // JetStream cluster can not handle request
	jsErrCodeStreamOffline     jetstream.ErrorCode = 10118 // stream is offline
)

// jsUnavailable reports a JetStream error that passes by itself: no answer in time, no
// responders, the connection being re-established, or the cluster, its meta leader or the
// asset's leader not available.
func jsUnavailable(err error) bool {
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout),
		errors.Is(err, nats.ErrNoResponders), errors.Is(err, jetstream.ErrNoStreamResponse),
		errors.Is(err, nats.ErrDisconnected), errors.Is(err, nats.ErrConnectionReconnecting):
		return true
	}
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		switch apiErr.ErrorCode {
		case jsErrCodeClusterIncomplete, jsErrCodeClusterNoPeers, jsErrCodeClusterNotAvail, jsErrCodeClusterNotLeader, jsErrCodeStreamOffline:
			return true
		}
	}
	return false
}
