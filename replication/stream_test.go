package replication_test

import (
	"context"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/replication"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// recorder is the consuming end of a stream: it takes every message at once, remembers the end
// of the last committed transaction and counts keepalives. What it confirms is set by the test.
type recorder struct {
	mu         sync.Mutex
	messages   int
	commitEnd  pglogrepl.LSN
	keepalives int
	flushed    atomic.Uint64
}

func (r *recorder) Ready() bool                    { return true }
func (r *recorder) Wait(ctx context.Context) error { return nil }
func (r *recorder) Handle(ctx context.Context, data []byte) error {
	msg, err := pglogrepl.Parse(data)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.messages++
	if c, ok := msg.(*pglogrepl.CommitMessage); ok {
		r.commitEnd = c.TransactionEndLSN
	}
	return nil
}
func (r *recorder) Keepalive(pglogrepl.LSN) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.keepalives++
	return nil
}
func (r *recorder) Flushed() (pglogrepl.LSN, bool) { return pglogrepl.LSN(r.flushed.Load()), true }
func (r *recorder) Awaited() int                   { return 0 }

func (r *recorder) state() (messages, keepalives int, commitEnd pglogrepl.LSN) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.messages, r.keepalives, r.commitEnd
}

// session is a stream started on a fresh slot of a fresh database, run in the background.
type session struct {
	pg     *testenv.PG
	slot   string
	start  pglogrepl.LSN
	rec    *recorder
	stream *replication.Stream
	cancel context.CancelFunc
	done   chan struct{} // closed when Run returned
	err    error         // Run's result, once done is closed
}

// startSession creates a table with a publication and a slot, connects with the given extra
// connection parameters (e.g. "&options=-c%20wal_sender_timeout%3D2s") and runs the stream.
func startSession(t *testing.T, cfg replication.Config, params string) *session {
	t.Helper()
	ctx := context.Background()
	pg := testenv.Postgres(t)
	pg.Exec(t, `CREATE TABLE events (id bigserial PRIMARY KEY, body text NOT NULL);
		CREATE PUBLICATION events_pub FOR TABLE events`)
	cfg.Slot, cfg.Publication = "stream_test", "events_pub"
	conn := pg.Conn(t)
	start, err := replication.CreateSlot(ctx, conn, cfg.Slot)
	require.NoError(t, err)

	rconn, err := replication.Connect(ctx, pg.URL+params)
	require.NoError(t, err)
	t.Cleanup(func() { rconn.Close(context.Background()) })
	stream, err := replication.Start(ctx, rconn, cfg, start, zerolog.Nop())
	require.NoError(t, err)

	s := &session{pg: pg, slot: cfg.Slot, start: start, rec: &recorder{}, stream: stream, done: make(chan struct{})}
	s.rec.flushed.Store(uint64(start))
	runCtx, cancel := context.WithCancel(ctx)
	s.cancel = cancel
	go func() {
		defer close(s.done)
		s.err = stream.Run(runCtx, s.rec, s.rec)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
			t.Error("Run did not return within 10 s of its context's end")
		}
	})
	return s
}

// running fails the test if Run has returned.
func (s *session) running(t *testing.T) {
	t.Helper()
	select {
	case <-s.done:
		t.Fatalf("Run returned: %v", s.err)
	default:
	}
}

func (s *session) confirmedFlush(t *testing.T) pglogrepl.LSN {
	t.Helper()
	slot, err := replication.GetSlot(context.Background(), s.pg.Conn(t), s.slot)
	require.NoError(t, err)
	return slot.ConfirmedFlush
}

// The flushed position reaches the slot's confirmed_flush_lsn within FlushInterval, without
// waiting for StatusInterval, and only once it is flushed: a received transaction is not
// confirmed before the consumer says so.
func TestStream_FlushedPositionReachesConfirmedFlush(t *testing.T) {
	s := startSession(t, replication.Config{StatusInterval: time.Hour, FlushInterval: 100 * time.Millisecond, IdleTimeout: time.Hour}, "")
	s.pg.Exec(t, `INSERT INTO events (body) VALUES ('a'), ('b')`)
	var end pglogrepl.LSN
	require.Eventually(t, func() bool {
		_, _, end = s.rec.state()
		return end > s.start
	}, 10*time.Second, 10*time.Millisecond, "the transaction should arrive")
	messages, _, _ := s.rec.state()
	require.Equal(t, 5, messages, "Begin, Relation, two Inserts, Commit")

	time.Sleep(500 * time.Millisecond) // 5 × FlushInterval
	require.Equal(t, s.start, s.confirmedFlush(t), "nothing flushed, nothing confirmed")

	s.rec.flushed.Store(uint64(end))
	require.Eventually(t, func() bool { return s.confirmedFlush(t) == end }, 2*time.Second, 20*time.Millisecond,
		"confirmed_flush_lsn should reach the flushed commit end %s within a few FlushIntervals", end)
	s.running(t)
}

