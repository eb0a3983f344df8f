package main

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
	"github.com/outbox-relay/outbox-relay/sink"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// env is one test's Postgres database (migrated) and JetStream server.
type env struct {
	pg   *testenv.PG
	nats *natsembed.NATS
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{pg: testenv.Postgres(t), nats: natsembed.JetStream(t)}
	e.migrate(t)
	return e
}

func (e *env) migrate(t *testing.T) {
	t.Helper()
	var out bytes.Buffer
	require.NoError(t, dispatch(context.Background(), []string{"migrate", "--pg-url", e.pg.URL, "--log-level", "warn"}, &out, &out, noEnv))
}

// createSlot creates the relay's slot before anything is written.
func (e *env) createSlot(t *testing.T) {
	t.Helper()
	e.pg.Exec(t, `SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')`)
}

func noEnv(string) (string, bool) { return "", false }

func (e *env) args(extra ...string) []string {
	return append([]string{"run", "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--create-slot", "--log-format", "json", "--log-level", "debug", "--http-addr", "127.0.0.1:0"}, extra...)
}

// testLog collects a relay's log and shows it when the test fails.
type testLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *testLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *testLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func dumpOnFailure(t *testing.T, name string, l fmt.Stringer) {
	t.Cleanup(func() {
		if t.Failed() || os.Getenv("OUTBOX_RELAY_TEST_LOGS") != "" {
			s := l.String()
			if len(s) > 20000 {
				s = "...\n" + s[len(s)-20000:]
			}
			t.Logf("%s log:\n%s", name, s)
		}
	})
}

// freeHTTPAddr makes a run without --http-addr serve on a free port instead of the fixed
// default, which tests running in parallel (and other test binaries) would share.
func freeHTTPAddr(args []string) []string {
	if len(args) == 0 || args[0] != "run" {
		return args
	}
	for _, a := range args {
		if a == "--http-addr" || strings.HasPrefix(a, "--http-addr=") {
			return args
		}
	}
	return append(append([]string(nil), args...), "--http-addr", "127.0.0.1:0")
}

// inProcess runs the relay in this process until stop is called; stop returns its error.
func inProcess(t *testing.T, args []string) (stop func() error, log *testLog) {
	t.Helper()
	return inProcessEnv(t, args, noEnv)
}

// inProcessEnv is inProcess with the environment variables env gives the relay.
func inProcessEnv(t *testing.T, args []string, env func(string) (string, bool)) (stop func() error, log *testLog) {
	t.Helper()
	args = freeHTTPAddr(args)
	log = &testLog{}
	dumpOnFailure(t, "relay", log)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- dispatch(ctx, args, log, log, env) }()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case err = <-done:
			case <-time.After(30 * time.Second):
				err = fmt.Errorf("relay did not stop within 30s")
			}
		})
		return err
	}
	t.Cleanup(func() { _ = stop() })
	return stop, log
}

// runToStop runs the relay in this process until it stops by itself (at most 60 s) and returns
// its error; its output is dumped if the test fails.
func runToStop(t *testing.T, args []string) error {
	t.Helper()
	log := &testLog{}
	dumpOnFailure(t, "relay", log)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	return dispatch(ctx, freeHTTPAddr(args), log, log, noEnv)
}

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// relayBinary builds the relay once per test binary, for tests that kill it.
func relayBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "outbox-relay-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "outbox-relay")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	require.NoError(t, buildErr)
	return binPath
}

// proc is the relay binary running as a child process.
type proc struct {
	cmd  *exec.Cmd
	log  *testLog
	done chan struct{}
	err  error
}

func startProc(t *testing.T, args []string, env ...string) *proc {
	t.Helper()
	p := &proc{log: &testLog{}, done: make(chan struct{})}
	p.cmd = exec.Command(relayBinary(t), freeHTTPAddr(args)...)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	p.cmd.Env = append(os.Environ(), env...)
	require.NoError(t, p.cmd.Start())
	dumpOnFailure(t, fmt.Sprintf("relay pid %d", p.cmd.Process.Pid), p.log)
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { p.kill() })
	return p
}

func (p *proc) kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// wait returns the exit code once the process ended.
func (p *proc) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		t.Fatalf("relay still running after %s", timeout)
	}
	return p.cmd.ProcessState.ExitCode()
}

// stop sends SIGTERM and requires a clean exit.
func (p *proc) stop(t *testing.T) {
	t.Helper()
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	require.Equal(t, 0, p.wait(t, 30*time.Second))
}

