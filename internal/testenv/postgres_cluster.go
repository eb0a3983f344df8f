package testenv

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Stop modes accepted by (*Cluster).Stop; see pg_ctl(1).
const (
	StopSmart     = "smart"     // wait for all clients to disconnect
	StopFast      = "fast"      // roll back open transactions, clean shutdown
	StopImmediate = "immediate" // no shutdown checkpoint; crash recovery on next start
)

const (
	pgStartTimeout = 30 * time.Second
	pgStopTimeout  = 30 * time.Second
	pgDirPrefix    = "testenv-pg-"
	pgOwnerFile    = "owner.pid" // PID of the test binary that created the cluster
)

// Cluster is a throwaway PostgreSQL cluster (one data directory, one
// postmaster). Its methods are safe for concurrent use.
type Cluster struct {
	DataDir string // the data directory (PGDATA)
	LogFile string // the server log, written via pg_ctl -l
	Port    int    // TCP port on 127.0.0.1; kept across Stop/Start

	baseDir    string // os.MkdirTemp directory holding DataDir and LogFile
	env        pgEnv
	baseConfig string // postgresql.conf as written by initdb
	shared     bool   // the binary-wide cluster of Postgres(t): not to be stopped by tests

	mu        sync.Mutex
	pid       int // postmaster PID while started by us, else 0
	snapshots int // copies taken by Snapshot
}

// ClusterOption configures NewCluster.
type ClusterOption func(*clusterConfig)

type clusterConfig struct {
	extraConfig []string
}

// WithConfig appends lines to postgresql.conf after testenv's own settings,
// so they override them, e.g. WithConfig("wal_level = replica").
func WithConfig(lines ...string) ClusterOption {
	return func(c *clusterConfig) { c.extraConfig = append(c.extraConfig, lines...) }
}

// NewCluster initialises and starts a private cluster for tests that need
// to stop, crash, restart or reconfigure PostgreSQL. It is stopped and its
// directory removed in t.Cleanup. Use (*Cluster).NewDatabase for a database.
func NewCluster(t testing.TB, opts ...ClusterOption) *Cluster {
	t.Helper()
	env := requirePostgres(t)
	var cfg clusterConfig
	for _, opt := range opts {
		opt(&cfg)
	}
	c, err := startCluster(env, cfg)
	if err != nil {
		t.Fatalf("testenv: new postgres cluster: %v", err)
	}
	t.Cleanup(func() {
		if err := c.destroy(); err != nil {
			t.Errorf("testenv: destroy postgres cluster %s: %v", c.DataDir, err)
		}
	})
	return c
}

// StartCluster is NewCluster for programs that are not tests (the benchmark in bench/): it
// initialises and starts a private cluster, and the caller removes it with Destroy. Missing
// binaries are an error naming the fix.
func StartCluster(opts ...ClusterOption) (*Cluster, error) {
	env, err := postgresEnv()
	if err != nil {
		return nil, err
	}
	var cfg clusterConfig
	for _, opt := range opts {
		opt(&cfg)
	}
	return startCluster(env, cfg)
}

// Destroy stops a cluster from StartCluster (immediate mode) and removes its directory.
func (c *Cluster) Destroy() error {
	if err := c.checkOwnable("destroy postgres"); err != nil {
		return err
	}
	return c.destroy()
}

// URL returns a libpq URL for database dbname on this cluster as the
// superuser postgres.
func (c *Cluster) URL(dbname string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", c.Port, url.PathEscape(dbname))
}

// PID returns the postmaster's PID, or 0 when the cluster is not running.
func (c *Cluster) PID() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pid
}

// Running reports whether the cluster was started and not stopped or killed
// through its methods since.
func (c *Cluster) Running() bool { return c.PID() != 0 }

// Log returns the server log so far ("" if it cannot be read).
func (c *Cluster) Log() string {
	b, err := os.ReadFile(c.LogFile)
	if err != nil {
		return ""
	}
	return string(b)
}

// checkOwnable refuses to stop or start the shared cluster, which other
// tests are using concurrently.
func (c *Cluster) checkOwnable(doing string) error {
	if c.shared {
		return fmt.Errorf("testenv: %s: this is the cluster shared by Postgres(t); use NewCluster(t) for a cluster you can stop", doing)
	}
	return nil
}

