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

// gapInput is what the slot-gap rule compares at session start: the slot's state, the feed's
// position record, the stream's last message and the server's identity (WAL end, timeline).
type gapInput struct {
	Slot    string        // the slot this relay reads (Config.Slot)
	SlotLSN pglogrepl.LSN // the slot's confirmed_flush_lsn
	Start   pglogrepl.LSN // the position the session begins at
	Stream  string        // the stream's name, for messages

	Record     sink.SourcePosition
	HaveRecord bool
	// OtherRecorded: another stream of the relay (Config.Tables) has a position record, so a
	// record missing for this one was lost, not yet written.
	OtherRecorded bool

	Last     sink.StoredMsg
	HaveLast bool

	Sys replication.System
}

// gapKind names what decideSlotGap found.
type gapKind int

const (
	gapNone          gapKind = iota // the slot continues the record
	gapFirstStart                   // no record: first start
	gapOtherCluster                 // another Postgres cluster feeds the stream
	gapForkedRecord                 // the server's history no longer holds the recorded position
	gapForkedLast                   // ... or the stream's last event
	gapStreamLost                   // the stream ends before the recorded sequence
	gapOtherSlot                    // another slot feeds the stream
	gapSlotAhead                    // the slot is ahead of the record
	gapRecordMissing                // no record for this stream, while another stream has one
)

// gapDecision is decideSlotGap's verdict, with its reason.
type gapDecision struct {
	Kind gapKind
	// Found and Cause explain a gap (Found alone for a fork, whose cause forkMessage tells).
	Found, Cause string
	ForkAt       pglogrepl.LSN // for gapForkedRecord and gapForkedLast
	// Next is the record to write: on a first start, on an accepted gap, or (Write) when the
	// session moves a continuous record (Config.StartLSN ahead, a later timeline).
	Next  sink.SourcePosition
	Write bool
	// UnknownContinuity: no record, and the stream holds events from an earlier run the slot
	// is past; nothing tells whether the slot is continuous with them.
	UnknownContinuity bool
}

// Gap reports whether the decision is a gap (fatal unless Config.AcceptSlotGap).
func (d gapDecision) Gap() bool { return d.Kind != gapNone && d.Kind != gapFirstStart }

// Forked reports whether the gap is a forked WAL history (ErrForkedHistory).
func (d gapDecision) Forked() bool { return d.Kind == gapForkedRecord || d.Kind == gapForkedLast }