// killAfterAcks runs the relay with a small window and no status updates until the failpoint
// kills it, after JetStream stored n events and before their position reached Postgres.
func killAfterAcks(t *testing.T, args []string, n int) {
	t.Helper()
	p := startProc(t, append(args, "--status-interval", "1h", "--max-in-flight", "8"), fmt.Sprintf("OUTBOX_RELAY_FAILPOINT=kill_after_acks:%d", n))
	require.Equal(t, -1, p.wait(t, 60*time.Second), "the failpoint kills the relay")
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// record is one message read back from the stream.
type record struct {
	Seq     uint64
	Time    time.Time // when the stream stored it
	Subject string
	Data    []byte
	Header  nats.Header
}

// connectJS connects to the NATS server at url; close ends the connection.
func connectJS(t *testing.T, url string) (js jetstream.JetStream, close func()) {
	t.Helper()
	nc, err := nats.Connect(url)
	require.NoError(t, err)
	js, err = jetstream.New(nc)
	require.NoError(t, err)
	return js, nc.Close
}

// readStream returns every message of the stream in stream order.
func readStream(t *testing.T, url, stream string) []record {
	t.Helper()
	js, closeNC := connectJS(t, url)
	defer closeNC()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, stream)
	require.NoError(t, err)
	info, err := s.Info(ctx)
	require.NoError(t, err)
	var out []record
	if info.State.Msgs == 0 {
		return out
	}
	c, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	require.NoError(t, err)
	for uint64(len(out)) < info.State.Msgs {
		// Ask for exactly what is left, so the last batch does not wait out FetchMaxWait.
		want := min(1000, int(info.State.Msgs)-len(out))
		batch, err := c.Fetch(want, jetstream.FetchMaxWait(5*time.Second))
		require.NoError(t, err)
		n := 0
		for m := range batch.Messages() {
			md, err := m.Metadata()
			require.NoError(t, err)
			out = append(out, record{Seq: md.Sequence.Stream, Time: md.Timestamp, Subject: m.Subject(), Data: m.Data(), Header: m.Headers()})
			n++
		}
		require.NoError(t, batch.Error())
		require.NotZero(t, n, "stream stopped yielding messages at %d of %d", len(out), info.State.Msgs)
	}
	return out
}

// streamMsgs returns the number of messages stored in the stream (0 if it does not exist).
func streamMsgs(t *testing.T, url, stream string) uint64 {
	t.Helper()
	js, closeNC := connectJS(t, url)
	defer closeNC()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return 0
	}
	info, err := s.Info(ctx)
	require.NoError(t, err)
	return info.State.Msgs
}

func waitStream(t *testing.T, url string, atLeast uint64, timeout time.Duration) {
	t.Helper()
	waitStreamOf(t, url, sink.DefaultStream, atLeast, timeout)
}

// waitStreamOf waits until the named stream holds at least atLeast messages.
func waitStreamOf(t *testing.T, url, stream string, atLeast uint64, timeout time.Duration) {
	t.Helper()
	if n := pollStream(t, url, stream, atLeast, timeout); n < atLeast {
		t.Fatalf("stream %s never reached %d messages (holds %d after %s)", stream, atLeast, n, timeout)
	}
}

// pollStream reads the named stream's message count until it is at least atLeast or timeout
// passed, and returns the last count.
func pollStream(t *testing.T, url, stream string, atLeast uint64, timeout time.Duration) uint64 {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if n := streamMsgs(t, url, stream); n >= atLeast || !time.Now().Before(deadline) {
			return n
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// awaitStream is waitStream for the fault suites: when the stream does not reach atLeast in
// time it records a failure naming the stream's count, the slot's confirmed position and the
// server's WAL position (a slot confirmed past events the stream lacks is loss; one behind them
// is a stall), and returns so that the test goes on to read the stream and name every event
// missing, duplicated or out of order, and the fault it followed.
func awaitStream(t *testing.T, url string, pg *testenv.PG, slot string, atLeast uint64, timeout time.Duration) {
	t.Helper()
	n := pollStream(t, url, sink.DefaultStream, atLeast, timeout)
	if n >= atLeast {
		return
	}
	var confirmed, wal string
	err := pg.QueryRow(t, `SELECT coalesce(confirmed_flush_lsn, '0/0')::text, pg_current_wal_lsn()::text FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&confirmed, &wal)
	t.Errorf("stream %s holds %d of %d committed events after %s; slot %s confirmed %s, server WAL at %s (read error: %v)",
		sink.DefaultStream, n, atLeast, timeout, slot, confirmed, wal, err)
}

// waitStreaming waits until a relay holds the slot, so that what is committed from now on is
// decoded (a slot being created skips transactions committed before its consistent point).
func waitStreaming(t *testing.T, pg *testenv.PG, slot string) {
	t.Helper()
	require.Eventually(t, func() bool {
		var active bool
		err := pg.QueryRow(t, `SELECT active FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&active)
		return err == nil && active
	}, 30*time.Second, 20*time.Millisecond, "slot %s never became active", slot)
}

// waitSlotCaughtUp waits until the slot confirmed the server's current WAL position (as of the
// call): only keepalives can take it there when the outbox is idle.
func waitSlotCaughtUp(t *testing.T, pg *testenv.PG, slot string, why string) {
	t.Helper()
	var walNow string
	require.NoError(t, pg.QueryRow(t, `SELECT pg_current_wal_lsn()::text`).Scan(&walNow))
	require.Eventually(t, func() bool {
		var behind int64
		require.NoError(t, pg.QueryRow(t, `SELECT $1::pg_lsn - confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $2`, walNow, slot).Scan(&behind))
		return behind <= 0
	}, 30*time.Second, 100*time.Millisecond, "slot %s never reached %s: %s", slot, walNow, why)
}