// Stop stops the server with pg_ctl stop -m mode -w, where mode is
// StopSmart, StopFast or StopImmediate.
func (c *Cluster) Stop(mode string) error {
	switch mode {
	case StopSmart, StopFast, StopImmediate:
	default:
		return fmt.Errorf("testenv: stop postgres: unknown mode %q (want smart, fast or immediate)", mode)
	}
	if err := c.checkOwnable("stop postgres"); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pid == 0 {
		return fmt.Errorf("testenv: stop postgres in %s: not running", c.DataDir)
	}
	if err := c.pgCtl(pgStopTimeout, "stop", "-D", c.DataDir, "-m", mode, "-w", "-t", seconds(pgStopTimeout)); err != nil {
		return fmt.Errorf("testenv: stop postgres (%s) in %s: %w", mode, c.DataDir, err)
	}
	c.pid = 0
	return nil
}

// Start starts a stopped or killed cluster again on the same port.
func (c *Cluster) Start() error {
	if err := c.checkOwnable("start postgres"); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pid != 0 {
		return fmt.Errorf("testenv: start postgres in %s: already running as PID %d", c.DataDir, c.pid)
	}
	if err := c.startLocked(); err != nil {
		return fmt.Errorf("testenv: %w", err)
	}
	return nil
}

// Restart stops the cluster in fast mode and starts it again.
func (c *Cluster) Restart() error {
	if err := c.Stop(StopFast); err != nil {
		return err
	}
	return c.Start()
}

// Kill simulates a crash: it sends SIGKILL to the postmaster and waits until
// the process is gone. Its backends notice and exit on their own; Start runs
// crash recovery.
func (c *Cluster) Kill() error {
	if err := c.checkOwnable("kill postgres"); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pid == 0 {
		return fmt.Errorf("testenv: kill postgres in %s: not running", c.DataDir)
	}
	pid := c.pid
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("testenv: kill postmaster PID %d: %w", pid, err)
	}
	c.pid = 0
	// A new postmaster refuses to start while postmaster.pid names an existing
	// process, and an unreaped zombie still exists; wait for it to be reaped.
	if !waitUntil(pgStopTimeout, func() bool { return !processExists(pid) }) {
		return fmt.Errorf("testenv: killed postmaster PID %d but it was not reaped within %s", pid, pgStopTimeout)
	}
	return nil
}

// startCluster creates, configures and starts a new cluster.
func startCluster(env pgEnv, cfg clusterConfig) (_ *Cluster, err error) {
	reapOrphanedClusters(env)

	base, err := os.MkdirTemp("", pgDirPrefix)
	if err != nil {
		return nil, fmt.Errorf("create cluster directory: %w", err)
	}
	c := &Cluster{
		DataDir: filepath.Join(base, "data"),
		LogFile: filepath.Join(base, "postgres.log"),
		baseDir: base,
		env:     env,
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, c.destroy())
		}
	}()

	if err := os.WriteFile(filepath.Join(base, pgOwnerFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return nil, fmt.Errorf("write owner file: %w", err)
	}
	if env.cred != nil {
		if err := chownTree(base, int(env.cred.Uid), int(env.cred.Gid)); err != nil {
			return nil, fmt.Errorf("hand cluster directory to user postgres: %w", err)
		}
	}

	if err := c.run(env.initdb, pgStartTimeout, "--no-sync", "--no-instructions", "-U", "postgres", "--auth=trust",
		"--encoding=UTF8", "--locale=C", "--wal-segsize=1", "-D", c.DataDir); err != nil {
		return nil, err
	}
	conf, err := os.ReadFile(filepath.Join(c.DataDir, "postgresql.conf"))
	if err != nil {
		return nil, fmt.Errorf("read postgresql.conf: %w", err)
	}
	c.baseConfig = string(conf)

	// The port is picked before postgres binds it, so another process may
	// take it in between; retry with a fresh port in that case.
	for attempt := 1; ; attempt++ {
		if c.Port, err = freePort(); err != nil {
			return nil, fmt.Errorf("pick a port: %w", err)
		}
		if err := c.writeConfig(cfg.extraConfig); err != nil {
			return nil, err
		}
		c.mu.Lock()
		err = c.startLocked()
		c.mu.Unlock()
		if err == nil {
			return c, nil
		}
		if attempt == 3 || !strings.Contains(c.Log(), "Address already in use") {
			return nil, err
		}
	}
}

