package relay

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"golang.org/x/sync/errgroup"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
)

// SessionState is where a Session is in its lifecycle.
type SessionState int32

const (
	SessionStarting  SessionState = iota // connecting, reading the slot, checking positions
	SessionStreaming                     // replication started: events flow to JetStream
	SessionDone                          // ended: Err tells why (nil after a graceful stop)
)

func (s SessionState) String() string {
	switch s {
	case SessionStarting:
		return "starting"
	case SessionStreaming:
		return "streaming"
	}
	return "done"
}

// Session is one replication connection: it runs until the connection fails, a fatal error, or
// ctx ends (then it drains in-flight acks and confirms the final position). Run drives it once;
// Streaming and Done are closed as it gets there, and Resume is the position the next session
// starts from.
type Session struct {
	cfg    Config
	js     jetstream.JetStream
	log    zerolog.Logger
	resume resumePoint

	state     atomic.Int32
	streaming chan struct{}
	done      chan struct{}
	err       error

	// Set while starting, used while streaming.
	conn    *pgconn.PgConn
	sys     replication.System
	st      *replication.Stream
	start   pglogrepl.LSN
	slotLSN pglogrepl.LSN // the slot's confirmed_flush_lsn
	trk     *checkpoint.Tracker
	flush   checkpoint.FlushSource
	stopRec func()
	feeds   []*feedState // per stream, in the order of Config.feeds
	p       *pipeline
}

// feedState is a session's state of one stream: its position record, what the stream held at
// the start, the replay check and the publisher.
type feedState struct {
	cfg     Config               // the session's Config with Sink set to this stream's
	record  *sink.PositionRecord // nil: no position record (temporary slot, no bucket)
	guard   slotGuard
	lastMsg sink.StoredMsg
	// last is the stream's newest event when the session started (haveLast); replayed events
	// at or before it are already stored and skipped.
	last     sink.Position
	haveLast bool
	check    *replayCheck // nil: the replay does not reach the stream's last event
	pub      *sink.Publisher
}

func newSession(cfg Config, js jetstream.JetStream, resume resumePoint, log zerolog.Logger) *Session {
	s := &Session{cfg: cfg, js: js, log: log, resume: resume, stopRec: func() {},
		streaming: make(chan struct{}), done: make(chan struct{})}
	for i := range cfg.feeds {
		s.feeds = append(s.feeds, &feedState{cfg: cfg.forFeed(i)})
	}
	return s
}

// State is where the session is now.
func (s *Session) State() SessionState { return SessionState(s.state.Load()) }

// Streaming is closed once replication started and events flow (never, if it failed first).
func (s *Session) Streaming() <-chan struct{} { return s.streaming }

// Done is closed when Run returned.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err is why the session ended, once Done is closed (nil after a graceful stop).
func (s *Session) Err() error {
	select {
	case <-s.done:
		return s.err
	default:
		return nil
	}
}

// Resume is the position the next session starts from (final once Done is closed).
func (s *Session) Resume() pglogrepl.LSN {
	select {
	case <-s.done:
		return s.resume.lsn
	default:
		return 0
	}
}

// Run runs the session to its end; call it once.
func (s *Session) Run(ctx context.Context) error {
	defer close(s.done)
	defer func() { s.state.Store(int32(SessionDone)) }()
	defer func() {
		if s.conn != nil {
			s.conn.Close(context.Background())
		}
	}()
	defer func() { s.stopRec() }()
	s.err = s.run(ctx)
	return s.err
}

func (s *Session) run(ctx context.Context) error {
	if err := s.startReplication(ctx); err != nil {
		return err
	}
	if err := s.checkPositions(ctx); err != nil {
		return err
	}
	s.newPipeline()
	s.cfg.obs.startSession(s.pubs(), s.trk)
	defer s.cfg.obs.endSession()
	s.state.Store(int32(SessionStreaming))
	close(s.streaming)
	return s.finish(s.stream(ctx))
}

