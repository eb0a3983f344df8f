package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"golang.org/x/sync/errgroup"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
)

// session is one replication connection: it runs until the connection fails, a fatal error, or
// ctx ends (then it drains in-flight acks and confirms the final position).
func session(ctx context.Context, cfg runConfig, js jetstream.JetStream, resume *resumePoint, log zerolog.Logger) error {
	conn, err := replication.Connect(ctx, cfg.pgURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())

	// The server's cluster, timeline and WAL end: a history that no longer holds a position the
	// relay saw forked (restore, point-in-time recovery, failover to a lagging standby).
	sys, err := replication.Identify(ctx, conn)
	if err != nil {
		return err
	}
	if err := resume.check(cfg, sys, log); err != nil {
		return err
	}
	var (
		start   pglogrepl.LSN
		slotLSN pglogrepl.LSN // the slot's confirmed_flush_lsn
	)
	guarded := !cfg.temporarySlot && cfg.positionBucket != ""
	var record *sink.PositionRecord
	if guarded {
		if record, err = openRecord(ctx, cfg, js); err != nil {
			return err
		}
	}
	if cfg.temporarySlot {
		// Dropped by Postgres when this connection ends.
		if start, err = replication.CreateTemporarySlot(ctx, conn, cfg.slot); err != nil {
			return err
		}
		log.Info().Stringer("lsn", start).Msg("created temporary replication slot")
	} else {
		slot, err := readSlot(ctx, cfg)
		if err != nil {
			return err
		}
		if slot.WALStatus == "lost" {
			return fmt.Errorf("%w: slot %q has wal_status lost", replication.ErrSlotInvalidated, cfg.slot)
		}
		start, slotLSN = slot.ConfirmedFlush, slot.ConfirmedFlush
	}
	// Start from the slot's position, or from our own higher one: after a Postgres restart the
	// slot may report an older position than the relay confirmed, and starting from ours
	// avoids re-sending what is already stored. resume.check made sure the server's history
	// holds ours, so neither is past its WAL end.
	if resume.lsn > start {
		start = resume.lsn
	}
	if n, ok := failpointN(cfg.failpoint, "pause_before_start_ms"); ok {
		log.Warn().Int64("ms", n).Msg("failpoint: pausing before START_REPLICATION") // test hook: a window for someone to move the slot
		time.Sleep(time.Duration(n) * time.Millisecond)
	}
	st, err := replication.Start(ctx, conn, cfg.repl, start, log)
	if err != nil {
		return err
	}
	if !cfg.temporarySlot {
		// The slot is held now: read it again, since it may have moved (advanced by someone
		// else) after it was read above; Postgres starts at its confirmed_flush_lsn when that
		// is further than start.
		slot, err := readSlot(ctx, cfg)
		if err != nil {
			return err
		}
		slotLSN = slot.ConfirmedFlush
		if slotLSN > start {
			start = slotLSN
		}
	}

	// Events already in the stream are skipped, not re-published: after an outage longer than
	// the stream's duplicate window, JetStream would store them again.
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	lastMsg, haveLast, err := sink.LastStoredMsg(lctx, js, cfg.sink)
	cancel()
	if errors.Is(err, sink.ErrForeignPublisher) {
		return fatalError{err}
	}
	if err != nil {
		return err
	}
	last, lastSeq := lastMsg.Position, lastMsg.Seq

	trk := checkpoint.New(start)
	var flush replication.FlushSource = trk
	var (
		guard   slotGuard
		stopRec = func() {}
	)
	scfg := cfg.sink
	if guarded {
		// The slot is ours now (Start acquired it): compare it with the position record.
		gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		g, err := checkSlotGap(gctx, cfg, js, record, sys, slotLSN, start, lastMsg, haveLast, log)
		cancel()
		if err != nil {
			return err
		}
		guard = g
		scfg.SeqFloor = guard.seqFloor
		if haveLast && lastSeq <= guard.seqFloor {
			haveLast = false // stored from another cluster or history: positions do not compare
		}
		// Postgres is only told of positions the record holds.
		rec, stop := startRecorder(cfg, trk, guard, log)
		stopRec = stop
		defer stop()
		flush = rec
	} else if haveLast && lastSeq <= resume.seqFloor {
		haveLast = false // accepted in this process: stored from another history
	} else if haveLast {
		if forkAt, ok := sys.Holds(last.CommitLSN, 0); !ok {
			msg := forkMessage(sys, fmt.Sprintf("the stream's last event %s (stream sequence %d)", last, lastSeq), forkAt)
			if !cfg.acceptSlotGap {
				return fatalError{fmt.Errorf("%w: %s. Without a position record (--position-bucket) the relay cannot remember an acceptance: give it a new stream or --subject-prefix, or purge the stream", errForkedHistory, msg)}
			}
			log.Warn().Str("fork", msg).Msg("--accept-slot-gap: publishing this session's events whatever the stream's last position; without a position record the next session checks again")
			haveLast = false
		}
	}
	// A replay from the slot's position that reaches the stream's last event must yield it.
	var check *replayCheck
	if haveLast {
		if check = newReplayCheck(flush, start, lastMsg); check != nil {
			flush = check
		}
	}
	if haveLast {
		log.Info().Stringer("position", last).Msg("stream holds events up to this position; replayed events up to it are skipped")
	}
	dec := decoder.New(decoder.Config{Schema: cfg.schema, Table: cfg.table, Columns: cfg.columns, Subject: cfg.subject, MessagePrefix: cfg.messagePrefix})
	dec.OnForeign = func(schema, table string) {
		log.Warn().Str("relation", schema+"."+table).Str("table", cfg.schema+"."+cfg.table).Str("publication", cfg.repl.Publication).
			Msg("the publication sends inserts into another table than the outbox table: they are NOT published (nor will they be). Was the outbox table renamed (rename it back, or restart with --table), is it partitioned without publish_via_partition_root = true (ALTER PUBLICATION ... SET (publish_via_partition_root = true)), or was another table added to the publication (remove it)? Rows inserted meanwhile need outbox-relay backfill")
	}
	confirm := trk.Confirm
	if cfg.obs != nil {
		confirm = func(t checkpoint.Ticket) { cfg.obs.stored(); trk.Confirm(t) }
	}
	if n, ok := failpointN(cfg.failpoint, "kill_after_acks"); ok {
		stored := confirm
		var acks atomic.Int64
		confirm = func(t checkpoint.Ticket) {
			if acks.Add(1) == n {
				// Test hook: die after JetStream stored n events, before their position is
				// confirmed to Postgres.
				_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			}
			stored(t)
		}
	}
	pub := sink.NewJetStream(js, scfg, confirm, log)
	p := &pipeline{dec: dec, trk: trk, pub: pub, log: log, obs: cfg.obs, last: last, haveLast: haveLast, check: check, deadLetter: cfg.sink.DeadLetter}
	if cfg.syncStandbySlot != "" {
		p.gate = newStandbyGate(cfg.pgURL, cfg.syncStandbySlot, log)
	}
	cfg.obs.startSession(pub, trk)
	defer cfg.obs.endSession()

	sinkCtx, stopSink := context.WithCancel(context.Background())
	defer stopSink()
	g, gctx := errgroup.WithContext(ctx)
	sinkDone := make(chan struct{})
	g.Go(func() error {
		defer close(sinkDone)
		return pub.Run(sinkCtx)
	})
	if p.gate != nil {
		g.Go(func() error { return p.gate.run(gctx) })
	}
	if guard.record != nil {
		// backfill on a replicated stream publishes only while the relay hands it over.
		g.Go(func() error { return guard.record.ServeHandover(gctx, pub, log) })
	}
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
		err := st.Run(rctx, p, flush)
		defer func() {
			lsn, _ := flush.Flushed()
			resume.advance(lsn, sys)
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
		return st.Drain(dctx, flush)
	})
	err = g.Wait()
	if errors.Is(err, errForkedHistory) && cfg.acceptSlotGap && check != nil {
		// The replay found another history under the stream's positions; nothing past start
		// was confirmed. The next session publishes everything from the slot's position.
		err = acceptReplayFork(cfg, err, guard, stopRec, sys, start, lastMsg, resume, log)
	}
	if errors.Is(err, decoder.ErrPoison) || errors.Is(err, sink.ErrPoison) {
		err = fmt.Errorf("%w. Nothing from this event on is confirmed; the relay stops. Way out: remove the cause and restart, or restart with --on-poison dead-letter to publish the event (or its metadata) to %s.%s and go on",
			err, cfg.sink.SubjectPrefix, sink.DeadLetterToken)
	}
	lsn, _ := flush.Flushed()
	resume.advance(lsn, sys)
	stats := pub.Stats()
	log.Info().Uint64("published", stats.Published).Uint64("duplicates", stats.Duplicates).
		Uint64("retries", stats.Retries).Uint64("publish_errors", stats.Errors).
		Uint64("skipped_stored", p.skipped+stats.Skipped).Uint64("dead_letter", stats.DeadLetter).Uint64("foreign_inserts", dec.Foreign).Stringer("lsn", resume).
		Msg("replication session ended")
	return err
}

