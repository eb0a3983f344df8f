package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// config of one demo run.
type config struct {
	// BinDir holds outbox-relay, producer and consumer; empty: build them into the demo's
	// temporary directory with `go build` (from the module that contains the working dir).
	BinDir string
	// Interval between two orders of the producer.
	Interval time.Duration
	// Install the postgresql-15 Debian package when the server binaries are missing.
	Install bool
	// Out receives every line of every process, prefixed with its name.
	Out io.Writer
}

const dirPrefix = "outbox-demo-"

// demo is a running demo: Postgres, the relay (with embedded NATS), producer and consumer.
type demo struct {
	cfg      config
	dir      string
	pg       *testenv.Cluster
	natsPort int
	procs    []*child
	out      *prefixWriter
	exited   chan *child // a child that ended on its own
}

// start brings everything up. On error, what was started is stopped again.
func start(ctx context.Context, cfg config) (_ *demo, err error) {
	if cfg.Interval <= 0 {
		cfg.Interval = time.Second
	}
	d := &demo{cfg: cfg, out: &prefixWriter{w: cfg.Out}, exited: make(chan *child, 4)}
	defer func() {
		if err != nil {
			err = errors.Join(err, d.stop())
		}
	}()
	reapOrphans()
	if err := installPostgres(ctx, cfg.Install, cfg.Out); err != nil {
		return nil, err
	}
	if d.dir, err = os.MkdirTemp("", dirPrefix); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(d.dir, "owner.pid"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return nil, err
	}
	d.logf("starting PostgreSQL")
	// The same throwaway cluster the tests use: initdb into a temporary directory (as the
	// postgres OS user when root), a free loopback port, wal_level=logical; pg_ctl detaches the
	// postmaster from the terminal, so Ctrl-C reaches only the demo, which stops it last.
	if d.pg, err = testenv.StartCluster(); err != nil {
		return nil, err
	}
	d.logf("PostgreSQL %d listening on 127.0.0.1:%d (wal_level=logical), data in %s", d.pg.PID(), d.pg.Port, d.pg.DataDir)

	bins := cfg.BinDir
	if bins == "" {
		bins = filepath.Join(d.dir, "bin")
		d.logf("building outbox-relay and the examples")
		if err := build(ctx, bins); err != nil {
			return nil, err
		}
	}
	relay := filepath.Join(bins, "outbox-relay")
	pgURL := d.pg.URL("postgres")
	// The slot comes with the table: every order committed from now on is relayed.
	if err := d.runOnce(ctx, "migrate", relay, "migrate", "--pg-url", pgURL, "--create-slot", "--log-level", "warn"); err != nil {
		return nil, err
	}
	if d.natsPort, err = freePort(); err != nil {
		return nil, err
	}
	natsURL := fmt.Sprintf("nats://127.0.0.1:%d", d.natsPort)
	if err := d.spawn("relay", relay, "run", "--pg-url", pgURL, "--create-slot",
		"--embedded-nats", "--embedded-nats-dir", filepath.Join(d.dir, "nats"),
		"--embedded-nats-listen", fmt.Sprintf("127.0.0.1:%d", d.natsPort)); err != nil {
		return nil, err
	}
	if err := d.spawn("consumer", filepath.Join(bins, "consumer"), "--nats-url", natsURL); err != nil {
		return nil, err
	}
	// Produce once the relay streams, so the first orders show up at once.
	if err := waitStreaming(ctx, pgURL, "outbox_relay", 60*time.Second); err != nil {
		return nil, err
	}
	if err := d.spawn("producer", filepath.Join(bins, "producer"), "--pg-url", pgURL, "--interval", cfg.Interval.String()); err != nil {
		return nil, err
	}
	d.logf("running: Postgres pid %d, relay with embedded NATS at %s, producer, consumer. Ctrl-C stops everything", d.pg.PID(), natsURL)
	d.logf("inspect: psql '%s' -c 'SELECT * FROM outbox'   |   nats --server %s stream view OUTBOX", pgURL, natsURL)
	return d, nil
}

// wait blocks until ctx ends (nil) or a process exits on its own (an error).
func (d *demo) wait(ctx context.Context) error {
	select {
	case <-ctx.Done():
		return nil
	case c := <-d.exited:
		return fmt.Errorf("%s exited: %v", c.name, c.err)
	}
}