// startReplication connects, checks the server's history against the resume point, finds
// where to start and starts replication from the slot.
func (s *Session) startReplication(ctx context.Context) error {
	cfg, log := s.cfg, s.log
	conn, err := replication.Connect(ctx, cfg.PGURL)
	if err != nil {
		return err
	}
	s.conn = conn

	// The server's cluster, timeline and WAL end: a history that no longer holds a position the
	// relay saw forked (restore, point-in-time recovery, failover to a lagging standby).
	if s.sys, err = replication.Identify(ctx, conn); err != nil {
		return err
	}
	if err := s.resume.check(cfg, s.sys, log); err != nil {
		return err
	}
	if !cfg.TemporarySlot && cfg.PositionBucket != "" {
		// Before START_REPLICATION: a bucket that does not answer fails the session (retried)
		// before it holds the slot, and before the walsender waits on it.
		for _, f := range s.feeds {
			if f.record, err = openRecord(ctx, f.cfg, s.js); err != nil {
				return err
			}
		}
	}
	if cfg.TemporarySlot {
		// Dropped by Postgres when this connection ends.
		if s.start, err = replication.CreateTemporarySlot(ctx, conn, cfg.Slot); err != nil {
			return err
		}
		log.Info().Stringer("lsn", s.start).Msg("created temporary replication slot")
	} else {
		slot, err := readSlot(ctx, cfg)
		if err != nil {
			return err
		}
		if slot.WALStatus == "lost" {
			return fmt.Errorf("%w: slot %q has wal_status lost", replication.ErrSlotInvalidated, cfg.Slot)
		}
		s.start, s.slotLSN = slot.ConfirmedFlush, slot.ConfirmedFlush
	}
	// Start from the slot's position, or from our own higher one: after a Postgres restart the
	// slot may report an older position than the relay confirmed, and starting from ours
	// avoids re-sending what is already stored. resume.check made sure the server's history
	// holds ours, so neither is past its WAL end.
	if s.resume.lsn > s.start {
		s.start = s.resume.lsn
	}
	if n, ok := failpointN(cfg.Failpoint, "pause_before_start_ms"); ok {
		log.Warn().Int64("ms", n).Msg("failpoint: pausing before START_REPLICATION") // test hook: a window for someone to move the slot
		time.Sleep(time.Duration(n) * time.Millisecond)
	}
	if s.st, err = replication.Start(ctx, conn, cfg.Replication, s.start, log); err != nil {
		return err
	}
	if !cfg.TemporarySlot {
		// The slot is held now: read it again, since it may have moved (advanced by someone
		// else) after it was read above; Postgres starts at its confirmed_flush_lsn when that
		// is further than start.
		slot, err := readSlot(ctx, cfg)
		if err != nil {
			return err
		}
		s.slotLSN = slot.ConfirmedFlush
		if s.slotLSN > s.start {
			s.start = s.slotLSN
		}
	}
	return nil
}

// checkPositions compares the slot, the server and each stream: the slot-gap rule with a
// position record, the fork rule without one, and the replay check of the stream's last event.
// Postgres is told of a position only once every stream's record holds it (the recorders
// are nested) and every stream's replay check passed.
func (s *Session) checkPositions(ctx context.Context) error {
	s.trk = checkpoint.New(s.start)
	s.flush = s.trk
	var stops []func()
	var recs []*checkpoint.Recorder
	s.stopRec = func() {
		for _, stop := range stops {
			stop()
		}
	}
	// Which streams have a record: one missing next to another's was lost (a slot gap).
	recorded := make([]bool, len(s.feeds))
	for i, f := range s.feeds {
		if f.record != nil {
			gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, ok, err := f.record.Get(gctx)
			cancel()
			if err != nil {
				return err
			}
			recorded[i] = ok
		}
	}
	for i, f := range s.feeds {
		other := false
		for j, ok := range recorded {
			other = other || (ok && j != i)
		}
		rec, stop, err := s.checkFeed(ctx, f, other)
		if err != nil {
			return err
		}
		if rec != nil {
			s.flush = rec
			stops = append(stops, stop)
			recs = append(recs, rec)
		}
	}
	s.cfg.obs.setRecorders(recs)
	// A replay from the slot's position that reaches a stream's last event must yield it.
	for _, f := range s.feeds {
		if f.haveLast {
			if f.check = newReplayCheck(s.flush, s.start, f.lastMsg); f.check != nil {
				s.flush = f.check
			}
			s.log.Info().Str("stream", f.cfg.Sink.Stream).Stringer("position", f.last).Msg("stream holds events up to this position; replayed events up to it are skipped")
		}
	}
	s.p = &pipeline{feeds: s.feeds, tableFeed: s.cfg.tableFeeds()}
	return nil
}

