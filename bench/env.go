package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/sink"
)

// env is the throwaway Postgres cluster, nats-server and relay binary shared by every scenario.
type env struct {
	dir      string
	cluster  *testenv.Cluster
	nats     *testenv.NATSProcess
	nc       *nats.Conn
	js       jetstream.JetStream
	relayBin string
	seq      int
}

func setup(ctx context.Context) (_ *env, err error) {
	dir, err := os.MkdirTemp("", "outbox-relay-bench-")
	if err != nil {
		return nil, err
	}
	e := &env{dir: dir}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	e.relayBin = filepath.Join(dir, "outbox-relay")
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", e.relayBin, "./cmd/outbox-relay")
	if out, err := build.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build the relay (run from the module root): %v\n%s", err, out)
	}
	// testenv's settings (fsync = off, wal_level = logical) plus room for the big transaction.
	e.cluster, err = testenv.StartCluster(testenv.WithConfig(
		"max_wal_size = 4GB", "checkpoint_timeout = 30min", "wal_sender_timeout = 60s",
		"shared_buffers = 256MB", "max_connections = 100"))
	if err != nil {
		return nil, err
	}
	e.nats, err = testenv.StartNATSServer(filepath.Join(dir, "nats"), false)
	if err != nil {
		return nil, err
	}
	e.nc, err = nats.Connect(e.nats.URL, nats.Name("bench"))
	if err != nil {
		return nil, err
	}
	e.js, err = jetstream.New(e.nc)
	return e, err
}

func (e *env) close() {
	if e.nc != nil {
		e.nc.Close()
	}
	if e.nats != nil {
		_ = e.nats.Kill()
	}
	if e.cluster != nil {
		if err := e.cluster.Destroy(); err != nil {
			fmt.Fprintln(os.Stderr, "bench: remove postgres cluster:", err)
		}
	}
	os.RemoveAll(e.dir)
}

// db is one fresh database with the outbox table and publication.
type db struct {
	name string
	url  string
	pool *pgxpool.Pool
}

func (e *env) newDB(ctx context.Context) (*db, error) {
	e.seq++
	name := fmt.Sprintf("bench_%d", e.seq)
	admin, err := pgx.Connect(ctx, e.cluster.URL("postgres"))
	if err != nil {
		return nil, err
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		return nil, err
	}
	d := &db{name: name, url: e.cluster.URL(name)}
	if err := d.migrate(ctx, migrations.Options{}); err != nil {
		return nil, err
	}
	cfg, err := pgxpool.ParseConfig(d.url)
	if err != nil {
		return nil, err
	}
	cfg.MaxConns = 8
	d.pool, err = pgxpool.NewWithConfig(ctx, cfg)
	return d, err
}

// migrate applies the migrations with each of opts in turn.
func (d *db) migrate(ctx context.Context, opts ...migrations.Options) error {
	conn, err := pgx.Connect(ctx, d.url)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	for _, o := range opts {
		if _, err := migrations.Apply(ctx, conn, o); err != nil {
			return err
		}
	}
	return nil
}

// drop removes the database and its slots (after every consumer stopped).
func (e *env) drop(ctx context.Context, d *db) {
	d.pool.Close()
	admin, err := pgx.Connect(ctx, e.cluster.URL("postgres"))
	if err != nil {
		return
	}
	defer admin.Close(ctx)
	// Slot names are cluster-wide and reused by the next repeat: wait until they are gone (a
	// walsender may still hold its slot for a moment after its client left).
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		_, _ = admin.Exec(ctx, `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = $1 AND active_pid IS NOT NULL`, d.name)
		_, _ = admin.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active`, d.name)
		var left int
		if err := admin.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots WHERE database = $1`, d.name).Scan(&left); err != nil || left == 0 {
			break
		}
	}
	_, _ = admin.Exec(ctx, "DROP DATABASE IF EXISTS "+d.name+" WITH (FORCE)")
}

// createSlots creates a pgoutput slot of each name.
func (d *db) createSlots(ctx context.Context, slots ...string) error {
	for _, slot := range slots {
		if _, err := d.pool.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, slot); err != nil {
			return err
		}
	}
	return nil
}

// payloadPad makes the payload column about payloadBytes long: {"n": 123456, "pad": "xxx..."}.
func payloadPad(payloadBytes int) int { return max(payloadBytes-25, 0) }

const insertSQL = `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
SELECT 'order', (($1::int + g) % 1000)::text, 'OrderCreated', jsonb_build_object('n', $1::int + g, 'pad', repeat('x', $2::int))
FROM generate_series(1, $3::int) g`

// insert commits total events in transactions of perTx events.
func (d *db) insert(ctx context.Context, total, perTx, payloadBytes int) error {
	conn, err := d.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	for n := 0; n < total; n += perTx {
		k := min(perTx, total-n)
		if _, err := conn.Exec(ctx, insertSQL, n, payloadPad(payloadBytes), k); err != nil {
			return fmt.Errorf("insert events: %w", err)
		}
	}
	return nil
}