// writeConfig writes initdb's postgresql.conf followed by testenv's
// settings and extra. Later lines override earlier ones.
func (c *Cluster) writeConfig(extra []string) error {
	var b strings.Builder
	b.WriteString(c.baseConfig)
	fmt.Fprintf(&b, "\n# --- added by testenv ---\n")
	fmt.Fprintf(&b, "port = %d\n", c.Port)
	fmt.Fprintf(&b, "listen_addresses = '127.0.0.1'\n")
	fmt.Fprintf(&b, "unix_socket_directories = '%s'\n", strings.ReplaceAll(c.DataDir, "'", "''"))
	b.WriteString(`wal_level = logical
max_wal_senders = 20
max_replication_slots = 20
wal_sender_timeout = 10s
max_connections = 200
max_prepared_transactions = 10
fsync = off
synchronous_commit = on
logging_collector = off
log_replication_commands = on
`)
	for _, line := range extra {
		b.WriteString(line + "\n")
	}
	// Overwriting keeps the file's owner (postgres when running as root).
	if err := os.WriteFile(filepath.Join(c.DataDir, "postgresql.conf"), []byte(b.String()), 0o600); err != nil {
		return fmt.Errorf("write postgresql.conf: %w", err)
	}
	return nil
}

// startLocked runs pg_ctl start and records the postmaster PID. c.mu is held.
func (c *Cluster) startLocked() error {
	err := c.pgCtl(pgStartTimeout, "start", "-w", "-t", seconds(pgStartTimeout), "-D", c.DataDir, "-l", c.LogFile)
	if err != nil {
		return fmt.Errorf("start postgres in %s on port %d: %w\nserver log (tail):\n%s", c.DataDir, c.Port, err, tail(c.Log(), 30))
	}
	pid, err := readPostmasterPID(c.DataDir)
	if err != nil {
		return fmt.Errorf("started postgres in %s but %w", c.DataDir, err)
	}
	c.pid = pid
	return nil
}

// destroy stops the server (immediate mode, then SIGKILL as a last resort)
// and removes the cluster directory. It tolerates a half-created cluster.
func (c *Cluster) destroy() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	pid := c.pid
	if pid == 0 {
		pid, _ = readPostmasterPID(c.DataDir) // started by someone else, or a stale file
	}
	if isPostmaster(pid, c.DataDir) {
		if err := c.pgCtl(10*time.Second, "stop", "-D", c.DataDir, "-m", StopImmediate, "-w", "-t", "10"); err != nil {
			errs = append(errs, err)
		}
		if processRunning(pid) {
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
				errs = append(errs, fmt.Errorf("kill postmaster PID %d: %w", pid, err))
			}
		}
	}
	c.pid = 0
	if err := os.RemoveAll(c.baseDir); err != nil {
		errs = append(errs, fmt.Errorf("remove cluster directory: %w", err))
	}
	return errors.Join(errs...)
}

// reapOrphanedClusters destroys clusters left under os.TempDir() by test
// binaries that died before their cleanup ran. Clusters whose owner process
// still exists, or whose directory we cannot read, are left alone.
func reapOrphanedClusters(env pgEnv) {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), pgDirPrefix+"*"))
	for _, base := range dirs {
		b, err := os.ReadFile(filepath.Join(base, pgOwnerFile))
		if err != nil {
			continue
		}
		owner, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || processExists(owner) {
			continue
		}
		orphan := &Cluster{DataDir: filepath.Join(base, "data"), baseDir: base, env: env}
		_ = orphan.destroy()
	}
}

// pgCtl runs pg_ctl with args.
func (c *Cluster) pgCtl(timeout time.Duration, args ...string) error {
	return c.run(c.env.pgCtl, timeout, args...)
}

