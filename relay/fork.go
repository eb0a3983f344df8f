package relay

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
)

// ErrForkedHistory: the Postgres server's WAL history no longer holds a position the relay saw
// (restored from a snapshot or backup, recovered to a point in time, failed over to a standby
// that lacked the latest WAL). Its new transactions reuse positions the stream already holds.
// It is a kind of slot gap: Config.AcceptSlotGap accepts it.
var ErrForkedHistory = fmt.Errorf("%w: forked WAL history", ErrSlotGap)

// resumePoint is the highest position the relay confirmed in this process, with the server
// (system identifier, timeline) it was confirmed on; sessions after the first start there.
type resumePoint struct {
	lsn      pglogrepl.LSN
	systemID string // "" for Config.StartLSN, set by the first session
	timeline int32  // 0: not known
	// seqFloor: without a position record, messages of a stream (by name) up to this sequence
	// came from a forked history accepted in this process (Config.AcceptSlotGap).
	seqFloor map[string]uint64
}

func (r resumePoint) String() string { return r.lsn.String() }

// advance moves the point to lsn, confirmed on sys.
func (r *resumePoint) advance(lsn pglogrepl.LSN, sys replication.System) {
	if lsn > r.lsn {
		r.lsn = lsn
	}
	r.systemID, r.timeline = sys.ID, sys.Timeline
}

// check compares the point with the server a new session reached. A server whose history no
// longer holds it forked; with Config.AcceptSlotGap the point is dropped (the session starts at
// the slot's position), otherwise the error is fatal.
func (r *resumePoint) check(cfg Config, sys replication.System, log zerolog.Logger) error {
	kind, forkAt := r.decide(sys)
	switch kind {
	case gapNone:
		return nil
	case gapOtherCluster:
		err := fmt.Errorf("%w: this relay confirmed %s on Postgres cluster %s, and the server it reconnected to is cluster %s (system identifier): the database was replaced while the relay ran, and positions of two clusters do not compare. Way out: restart the relay (its position record then tells the cause and the backfill to run)",
			ErrSlotGap, r.lsn, r.systemID, sys.ID)
		return fatalError{err}
	}
	msg := forkMessage(sys, fmt.Sprintf("position %s, which this relay confirmed on timeline %d before it reconnected", r.lsn, r.timeline), forkAt) +
		". Way out: restart the relay (it reports what the stream holds from the lost transactions), then restart once with Config.AcceptSlotGap: the relay publishes the new history from the slot's position"
	if !cfg.AcceptSlotGap {
		return fatalError{fmt.Errorf("%w: %s", ErrForkedHistory, msg)}
	}
	log.Warn().Str("fork", msg).Msg("Config.AcceptSlotGap: not resuming from the position confirmed before the fork; starting from the slot's position")
	*r = resumePoint{seqFloor: r.seqFloor}
	return nil
}

// decide is the slot-gap rule for the point, without I/O: gapNone, gapOtherCluster (the
// server is another cluster than the one the point was confirmed on), or gapForkedRecord (its
// history no longer holds the point; the histories part at or before forkAt).
func (r resumePoint) decide(sys replication.System) (kind gapKind, forkAt pglogrepl.LSN) {
	if r.lsn == 0 {
		return gapNone, 0
	}
	if r.systemID != "" && r.systemID != sys.ID {
		return gapOtherCluster, 0
	}
	if at, ok := sys.Holds(r.lsn, r.timeline); !ok {
		return gapForkedRecord, at
	}
	return gapNone, 0
}

// forkMessage explains a forked history: what the server no longer holds, where it stands, the
// likely causes, and what follows.
func forkMessage(sys replication.System, what string, forkAt pglogrepl.LSN) string {
	where := fmt.Sprintf("its WAL ends at %s on timeline %d", sys.WALEnd, sys.Timeline)
	if len(sys.History) > 0 {
		sw := sys.History[len(sys.History)-1]
		where += fmt.Sprintf(", which began at %s when timeline %d ended", sw.SwitchPoint, sw.Timeline)
	}
	return fmt.Sprintf("the Postgres server's WAL history no longer holds %s (%s; the histories part at or before %s). Cause: the database was restored from a snapshot or backup, recovered to a point in time, or failed over to a standby that lacked the latest WAL. Its new transactions reuse positions the stream already holds and would be silently skipped as already published",
		what, where, forkAt)
}

// forkedEvents counts the relay's live events in the stream past forkAt (stream sequences above
// floor): published from transactions the server's history does not have, as far as it tells
// (forkAt may be an upper bound, so the count is a lower bound). It reads at most limit
// messages back from the stream's end; capped reports that it stopped there.
func forkedEvents(ctx context.Context, js jetstream.JetStream, cfg sink.Config, forkAt pglogrepl.LSN, floor, lastSeq uint64, limit int) (n int, first, last uint64, capped bool, err error) {
	s, err := js.Stream(ctx, cfg.Stream)
	if err != nil {
		return 0, 0, 0, false, err
	}
	prefix := cfg.SubjectPrefix + "."
	for seq := lastSeq; seq > floor && seq > 0; seq-- {
		if limit--; limit < 0 {
			return n, first, last, true, nil
		}
		m, err := s.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue // deleted, or removed by the stream's limits
		}
		if err != nil {
			return n, first, last, false, err
		}
		if !strings.HasPrefix(m.Subject, prefix) || m.Header.Get(sink.HeaderBackfill) != "" {
			continue
		}
		lsn, err := pglogrepl.ParseLSN(m.Header.Get(sink.HeaderCommitLSN))
		if err != nil {
			continue
		}
		if lsn <= forkAt {
			break
		}
		n++
		if last == 0 {
			last = seq
		}
		first = seq
	}
	return n, first, last, false, nil
}