// newStream creates an empty stream for one consumer (file storage, 20 minute duplicate
// window, like the relay's).
func (e *env) newStream(ctx context.Context, name, prefix string) (jetstream.Stream, error) {
	_ = e.js.DeleteStream(ctx, name)
	// A fresh stream is a fresh feed: forget the position record an earlier repeat's relay
	// left for it (on another database's slot), or the relay refuses the new slot as a gap.
	if kv, err := e.js.KeyValue(ctx, sink.DefaultPositionBucket); err == nil {
		_ = kv.Purge(ctx, sink.PositionKey(name, prefix))
	}
	return e.js.CreateStream(ctx, jetstream.StreamConfig{
		Name: name, Subjects: []string{prefix + ".>"}, Storage: jetstream.FileStorage, Duplicates: 20 * time.Minute,
		AllowAtomicPublish: true, // for --publish atomic and ceiling D-atomic
		AllowBatchPublish:  true, // for --publish fast and ceiling D-fast
	})
}

// streamMsgs returns the number of messages in a stream, 0 while it does not exist.
func (e *env) streamMsgs(ctx context.Context, name string) (uint64, error) {
	s, err := e.js.Stream(ctx, name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return 0, err
	}
	return info.State.Msgs, nil
}

// waitMsgs polls until stream holds at least n messages and returns when that was seen.
func (e *env) waitMsgs(ctx context.Context, stream string, n uint64, timeout time.Duration) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	var got uint64
	for time.Now().Before(deadline) {
		var err error
		if got, err = e.streamMsgs(ctx, stream); err != nil {
			return time.Time{}, err
		}
		if got >= n {
			return time.Now(), nil
		}
		time.Sleep(2 * time.Millisecond)
	}
	return time.Time{}, fmt.Errorf("stream %s has %d of %d messages after %s", stream, got, n, timeout)
}

// relayProc is the relay binary running as a child process.
type relayProc struct {
	cmd   *exec.Cmd
	start time.Time
	log   bytes.Buffer
	done  chan struct{}
	hwm   atomic.Int64 // peak RSS in bytes (VmHWM), sampled
}

type usage struct {
	cpu    time.Duration // user + system
	maxRSS int64         // bytes (VmHWM)
}

func (e *env) startRelay(d *db, slot, stream, prefix string, environ ...string) (*relayProc, error) {
	return e.startRelayArgs(d, []string{"--slot", slot, "--stream", stream, "--subject-prefix", prefix}, environ...)
}

func (e *env) startRelayArgs(d *db, args []string, environ ...string) (*relayProc, error) {
	return e.startRelayBin(e.relayBin, d, args, environ...)
}

// startRelayBin starts the relay binary bin (the one built from this tree, or -relay-b).
func (e *env) startRelayBin(bin string, d *db, args []string, environ ...string) (*relayProc, error) {
	p := &relayProc{done: make(chan struct{})}
	args = append([]string{"run", "--pg-url", d.url, "--nats-url", e.nats.URL, "--log-level", "warn", "--http-addr", "off"}, args...)
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = &p.log, &p.log
	p.cmd.Env = append(os.Environ(), environ...)
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p.start = time.Now()
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	// Peak RSS is VmHWM of the relay's own address space, sampled while it runs: the rusage
	// of a child (ru_maxrss) starts from the parent's RSS at fork on Linux, so it would report
	// this bench process's size whenever that is larger.
	go func() {
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			if v := vmHWM(p.cmd.Process.Pid); v > p.hwm.Load() {
				p.hwm.Store(v)
			}
			select {
			case <-p.done:
				return
			case <-t.C:
			}
		}
	}()
	return p, nil
}

// stop sends SIGTERM, waits for the exit and returns the process's CPU time and peak RSS.
func (p *relayProc) stop() (usage, error) {
	if v := vmHWM(p.cmd.Process.Pid); v > p.hwm.Load() {
		p.hwm.Store(v)
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
		return usage{}, fmt.Errorf("relay did not stop within 30s; log:\n%s", tailLog(p.log.String()))
	}
	ru, ok := p.cmd.ProcessState.SysUsage().(*syscall.Rusage)
	if !ok {
		return usage{}, errors.New("no rusage")
	}
	u := usage{
		cpu:    time.Duration(ru.Utime.Nano() + ru.Stime.Nano()),
		maxRSS: p.hwm.Load(),
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		return u, fmt.Errorf("relay exited with %d; log:\n%s", code, tailLog(p.log.String()))
	}
	return u, nil
}

// exited reports an early exit of the relay, with its log.
func (p *relayProc) exited() error {
	select {
	case <-p.done:
		return fmt.Errorf("relay exited early (%s); log:\n%s", p.cmd.ProcessState, tailLog(p.log.String()))
	default:
		return nil
	}
}

// vmHWM reads the peak RSS of a running process from /proc.
func vmHWM(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb * 1024
		}
	}
	return 0
}

// procCPU returns the user + system CPU time pid has used so far (/proc/<pid>/stat, in clock
// ticks of 10 ms).
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name (which may contain spaces) in parentheses: utime and
	// stime are the 12th and 13th of them.
	i := strings.LastIndexByte(string(b), ')')
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

func tailLog(s string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return strings.Join(lines, "\n")
}

// waitSlotActive waits until a consumer streams from slot.
func (d *db) waitSlotActive(ctx context.Context, slot string, p *relayProc) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		var active bool
		if err := d.pool.QueryRow(ctx, `SELECT active FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&active); err != nil {
			return err
		}
		if active {
			return nil
		}
		if p != nil {
			if err := p.exited(); err != nil {
				return err
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("slot %s not active after 30s", slot)
}

// selfCPU is this process's user + system CPU time so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