// readSlot reads the relay's slot on a connection of its own.
func readSlot(ctx context.Context, cfg runConfig) (replication.Slot, error) {
	qconn, err := connectPG(ctx, cfg.pgURL)
	if err != nil {
		return replication.Slot{}, err
	}
	defer qconn.Close(context.Background())
	return replication.GetSlot(ctx, qconn, cfg.slot)
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
	obs *observer // nil: no metrics
	// commit time of the open transaction (for the commit-to-ack histogram)
	commit time.Time

	// last is the stream's newest event when the session started (haveLast); replayed events
	// at or before it are already stored and counted in skipped.
	last     sink.Position
	haveLast bool
	skipped  uint64
	check    *replayCheck // nil: the replay does not reach the stream's last event

	deadLetter bool // --on-poison dead-letter

	// gate (--sync-standby-slot) holds the open transaction's events until the standby
	// flushed its commit; ticket is the transaction's.
	gate   *standbyGate
	ticket uint64
}

func (p *pipeline) Ready() bool {
	if p.gate != nil && !p.gate.passed(p.ticket) {
		return false
	}
	return !p.pub.Full()
}

func (p *pipeline) Wait(ctx context.Context) error {
	if p.gate != nil {
		if err := p.gate.wait(ctx, p.ticket); err != nil {
			return err
		}
	}
	return p.pub.Wait(ctx)
}
func (p *pipeline) Keepalive(walEnd pglogrepl.LSN) error {
	if p.check != nil {
		if err := p.check.keepalive(walEnd); err != nil {
			return err
		}
	}
	p.obs.keepalive(walEnd)
	p.trk.Keepalive(walEnd)
	return nil
}