// Postgres asks for a reply when it heard nothing for half its wal_sender_timeout, and ends
// the connection after a whole one. With StatusInterval and IdleTimeout far away and nothing
// flushed, only those reply requests make the stream answer: it is still up after three
// timeouts.
func TestStream_AnswersKeepalivesThatAskForAReply(t *testing.T) {
	const senderTimeout = 2 * time.Second
	s := startSession(t, replication.Config{StatusInterval: time.Hour, IdleTimeout: time.Hour},
		"&options=-c%20wal_sender_timeout%3D2s")
	time.Sleep(3 * senderTimeout)
	s.running(t)
	_, keepalives, _ := s.rec.state()
	require.GreaterOrEqual(t, keepalives, 3, "Postgres should have asked about every timeout/2")

	// The connection still carries changes.
	s.pg.Exec(t, `INSERT INTO events (body) VALUES ('after the keepalives')`)
	require.Eventually(t, func() bool { m, _, _ := s.rec.state(); return m >= 4 }, 10*time.Second, 10*time.Millisecond)
}

// Reads wake at the read deadline (FlushInterval, StatusInterval): with no traffic at all, Run
// notices the end of its context within about one FlushInterval, and the timeouts before leave
// the connection usable.
func TestStream_ReadDeadlinesKeepTheConnectionUsable(t *testing.T) {
	s := startSession(t, replication.Config{StatusInterval: time.Hour, FlushInterval: 100 * time.Millisecond, IdleTimeout: time.Hour}, "")
	time.Sleep(time.Second) // about ten read deadlines without a message
	s.running(t)
	s.pg.Exec(t, `INSERT INTO events (body) VALUES ('after ten timeouts')`)
	require.Eventually(t, func() bool { m, _, _ := s.rec.state(); return m >= 4 }, 10*time.Second, 10*time.Millisecond,
		"the change should arrive over the connection whose reads timed out")

	time.Sleep(time.Second)
	stopped := time.Now()
	s.cancel()
	select {
	case <-s.done:
		require.NoError(t, s.err, "a context that ends is a clean stop")
		require.Less(t, time.Since(stopped), time.Second, "Run should wake at its read deadline")
	case <-time.After(10 * time.Second):
		t.Fatal("Run blocked in a read after its context ended")
	}
}

// The idle path: no changes and nothing flushed, yet a standby status update reaches Postgres at
// least every StatusInterval (pg_stat_replication.reply_time is the time of the last one).
func TestStream_IdleStreamSendsStatusWithinTheInterval(t *testing.T) {
	const interval = 300 * time.Millisecond
	s := startSession(t, replication.Config{StatusInterval: interval, IdleTimeout: time.Hour}, "")
	conn := s.pg.Conn(t)
	var replies []time.Time
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		var reply *time.Time
		require.NoError(t, conn.QueryRow(context.Background(), `SELECT r.reply_time FROM pg_stat_replication r
			JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1`, s.slot).Scan(&reply))
		if reply != nil && (len(replies) == 0 || reply.After(replies[len(replies)-1])) {
			replies = append(replies, *reply)
		}
	}
	s.running(t)
	require.GreaterOrEqual(t, len(replies), 8, "about one status update per %s over 3 s: %v", interval, replies)
	for i := 1; i < len(replies); i++ {
		require.Less(t, replies[i].Sub(replies[i-1]), 2*interval, "status updates %d and %d", i-1, i)
	}
	_, _, end := s.rec.state()
	require.Zero(t, end, "no transaction arrived")
}

// The idle path's probe: after IdleTimeout of silence the stream asks Postgres for a reply,
// which keeps a live connection up; a walsender that answers nothing (stopped with SIGSTOP: a
// silent network partition) ends Run after about two IdleTimeouts.
func TestStream_SilentServerIsProbedThenDeclaredDead(t *testing.T) {
	const idle = 500 * time.Millisecond
	s := startSession(t, replication.Config{StatusInterval: time.Hour, IdleTimeout: idle}, "")
	time.Sleep(4 * idle)
	s.running(t)
	_, keepalives, _ := s.rec.state()
	require.GreaterOrEqual(t, keepalives, 2, "each probe is answered by a keepalive")

	slot, err := replication.GetSlot(context.Background(), s.pg.Conn(t), s.slot)
	require.NoError(t, err)
	require.NotZero(t, slot.ActivePID)
	require.NoError(t, syscall.Kill(int(slot.ActivePID), syscall.SIGSTOP))
	t.Cleanup(func() { syscall.Kill(int(slot.ActivePID), syscall.SIGCONT) })
	stopped := time.Now()
	select {
	case <-s.done:
		require.Error(t, s.err)
		require.Contains(t, s.err.Error(), "connection presumed dead")
		require.Less(t, time.Since(stopped), 4*idle, "two IdleTimeouts and a wake-up")
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not give up on a walsender that answers nothing")
	}
}