// checkFeed checks one stream against the slot and the server; with a position record it
// returns the stream's recorder of s.flush (and its stop).
func (s *Session) checkFeed(ctx context.Context, f *feedState, otherRecorded bool) (*checkpoint.Recorder, func(), error) {
	cfg, log := f.cfg, s.log.With().Str("stream", f.cfg.Sink.Stream).Logger()
	// Events already in the stream are skipped, not re-published: after an outage longer than
	// the stream's duplicate window, JetStream would store them again.
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	lastMsg, haveLast, err := sink.LastStoredMsg(lctx, s.js, cfg.Sink)
	cancel()
	if errors.Is(err, sink.ErrForeignPublisher) {
		return nil, nil, fatalError{err}
	}
	if err != nil {
		return nil, nil, err
	}
	f.lastMsg, f.last = lastMsg, lastMsg.Position
	last, lastSeq := lastMsg.Position, lastMsg.Seq
	defer func() { f.haveLast = haveLast }()
	if f.record != nil {
		// The slot is ours now (Start acquired it): compare it with the position record.
		gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		g, err := checkSlotGap(gctx, cfg, s.js, f.record, s.sys, s.slotLSN, s.start, lastMsg, haveLast, otherRecorded, log)
		cancel()
		if err != nil {
			return nil, nil, err
		}
		f.guard = g
		if haveLast && lastSeq <= f.guard.seqFloor {
			haveLast = false // stored from another cluster or history: positions do not compare
		}
		// Postgres is only told of positions the record holds.
		rec, stop := startRecorder(cfg, s.flush, f.guard, log)
		return rec, stop, nil
	}
	if haveLast && lastSeq <= s.resume.seqFloor[cfg.Sink.Stream] {
		haveLast = false // accepted in this process: stored from another history
	} else if haveLast {
		if forkAt, ok := s.sys.Holds(last.CommitLSN, 0); !ok {
			msg := forkMessage(s.sys, fmt.Sprintf("the last event %s of stream %s (stream sequence %d)", last, cfg.Sink.Stream, lastSeq), forkAt)
			if !cfg.AcceptSlotGap {
				return nil, nil, fatalError{fmt.Errorf("%w: %s. Without a position record (Config.PositionBucket) the relay cannot remember an acceptance: give it a new stream or Config.Sink.SubjectPrefix, or purge the stream", ErrForkedHistory, msg)}
			}
			log.Warn().Str("fork", msg).Msg("Config.AcceptSlotGap: publishing this session's events whatever the stream's last position; without a position record the next session checks again")
			haveLast = false
		}
	}
	return nil, nil, nil
}

// pubs are the session's publishers, one per stream.
func (s *Session) pubs() []*sink.Publisher {
	out := make([]*sink.Publisher, len(s.feeds))
	for i, f := range s.feeds {
		out[i] = f.pub
	}
	return out
}