// confirmedFlush reads the slot's confirmed_flush_lsn.
func confirmedFlush(t *testing.T, pg *testenv.PG, slot string) pglogrepl.LSN {
	t.Helper()
	var s string
	require.NoError(t, pg.QueryRow(t, `SELECT coalesce(confirmed_flush_lsn, '0/0')::text FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&s))
	lsn, err := pglogrepl.ParseLSN(s)
	require.NoError(t, err)
	return lsn
}

// workload writes events for many aggregates in transactions of mixed sizes. Every aggregate
// belongs to one writer and carries its own sequence number in the payload, so the order of an
// aggregate's events in the stream must follow seq.
type workload struct {
	Writers, Aggregates, Txs, MaxTx int
	Seed                            uint64
}

func (w workload) run(t *testing.T, pg *testenv.PG) int {
	t.Helper()
	var total int
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make(chan error, w.Writers)
	for wr := 0; wr < w.Writers; wr++ {
		wg.Add(1)
		go func(wr int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(w.Seed, uint64(wr)))
			ctx := context.Background()
			conn, err := pgx.Connect(ctx, pg.URL)
			if err != nil {
				errs <- err
				return
			}
			defer conn.Close(ctx)
			seq := make([]int, w.Aggregates)
			for i := 0; i < w.Txs; i++ {
				n := 1 + r.IntN(w.MaxTx)
				err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
					b := &pgx.Batch{}
					for j := 0; j < n; j++ {
						a := r.IntN(w.Aggregates)
						seq[a]++
						agg := fmt.Sprintf("s%d-w%d-a%d", w.Seed, wr, a)
						payload := fmt.Sprintf(`{"agg": %q, "seq": %d, "pad": %q}`, agg, seq[a], "x")
						b.Queue(`INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) VALUES ('order', $1, 'Order.Updated', $2, $3)`,
							agg, payload, `{"traceparent": "00-`+agg+`-01", "n": 1}`)
					}
					return tx.SendBatch(ctx, b).Close()
				})
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				total += n
				mu.Unlock()
			}
		}(wr)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	return total
}

// row is an outbox row as Postgres returns it.
type row struct {
	ID, AggregateType, AggregateID, EventType, Payload, CreatedAt string
	Seq                                                           int
}

func outboxRows(t *testing.T, pg *testenv.PG) map[string]row {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, pg.URL)
	require.NoError(t, err)
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `SELECT id::text, aggregate_type, aggregate_id, event_type, payload::text,
		to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), coalesce((payload->>'seq')::int, 0) FROM outbox`)
	require.NoError(t, err)
	out := map[string]row{}
	for rows.Next() {
		var r row
		require.NoError(t, rows.Scan(&r.ID, &r.AggregateType, &r.AggregateID, &r.EventType, &r.Payload, &r.CreatedAt, &r.Seq))
		out[r.ID] = r
	}
	require.NoError(t, rows.Err())
	return out
}

// verdict compares the stream with the committed rows, as a Jepsen queue checker does.
type verdict struct {
	Committed, Read       int
	Lost, Dup, Unexpected []string
	OutOfOrder            []string
	OutOfOrderIDs         []string // the ids of OutOfOrder's events
}

func check(t *testing.T, committed map[string]row, recs []record) verdict {
	t.Helper()
	v := verdict{Committed: len(committed), Read: len(recs)}
	seen := map[string]bool{}
	lastSeq := map[string]int{}
	for _, r := range recs {
		id := r.Header.Get(sink.HeaderMsgID)
		if seen[id] {
			v.Dup = append(v.Dup, id)
			continue
		}
		seen[id] = true
		row, ok := committed[id]
		if !ok {
			v.Unexpected = append(v.Unexpected, id)
			continue
		}
		if row.Seq > 0 {
			if row.Seq <= lastSeq[row.AggregateID] {
				v.OutOfOrder = append(v.OutOfOrder, fmt.Sprintf("%s seq %d after %d", row.AggregateID, row.Seq, lastSeq[row.AggregateID]))
				v.OutOfOrderIDs = append(v.OutOfOrderIDs, id)
			}
			lastSeq[row.AggregateID] = row.Seq
		}
	}
	for id := range committed {
		if !seen[id] {
			v.Lost = append(v.Lost, id)
		}
	}
	sort.Strings(v.Lost)
	return v
}

func requireClean(t *testing.T, v verdict) {
	t.Helper()
	short := func(s []string) []string {
		if len(s) > 5 {
			return append(s[:5:5], fmt.Sprintf("... %d in all", len(s)))
		}
		return s
	}
	require.Empty(t, short(v.Lost), "lost events: %v", short(v.Lost))
	require.Empty(t, short(v.Dup), "duplicated events: %v", short(v.Dup))
	require.Empty(t, short(v.Unexpected), "events not committed: %v", short(v.Unexpected))
	require.Empty(t, short(v.OutOfOrder), "per-aggregate order broken: %v", short(v.OutOfOrder))
	require.Equal(t, v.Committed, v.Read)
}

func itoa(i int) string { return fmt.Sprint(i) }