// decideSlotGap is the slot-gap rule (see checkSlotGap), without I/O. It is a gap when:
//   - another cluster (system identifier) or another slot feeds the stream now;
//   - the server's WAL history no longer holds the recorded position or the stream's last
//     event (a restore, a point-in-time recovery, a promoted standby that lacked the latest
//     WAL): its new transactions reuse positions the stream holds (ErrForkedHistory);
//   - the stream ends before the sequence recorded with the position: the broker lost
//     messages it had acknowledged (a power loss, a restored stream backup, a recreated stream);
//   - the slot is ahead of the record (dropped and recreated, or advanced by someone else).
//
// A slot behind the record is normal (Postgres 15 saves confirmed_flush_lsn only at
// checkpoints, so it moves back after a crash). The record ends at least at Start.
func decideSlotGap(in gapInput) gapDecision {
	sys, rec, last := in.Sys, in.Record, in.Last
	now := sink.SourcePosition{SystemID: sys.ID, Slot: in.Slot, LSN: in.Start, Timeline: sys.Timeline, StreamSeq: last.StreamLastSeq}
	if !in.HaveRecord {
		d := gapDecision{Kind: gapFirstStart, Next: now, Write: true,
			UnknownContinuity: in.HaveLast && in.SlotLSN > last.Position.CommitLSN}
		if d.UnknownContinuity && in.OtherRecorded {
			// The relay keeps records (another stream has one) and this stream holds its
			// events, but its record is gone: nothing shows the slot continues them.
			d.Kind = gapRecordMissing
			d.Found = fmt.Sprintf("stream %s holds the relay's events up to %s and replication slot %q is at %s, but the stream's position record is missing while another stream of the relay has one", in.Stream, last.Position, in.Slot, in.SlotLSN)
			d.Cause = "the record was deleted (or the bucket restored without it); nothing shows the slot did not move past events of this stream meanwhile"
		}
		return d
	}
	// The stream's last event, unless it came from an earlier cluster or history.
	liveLast := in.HaveLast && last.Seq > rec.SeqFloor
	d := gapDecision{}
	recForkAt, recHeld := sys.Holds(rec.LSN, rec.Timeline)
	lastForkAt, lastHeld := pglogrepl.LSN(0), true
	if liveLast {
		lastForkAt, lastHeld = sys.Holds(last.Position.CommitLSN, rec.Timeline)
	}
	switch {
	case rec.SystemID != sys.ID:
		d.Kind = gapOtherCluster
		d.Found = fmt.Sprintf("replication slot %q is on Postgres cluster %s (system identifier)", in.Slot, sys.ID)
		d.Cause = "the database was replaced (restored, upgraded, failed over to a new cluster) or the relay points at another one; positions of two clusters do not compare"
		now.SeqFloor = last.Seq
	case !recHeld:
		d.Kind, d.ForkAt = gapForkedRecord, recForkAt
		d.Found = forkMessage(sys, fmt.Sprintf("the recorded position %s (timeline %d)", rec.LSN, rec.Timeline), recForkAt)
	case !lastHeld:
		d.Kind, d.ForkAt = gapForkedLast, lastForkAt
		d.Found = forkMessage(sys, fmt.Sprintf("the stream's last event %s (stream sequence %d)", last.Position, last.Seq), lastForkAt)
	case rec.StreamSeq > last.StreamLastSeq:
		d.Kind = gapStreamLost
		d.Found = fmt.Sprintf("stream %s ends at sequence %d, before sequence %d, which it held when the position was recorded", in.Stream, last.StreamLastSeq, rec.StreamSeq)
		d.Cause = "the broker lost messages it had acknowledged (a power loss with the default sync_interval, a stream restored from an older backup, the stream deleted and recreated); events the relay confirmed to Postgres are missing from the stream"
		now.SeqFloor = min(rec.SeqFloor, last.StreamLastSeq)
	case rec.Slot != in.Slot:
		d.Kind = gapOtherSlot
		d.Found = fmt.Sprintf("the stream is now fed from slot %q at %s", in.Slot, in.SlotLSN)
		d.Cause = "the relay was pointed at another slot"
		now.SeqFloor = rec.SeqFloor
	case in.SlotLSN > rec.LSN:
		d.Kind = gapSlotAhead
		d.Found = fmt.Sprintf("replication slot %q is at %s", in.Slot, in.SlotLSN)
		d.Cause = "the slot was dropped and recreated, or advanced by someone else (pg_replication_slot_advance, another consumer), while the relay was away"
		now.SeqFloor = rec.SeqFloor
	default:
		d.Kind = gapNone
		if in.Start > rec.LSN || rec.Timeline != sys.Timeline {
			// Config.StartLSN moved ahead on purpose, or the server moved to a later timeline that
			// holds the record (a switchover, a promoted standby that had all of it).
			now.SeqFloor, now.LSN = rec.SeqFloor, max(in.Start, rec.LSN)
			now.StreamSeq = max(rec.StreamSeq, last.StreamLastSeq)
			d.Next, d.Write = now, true
		}
		return d
	}
	if d.Forked() {
		// Everything the stream holds now is from the old history: the new one's events are
		// all published, whatever their positions.
		now.SeqFloor = max(rec.SeqFloor, last.Seq)
	}
	d.Next, d.Write = now, true
	return d
}