// forkedEventsNote is the sentence of a fork message on the events the stream holds from
// transactions the server's history lost.
func forkedEventsNote(ctx context.Context, js jetstream.JetStream, cfg sink.Config, forkAt pglogrepl.LSN, floor, lastSeq uint64) string {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	n, first, last, capped, err := forkedEvents(cctx, js, cfg, forkAt, floor, lastSeq, 100_000)
	switch {
	case err != nil:
		return fmt.Sprintf(" (counting the stream's events past %s failed: %v)", forkAt, err)
	case n == 0:
		return fmt.Sprintf(" The stream holds no event published from past %s.", forkAt)
	}
	more := ""
	if capped {
		more = " at least"
	}
	return fmt.Sprintf(" The stream holds%s %d events published from past %s (stream sequences %d to %d): consumers saw events of transactions this database's history does not have (lost by the restore or failover, unless the history parted later than the server can tell); reconcile them from the stream.",
		more, n, forkAt, first, last)
}

// replayCheck verifies that a session replaying the stream's last event finds the same event
// there: a replay from the slot's position that reaches that position without yielding the
// event (another commit, another id) runs on a forked history whose WAL already outgrew the
// old one (a restore the relay did not see happen). Until the replay reached it, the
// confirmable position is held at the session's start (Flushed).
type replayCheck struct {
	src     checkpoint.FlushSource
	start   pglogrepl.LSN
	last    sink.Position
	id      string
	pending atomic.Bool
}

// newReplayCheck returns a check of last (an event with id) for a session starting at start,
// or nil when the replay cannot reach it (the slot is past it, or it is no live event).
func newReplayCheck(src checkpoint.FlushSource, start pglogrepl.LSN, last sink.StoredMsg) *replayCheck {
	if last.ID == "" || start > last.Position.CommitLSN {
		return nil
	}
	c := &replayCheck{src: src, start: start, last: last.Position, id: last.ID}
	c.pending.Store(true)
	return c
}

// Flushed is the source's position, held at the session's start until the replay was checked.
func (c *replayCheck) Flushed() (pglogrepl.LSN, bool) {
	lsn, idle := c.src.Flushed()
	if c.pending.Load() && lsn > c.start {
		return c.start, false
	}
	return lsn, idle
}

func (c *replayCheck) Awaited() int { return c.src.Awaited() }

// keepalive checks a keepalive: Postgres sends one with a WAL end past the stream's last
// event's commit only after it decoded (and sent) that commit's transaction.
func (c *replayCheck) keepalive(walEnd pglogrepl.LSN) error {
	if !c.pending.Load() || walEnd <= c.last.CommitLSN {
		return nil
	}
	return c.mismatch(fmt.Sprintf("no event, and then a keepalive at %s", walEnd))
}

// event checks a replayed event (called for each event while the check is pending).
func (c *replayCheck) event(ev *decoder.Event) error {
	if !c.pending.Load() {
		return nil
	}
	pos := sink.Position{CommitLSN: ev.CommitLSN, TxIndex: ev.TxIndex}
	if !c.last.AtOrBefore(pos) {
		return nil // before the stream's last event: not there yet
	}
	if pos == c.last && string(ev.ID) == c.id {
		c.pending.Store(false)
		return nil
	}
	return c.mismatch(fmt.Sprintf("event %s at %s", ev.ID, pos))
}

// mismatch is the fork error: the replay yielded got where the stream's last event was.
func (c *replayCheck) mismatch(got string) error {
	return fatalError{fmt.Errorf("%w: the stream's last event is %s at %s, but replaying the slot from %s yields %s there. Either the Postgres server's WAL history forked after the stream's last event (the database was restored from a snapshot or backup, or failed over, and its new WAL already outgrew the old), or another publisher wrote that message under the relay's subjects (only the relay may publish there: see the relay's NATS permissions in docs/operations.md, Production topology). Its transactions would be silently skipped as already published; nothing past %s was confirmed. Way out: if another publisher wrote it, remove that message (nats stream rmm) and restrict the publish rights; if the database forked, restart once with Config.AcceptSlotGap (the relay then publishes the new history from the slot's position, ignoring the stream's older positions) and reconcile the stream's events past %s, which the database's history may no longer have",
		ErrForkedHistory, c.id, c.last, c.start, got, c.start, c.start)}
}

// acceptReplayFork is Config.AcceptSlotGap for a fork the replay found (replayCheck): the stream's
// messages up to its last one are from the old history, so the next session ignores their
// positions and publishes everything from the slot's position, which nothing moved past
// start. With a position record this is recorded (after the session's recorder stopped);
// without one, it holds for this process. The returned error ends the session, which the run
// loop restarts.
func acceptReplayFork(cfg Config, forkErr error, guard slotGuard, stopRec func(), sys replication.System, start pglogrepl.LSN, last sink.StoredMsg, resume *resumePoint, log zerolog.Logger) error {
	log.Warn().Str("fork", forkErr.Error()).Msg("Config.AcceptSlotGap: the stream's events are from another history; publishing everything from the slot's position")
	if guard.record == nil {
		if resume.seqFloor == nil {
			resume.seqFloor = map[string]uint64{}
		}
		resume.seqFloor[cfg.Sink.Stream] = max(resume.seqFloor[cfg.Sink.Stream], last.Seq)
		return errors.New("restarting the session past an accepted fork")
	}
	stopRec()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	now := sink.SourcePosition{SystemID: sys.ID, Slot: cfg.Slot, LSN: start, Timeline: sys.Timeline,
		SeqFloor: max(guard.seqFloor, last.Seq), StreamSeq: last.StreamLastSeq}
	if err := guard.record.Put(ctx, now); err != nil {
		return err
	}
	return errors.New("restarting the session past an accepted fork")
}