// run runs a PostgreSQL program in the cluster directory, as user postgres
// when testenv runs as root.
func (c *Cluster) run(bin string, timeout time.Duration, args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout+5*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Dir = c.baseDir
	cmd.Env = pgEnviron()
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.env.cred}
	// pg_ctl start leaves the postmaster running; it redirects the
	// postmaster's output to the log file, but never wait long for our pipe.
	cmd.WaitDelay = time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w\n%s", filepath.Base(bin), strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// pgEnviron is the environment for PostgreSQL programs: the test's, minus
// libpq/PG* variables that could redirect them, with messages in English so
// tests can match log lines.
func pgEnviron() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "PG") || strings.HasPrefix(kv, "LC_") || strings.HasPrefix(kv, "LANG=") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "LC_ALL=C", "LANG=C")
}

// isPostmaster reports whether pid is a running postmaster for dataDir, so
// that a stale postmaster.pid whose PID was reused is never acted on.
func isPostmaster(pid int, dataDir string) bool {
	if !processRunning(pid) {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return true // no /proc: trust the PID
	}
	return strings.Contains(string(cmdline), dataDir)
}

func readPostmasterPID(dataDir string) (int, error) {
	b, err := os.ReadFile(filepath.Join(dataDir, "postmaster.pid"))
	if err != nil {
		return 0, fmt.Errorf("read postmaster PID: %w", err)
	}
	first, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(first))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("parse postmaster PID from postmaster.pid: %q", first)
	}
	return pid, nil
}

// pgEnv says which PostgreSQL binaries to run and as whom.
type pgEnv struct {
	initdb, pgCtl string
	cred          *syscall.Credential // nil: run as the current user
}

// requirePostgres finds the PostgreSQL binaries and, when running as root,
// the postgres OS user; it skips the test (fails it under CI=true) if either
// is missing.
func requirePostgres(t testing.TB) pgEnv {
	t.Helper()
	env, err := postgresEnv()
	if err != nil {
		skipOrFatal(t, "%v", err)
	}
	return env
}

// postgresEnv finds the PostgreSQL binaries and, when running as root, the postgres OS user.
func postgresEnv() (pgEnv, error) {
	var env pgEnv
	var err error
	env.initdb, env.pgCtl, err = findPostgresBinaries()
	if err != nil {
		return env, fmt.Errorf("%v; install PostgreSQL with: apt-get install postgresql-15", err)
	}
	if os.Geteuid() == 0 {
		env.cred, err = postgresCredential()
		if err != nil {
			return env, fmt.Errorf("running as root, so postgres must run as OS user postgres: %v; it is created by: apt-get install postgresql-15", err)
		}
	}
	return env, nil
}

// findPostgresBinaries looks for initdb and pg_ctl on PATH, then in the
// highest-versioned /usr/lib/postgresql/*/bin.
func findPostgresBinaries() (initdb, pgCtl string, err error) {
	initdb, err1 := exec.LookPath("initdb")
	pgCtl, err2 := exec.LookPath("pg_ctl")
	if err1 == nil && err2 == nil {
		return initdb, pgCtl, nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	version := func(dir string) float64 { // "15", "9.6"
		v, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(dir)), 64)
		return v
	}
	sort.Slice(dirs, func(i, j int) bool { return version(dirs[i]) > version(dirs[j]) })
	for _, dir := range dirs {
		initdb, pgCtl = filepath.Join(dir, "initdb"), filepath.Join(dir, "pg_ctl")
		if isExecutable(initdb) && isExecutable(pgCtl) {
			return initdb, pgCtl, nil
		}
	}
	return "", "", errors.New("initdb and pg_ctl not found on PATH or in /usr/lib/postgresql/*/bin")
}

func postgresCredential() (*syscall.Credential, error) {
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("look up OS user postgres: %w", err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("parse uid %q of user postgres: %w", u.Uid, err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("parse gid %q of user postgres: %w", u.Gid, err)
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

func chownTree(root string, uid, gid int) error {
	return filepath.WalkDir(root, func(path string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(path, uid, gid)
	})
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

func seconds(d time.Duration) string { return strconv.Itoa(int(d.Seconds())) }

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