func (p *pipeline) Handle(ctx context.Context, data []byte) error {
	ch, err := p.dec.Decode(data)
	if err != nil {
		if ch.Kind == decoder.Poison && p.deadLetter {
			if stored, err := p.stored(ch.Event); stored || err != nil {
				return err
			}
			if err := p.pub.Wait(ctx); err != nil {
				return err
			}
			return p.pub.PublishDeadLetter(ctx, ch.Event, err.Error(), p.trk.Add())
		}
		return fatalError{fmt.Errorf("decode: %w", err)}
	}
	switch ch.Kind {
	case decoder.Begin:
		if p.gate != nil {
			p.ticket = p.gate.request()
		}
		if p.obs != nil {
			p.commit = beginCommitTime(data)
		}
		p.trk.Begin()
	case decoder.Insert:
		if stored, err := p.stored(ch.Event); stored || err != nil {
			return err
		}
		// Take the window slot first: a ticket must only exist for an event that is sent.
		if err := p.pub.Wait(ctx); err != nil {
			return err
		}
		if p.obs == nil {
			return p.pub.Publish(ctx, ch.Event, p.trk.Add())
		}
		p.obs.publishing(p.commit)
		if err := p.pub.Publish(ctx, ch.Event, p.trk.Add()); err != nil {
			p.obs.publishFailed()
			return err
		}
	case decoder.Commit:
		p.trk.Commit(ch.CommitEnd)
	case decoder.NonTransactional:
		p.log.Warn().Msg("ignored a non-transactional logical decoding message with the event prefix: it is not tied to a commit (it is decoded even if its transaction rolls back), so it is not published; emit events with pg_logical_emit_message(true, ...) or outbox_emit")
	}
	return nil
}

// stored reports (and counts) a replayed event the stream already holds: nothing to publish or
// wait for, its transaction's entry stays confirmable. A replay reaching the stream's last
// event must yield that event (replayCheck).
func (p *pipeline) stored(ev *decoder.Event) (bool, error) {
	if !p.haveLast {
		return false, nil
	}
	if p.check != nil {
		if err := p.check.event(ev); err != nil {
			return false, err
		}
	}
	if (sink.Position{CommitLSN: ev.CommitLSN, TxIndex: ev.TxIndex}).AtOrBefore(p.last) {
		p.skipped++
		return true, nil
	}
	p.haveLast = false // positions only grow from here
	return false, nil
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