// newPipeline builds the decoder, the publisher and the handler the stream feeds.
func (s *Session) newPipeline() {
	cfg, log, trk := s.cfg, s.log, s.trk
	dcfg := decoder.Config{MessagePrefix: cfg.MessagePrefix}
	for _, t := range cfg.tables {
		dcfg.Tables = append(dcfg.Tables, decoder.Table{Schema: t.schema, Table: t.name, Columns: t.columns, Subject: t.subject})
	}
	dec := decoder.New(dcfg)
	dec.OnForeign = func(schema, table string) {
		log.Warn().Str("relation", schema+"."+table).Strs("tables", cfg.tableNames()).Str("publication", cfg.Replication.Publication).
			Msg("the publication sends inserts into another table than the outbox table(s): they are NOT published (nor will they be). Was an outbox table renamed (rename it back, or restart with Config.Table), is it partitioned without publish_via_partition_root = true (ALTER PUBLICATION ... SET (publish_via_partition_root = true)), or was another table added to the publication (remove it, or add it to Config.Tables)? Rows inserted meanwhile need outbox-relay backfill")
	}
	// The sink's tickets carry the event's table (tableTicket), for the metrics.
	confirm := func(t checkpoint.Ticket) { trk.Confirm(untable(t)) }
	if cfg.obs != nil {
		confirm = func(t checkpoint.Ticket) { cfg.obs.stored(ticketTable(t)); trk.Confirm(untable(t)) }
	}
	if n, ok := failpointN(cfg.Failpoint, "kill_after_acks"); ok {
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
	for _, f := range s.feeds {
		scfg := f.cfg.Sink
		scfg.SeqFloor = f.guard.seqFloor
		f.pub = sink.NewPublisher(s.js, scfg, confirm, log.With().Str("stream", scfg.Stream).Logger())
	}
	p := s.p
	p.dec, p.trk, p.log, p.obs, p.deadLetter = dec, trk, log, cfg.obs, cfg.Sink.DeadLetter
	if cfg.SyncStandbySlot != "" {
		p.gate = newStandbyGate(cfg.PGURL, cfg.SyncStandbySlot, log)
	}
}

// stream runs the sink and the replication stream (and the standby gate) until one of them
// fails or ctx ends; a graceful stop drains in-flight acks and confirms the final position.
func (s *Session) stream(ctx context.Context) error {
	g, gctx := errgroup.WithContext(ctx)
	// The sink ending (an error) stops reading, and the drain of a graceful stop.
	rctx, stopRead := context.WithCancel(gctx)
	defer stopRead()
	drainCtx, stopDrain := context.WithCancel(context.Background())
	defer stopDrain()
	sinkCtx, stopSink := context.WithCancel(context.Background())
	defer stopSink()
	// Any sink ending (an error) ends the session.
	sinkDone := make(chan struct{})
	var sinkEnded sync.Once
	for _, f := range s.feeds {
		g.Go(func() error {
			defer stopDrain()
			defer stopRead()
			defer sinkEnded.Do(func() { close(sinkDone) })
			return f.pub.Run(sinkCtx)
		})
		if f.guard.record != nil {
			// backfill on a replicated stream publishes only while the relay hands it over.
			g.Go(func() error { return f.guard.record.ServeHandover(gctx, f.pub, s.log) })
		}
	}
	if s.p.gate != nil {
		g.Go(func() error { return s.p.gate.run(gctx) })
	}
	g.Go(func() error {
		defer stopSink()
		err := s.st.Run(rctx, s.p.handler(s.cfg.Sink.Tracer), s.flush)
		defer s.advance()
		if err != nil || ctx.Err() == nil {
			// Connection failure, or the sink failed (its error wins in g.Wait). Give acks
			// already on their way a moment to land, so the next session resumes as far
			// as possible and re-sends less.
			settle(s.trk, sinkDone, 2*time.Second)
			return err
		}
		// Graceful stop: wait (bounded) for in-flight acks, then confirm the final position.
		dctx, dcancel := context.WithTimeout(drainCtx, s.cfg.DrainTimeout)
		defer dcancel()
		return s.st.Drain(dctx, s.flush)
	})
	return g.Wait()
}

// replayPending reports whether a stream's replay check has not reached its last event.
func (s *Session) replayPending() bool {
	for _, f := range s.feeds {
		if f.check != nil && f.check.pending.Load() {
			return true
		}
	}
	return false
}

// advance moves the resume point to what the session confirmed.
func (s *Session) advance() {
	lsn, _ := s.flush.Flushed()
	s.resume.advance(lsn, s.sys)
}

// finish turns the streaming error into the session's and logs the session's counts.
func (s *Session) finish(err error) error {
	cfg := s.cfg
	if errors.Is(err, ErrForkedHistory) && cfg.AcceptSlotGap && s.replayPending() {
		// The replay found another history under a stream's positions; nothing past start
		// was confirmed. The next session publishes everything from the slot's position, to
		// every stream whose last event the replay had not reached.
		forkErr := err
		for _, f := range s.feeds {
			if f.check != nil && f.check.pending.Load() {
				err = acceptReplayFork(f.cfg, forkErr, f.guard, s.stopRec, s.sys, s.start, f.lastMsg, &s.resume, s.log)
			}
		}
	}
	if errors.As(err, new(*decoder.PoisonError)) {
		err = fmt.Errorf("%w. Nothing from this event on is confirmed; the relay stops. Way out: remove the cause and restart, or restart with Config.OnPoison dead-letter to publish the event (or its metadata) to %s.%s and go on",
			err, cfg.Sink.SubjectPrefix, sink.DeadLetterToken)
	}
	s.advance()
	var stats sink.Stats
	for _, f := range s.feeds {
		if f.pub != nil {
			st := f.pub.Stats()
			addStats(&stats, st)
			stats.Skipped += st.Skipped
			stats.DeadLetter += st.DeadLetter
		}
	}
	s.log.Info().Uint64("published", stats.Published).Uint64("duplicates", stats.Duplicates).
		Uint64("retries", stats.Retries).Uint64("publish_errors", stats.Errors).
		Uint64("skipped_stored", s.p.skipped+stats.Skipped).Uint64("dead_letter", stats.DeadLetter).Uint64("foreign_inserts", s.p.dec.Foreign).Stringer("lsn", s.resume).
		Msg("replication session ended")
	return err
}

// readSlot reads the relay's slot on a connection of its own.
func readSlot(ctx context.Context, cfg Config) (replication.Slot, error) {
	qconn, err := ConnectPG(ctx, cfg.PGURL)
	if err != nil {
		return replication.Slot{}, err
	}
	defer qconn.Close(context.Background())
	return replication.GetSlot(ctx, qconn, cfg.Slot)
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

// pipeline is the replication handler: decode, track, publish to the event's stream.
type pipeline struct {
	dec       *decoder.Decoder
	trk       *checkpoint.Tracker
	feeds     []*feedState // the streams, each with its publisher
	tableFeed []int        // the feed of each table (index of Config.tables)
	log       zerolog.Logger
	obs       *observer // nil: no metrics
	// commit time of the open transaction (for the commit-to-ack histogram)
	commit time.Time

	skipped uint64 // replayed events the streams already held

	deadLetter bool // Config.OnPoison dead-letter

	// gate (Config.SyncStandbySlot) holds the open transaction's events until the standby
	// flushed its commit; ticket is the transaction's.
	gate   *standbyGate
	ticket uint64
}

// feed is the stream state of an event of table i.
func (p *pipeline) feed(table int) *feedState { return p.feeds[p.tableFeed[table]] }

// Ready reports whether an event of any stream can be taken without blocking.
func (p *pipeline) Ready() bool {
	if p.gate != nil && !p.gate.passed(p.ticket) {
		return false
	}
	for _, f := range p.feeds {
		if f.pub.Full() {
			return false
		}
	}
	return true
}

func (p *pipeline) Wait(ctx context.Context) error {
	if p.gate != nil {
		if err := p.gate.wait(ctx, p.ticket); err != nil {
			return err
		}
	}
	for _, f := range p.feeds {
		if err := f.pub.Wait(ctx); err != nil {
			return err
		}
	}
	return nil
}

func (p *pipeline) Keepalive(walEnd pglogrepl.LSN) error {
	for _, f := range p.feeds {
		if f.check != nil {
			if err := f.check.keepalive(walEnd); err != nil {
				return err
			}
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
			f := p.feed(ch.Event.Table)
			if stored, err := p.stored(f, ch.Event); stored || err != nil {
				return err
			}
			if err := f.pub.Wait(ctx); err != nil {
				return err
			}
			return f.pub.PublishDeadLetter(ctx, ch.Event, err.Error(), tableTicket(p.trk.Add(), ch.Event.Table))
		}
		return fatalError{fmt.Errorf("decode: %w", err)}
	}
	switch ch.Kind {
	case decoder.Begin:
		if p.gate != nil {
			p.ticket = p.gate.request()
		}
		if p.obs != nil {
			p.commit = ch.CommitTime
		}
		p.trk.Begin()
	case decoder.Insert:
		f := p.feed(ch.Event.Table)
		if stored, err := p.stored(f, ch.Event); stored || err != nil {
			return err
		}
		// Take the window slot first: a ticket must only exist for an event that is sent.
		if err := f.pub.Wait(ctx); err != nil {
			return err
		}
		if p.obs == nil {
			return f.pub.Publish(ctx, ch.Event, tableTicket(p.trk.Add(), ch.Event.Table))
		}
		p.obs.publishing(ch.Event.Table, p.commit)
		if err := f.pub.Publish(ctx, ch.Event, tableTicket(p.trk.Add(), ch.Event.Table)); err != nil {
			p.obs.publishFailed(ch.Event.Table)
			return err
		}
	case decoder.Commit:
		// --publish atomic: the transaction's events go out as one batch now, one per stream.
		for _, f := range p.feeds {
			f.pub.EndTx()
		}
		p.trk.Commit(ch.CommitEnd)
	case decoder.NonTransactional:
		p.log.Warn().Msg("ignored a non-transactional logical decoding message with the event prefix: it is not tied to a commit (it is decoded even if its transaction rolls back), so it is not published; emit events with pg_logical_emit_message(true, ...) or outbox_emit")
	}
	return nil
}

// stored reports (and counts) a replayed event its stream already holds: nothing to publish or
// wait for, its transaction's entry stays confirmable. A replay reaching the stream's last
// event must yield that event (replayCheck).
func (p *pipeline) stored(f *feedState, ev *decoder.Event) (bool, error) {
	if !f.haveLast {
		return false, nil
	}
	if f.check != nil {
		if err := f.check.event(ev); err != nil {
			return false, err
		}
	}
	if (sink.Position{CommitLSN: ev.CommitLSN, TxIndex: ev.TxIndex}).AtOrBefore(f.last) {
		p.skipped++
		return true, nil
	}
	f.haveLast = false // positions only grow from here
	return false, nil
}

// An event's sink ticket is its tracker ticket with the index of its table in the top byte
// (Config.Tables has at most maxTables): the confirm of a stored event tells its table.
const ticketTableShift = 56

func tableTicket(t checkpoint.Ticket, table int) checkpoint.Ticket {
	return t | checkpoint.Ticket(table)<<ticketTableShift
}

func ticketTable(t checkpoint.Ticket) int { return int(t >> ticketTableShift) }

func untable(t checkpoint.Ticket) checkpoint.Ticket { return t & (1<<ticketTableShift - 1) }

// failpointN parses "name:N" from the OUTBOX_RELAY_FAILPOINT test hook.
func failpointN(fp, name string) (int64, bool) {
	v, ok := strings.CutPrefix(fp, name+":")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(v, 10, 64)
	return n, err == nil && n > 0
}