// stop ends the producer, consumer and relay (SIGINT, SIGKILL after 15s), stops Postgres and
// removes the temporary directory. Every process is addressed by its PID.
func (d *demo) stop() error {
	var errs []error
	for i := len(d.procs) - 1; i >= 0; i-- { // producer first, relay last
		if err := d.procs[i].stop(15 * time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if d.pg != nil {
		d.logf("stopping PostgreSQL %d", d.pg.PID())
		if err := d.pg.Destroy(); err != nil {
			errs = append(errs, err)
		}
	}
	if d.dir != "" {
		if err := os.RemoveAll(d.dir); err != nil {
			errs = append(errs, err)
		}
		d.logf("removed %s", d.dir)
	}
	return errors.Join(errs...)
}

func (d *demo) logf(format string, args ...any) {
	d.out.line("demo", fmt.Sprintf(format, args...))
}

// runOnce runs a command to completion, its output prefixed.
func (d *demo) runOnce(ctx context.Context, name, prog string, args ...string) error {
	cmd := exec.CommandContext(ctx, prog, args...)
	w := d.out.writer(name)
	defer w.Close()
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// child is a long-running process of the demo.
type child struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

func (d *demo) spawn(name, prog string, args ...string) error {
	cmd := exec.Command(prog, args...)
	w := d.out.writer(name)
	cmd.Stdout, cmd.Stderr = w, w
	// Die with the demo even if it is killed with SIGKILL; own process group, so a Ctrl-C in
	// the terminal reaches only the demo, which stops the processes in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, done: make(chan struct{})}
	d.procs = append(d.procs, c)
	go func() {
		c.err = cmd.Wait()
		w.Close()
		close(c.done)
		select {
		case d.exited <- c:
		default:
		}
	}()
	d.logf("started %s (pid %d)", name, cmd.Process.Pid)
	return nil
}

func (c *child) stop(grace time.Duration) error {
	select {
	case <-c.done:
		return nil
	default:
	}
	_ = c.cmd.Process.Signal(os.Interrupt)
	select {
	case <-c.done:
		return nil
	case <-time.After(grace):
	}
	_ = c.cmd.Process.Kill()
	<-c.done
	return fmt.Errorf("%s (pid %d) did not stop within %s on SIGINT; killed", c.name, c.cmd.Process.Pid, grace)
}

// pids returns the PIDs of the running processes (Postgres first).
func (d *demo) pids() []int {
	var p []int
	if d.pg != nil && d.pg.PID() != 0 {
		p = append(p, d.pg.PID())
	}
	for _, c := range d.procs {
		p = append(p, c.cmd.Process.Pid)
	}
	return p
}

// build compiles the relay and the two examples into dir.
func build(ctx context.Context, dir string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+string(filepath.Separator),
		"github.com/outbox-relay/outbox-relay/cmd/outbox-relay",
		"github.com/outbox-relay/outbox-relay/examples/producer",
		"github.com/outbox-relay/outbox-relay/examples/consumer")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("go build (run the demo from the outbox-relay checkout): %w\n%s", err, out)
	}
	return nil
}

// reapOrphans removes the directories of earlier demos that were killed before cleaning up
// (their Postgres lives in testenv's directory, which testenv reaps when it starts a cluster).
func reapOrphans() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), dirPrefix+"*"))
	for _, dir := range dirs {
		b, err := os.ReadFile(filepath.Join(dir, "owner.pid"))
		if err != nil {
			continue
		}
		if owner, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && syscall.Kill(owner, 0) != nil {
			_ = os.RemoveAll(dir)
		}
	}
}

// prefixWriter writes whole lines, each prefixed with the name of its process.
type prefixWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (p *prefixWriter) line(name, s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.w, "%-8s | %s\n", name, s)
}

// writer returns a writer that splits its input into lines for p; Close flushes the last one.
func (p *prefixWriter) writer(name string) io.WriteCloser {
	pr, pw := io.Pipe()
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64*1024), 1<<20)
		for sc.Scan() {
			p.line(name, sc.Text())
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	return pw
}

// waitStreaming waits until a replication connection holds slot.
func waitStreaming(ctx context.Context, pgURL, slot string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, pgURL)
	if err != nil {
		return fmt.Errorf("connect to Postgres: %w", err)
	}
	defer conn.Close(context.Background())
	for {
		var active bool
		err := conn.QueryRow(ctx, `SELECT coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = $1), false)`, slot).Scan(&active)
		if err != nil {
			return fmt.Errorf("the relay never started streaming from slot %s: %w", slot, err)
		}
		if active {
			return nil
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			return fmt.Errorf("the relay never started streaming from slot %s within %s", slot, timeout)
		}
	}
}