// checkSlotGap compares the slot, the server and the stream with the feed's position record at
// session start (after the slot was acquired, so that a standby never writes the record), by
// decideSlotGap. A gap is fatal, or with Config.AcceptSlotGap logged and recorded as the new
// truth.
// The record was opened by openRecord before START_REPLICATION.
// otherRecorded: another stream of the relay has a record.
func checkSlotGap(ctx context.Context, cfg Config, js jetstream.JetStream, record *sink.PositionRecord, sys replication.System, slotLSN, start pglogrepl.LSN, last sink.StoredMsg, haveLast, otherRecorded bool, log zerolog.Logger) (slotGuard, error) {
	g := slotGuard{record: record}
	rec, ok, err := record.Get(ctx)
	if err != nil {
		return g, err
	}
	d := decideSlotGap(gapInput{Slot: cfg.Slot, SlotLSN: slotLSN, Start: start, Stream: cfg.Sink.Stream,
		Record: rec, HaveRecord: ok, OtherRecorded: otherRecorded, Last: last, HaveLast: haveLast, Sys: sys})
	switch d.Kind {
	case gapFirstStart:
		if d.UnknownContinuity {
			// Stored by a relay without a record (an older version, or the bucket was
			// deleted): a slot past the last event may be continuous (keepalives move it) or
			// recreated; nothing here tells.
			log.Warn().Stringer("stream_last", last.Position).Stringer("slot_lsn", slotLSN).
				Msg("the stream holds events from an earlier run but there is no position record: the relay cannot tell whether the slot is continuous with them. If the slot was dropped or recreated since, republish the gap with outbox-relay backfill --since <the Outbox-Created-At of the stream's last message>")
		}
		log.Info().Str("bucket", cfg.PositionBucket).Str("key", record.Key()).Stringer("lsn", start).
			Msg("no position record for this stream and subject prefix: first start, recording the slot's position")
		if err := record.Put(ctx, d.Next); err != nil {
			return g, err
		}
		g.recorded = start
		return g, nil
	case gapNone:
		g.recorded, g.seqFloor = rec.LSN, rec.SeqFloor
		if d.Write {
			if err := record.Put(ctx, d.Next); err != nil {
				return g, err
			}
			g.recorded = d.Next.LSN
		}
		return g, nil
	}
	var msg string
	if d.Kind == gapRecordMissing {
		msg = fmt.Sprintf("%s: %s. Events committed in between may be missing from the stream. Way out: restart once with Config.AcceptSlotGap, then republish from the stream's last event on: outbox-relay backfill Config.PGURL ... Config.NATSURL ... --table <the stream's table> --since <the Outbox-Created-At of the stream's last message, minus a margin>",
			d.Found, d.Cause)
		if !cfg.AcceptSlotGap {
			return g, fatalError{fmt.Errorf("%w: %s", ErrSlotGap, msg)}
		}
		rec.UpdatedAt = time.Now()
	} else if d.Forked() {
		note := forkedEventsNote(ctx, js, cfg.Sink, d.ForkAt, rec.SeqFloor, last.Seq)
		msg = fmt.Sprintf("%s.%s This relay last confirmed %s on slot %q (recorded %s in %s/%s). Way out: restart once with Config.AcceptSlotGap (the relay then publishes the new history from the slot's position %s, ignoring the stream's older positions); if the slot was recreated after the fork, republish what was committed before it: outbox-relay backfill Config.PGURL ... Config.NATSURL ... --since %s",
			d.Found, note, rec.LSN, rec.Slot, rec.UpdatedAt.UTC().Format(time.RFC3339), cfg.PositionBucket, record.Key(), slotLSN, backfillSince(rec.UpdatedAt))
		if !cfg.AcceptSlotGap {
			return g, fatalError{fmt.Errorf("%w: %s", ErrForkedHistory, msg)}
		}
	} else {
		msg = slotGapMessage(cfg, rec, record.Key(), d.Found, d.Cause)
		if !cfg.AcceptSlotGap {
			return g, fatalError{fmt.Errorf("%w: %s", ErrSlotGap, msg)}
		}
	}
	log.Warn().Str("gap", msg).Str("backfill", "outbox-relay backfill --since "+backfillSince(rec.UpdatedAt)).
		Msg("Config.AcceptSlotGap: continuing past a slot gap; events committed in it are NOT relayed from the WAL: run the backfill command")
	if err := record.Put(ctx, d.Next); err != nil {
		return g, err
	}
	g.recorded, g.seqFloor = start, d.Next.SeqFloor
	return g, nil
}

// startRecorder runs a Recorder of src's position (the Tracker's, or the recorder of another
// stream) into the stream's record until stop is called (after the session's final status
// update).
func startRecorder(cfg Config, src checkpoint.FlushSource, guard slotGuard, log zerolog.Logger) (rec *checkpoint.Recorder, stop func()) {
	rec = checkpoint.NewRecorder(src, guard.record, guard.recorded)
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
// responders, the connection being re-established (sink.Connect keeps no reconnect buffer, so a
// request meanwhile fails with ErrReconnectBufExceeded), or the cluster, its meta leader or the
// asset's leader not available.
func jsUnavailable(err error) bool {
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout),
		errors.Is(err, nats.ErrNoResponders), errors.Is(err, jetstream.ErrNoStreamResponse),
		errors.Is(err, nats.ErrDisconnected), errors.Is(err, nats.ErrConnectionReconnecting),
		errors.Is(err, nats.ErrReconnectBufExceeded): // a request while disconnected (no reconnect buffer)
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
