package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

const (
	natsServerPkg     = "github.com/nats-io/nats-server/v2"
	natsBuildTimeout  = 5 * time.Minute
	natsProcReadyWait = 90 * time.Second // after kill -9 a large store is rebuilt before JetStream answers
)

// NATSServerBinary returns the path of a nats-server binary, looking at
// $NATS_SERVER_BIN, then PATH, then $(go env GOPATH)/bin/nats-server. If none
// exists it builds the version this module requires into the user cache
// directory (once per machine and version; about a minute the first time).
func NATSServerBinary(t testing.TB) string {
	t.Helper()
	path, err := natsServerBinary()
	if err != nil {
		t.Fatalf("testenv: find or build nats-server: %v", err)
	}
	return path
}

func natsServerBinary() (string, error) {
	if p := os.Getenv("NATS_SERVER_BIN"); p != "" {
		if !isExecutable(p) {
			return "", fmt.Errorf("NATS_SERVER_BIN=%s is not an executable file", p)
		}
		return p, nil
	}
	if p, err := exec.LookPath("nats-server"); err == nil {
		return p, nil
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "", errors.New("nats-server is not on PATH and the go command needed to build it is not either; set NATS_SERVER_BIN")
	}
	out, err := exec.Command(goBin, "env", "GOPATH").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOPATH: %w", err)
	}
	if gopath := filepath.SplitList(strings.TrimSpace(string(out))); len(gopath) > 0 && gopath[0] != "" {
		if p := filepath.Join(gopath[0], "bin", "nats-server"); isExecutable(p) {
			return p, nil
		}
	}
	return buildNATSServer(goBin)
}

// buildNATSServer builds nats-server at the version in go.mod into
// <user cache dir>/outbox-relay-testenv/nats-server-<version>. A file lock
// makes concurrent test binaries (and tests) build it only once.
func buildNATSServer(goBin string) (string, error) {
	cacheRoot, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("locate user cache directory: %w", err)
	}
	dir := filepath.Join(cacheRoot, "outbox-relay-testenv")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create cache directory: %w", err)
	}
	modDir := moduleDir()
	version, err := natsServerVersion(goBin, modDir)
	if err != nil {
		return "", err
	}
	target := filepath.Join(dir, "nats-server-"+version)
	if isExecutable(target) {
		return target, nil
	}

	lock, err := os.OpenFile(filepath.Join(dir, "nats-server.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("open build lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("take build lock: %w", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	if isExecutable(target) { // built while we waited for the lock
		return target, nil
	}

	tmp := fmt.Sprintf("%s.tmp%d", target, os.Getpid())
	ctx, cancel := context.WithTimeout(context.Background(), natsBuildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", tmp, natsServerPkg)
	cmd.Dir = modDir // build the version in this module's go.mod
	if out, err := cmd.CombinedOutput(); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("go build -o %s %s (in %s): %w\n%s", tmp, natsServerPkg, cmd.Dir, err, out)
	}
	if err := os.Rename(tmp, target); err != nil {
		return "", fmt.Errorf("install built nats-server: %w", err)
	}
	return target, nil
}

// natsServerVersion is the nats-server version this module requires, so
// that a go.mod bump builds a new binary instead of reusing a stale one.
func natsServerVersion(goBin, moduleDir string) (string, error) {
	cmd := exec.Command(goBin, "list", "-m", "-f", "{{.Version}}", natsServerPkg)
	cmd.Dir = moduleDir
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go list -m %s: %w", natsServerPkg, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// moduleDir returns this source file's directory (inside the module) when
// it exists, else "" (the current directory, inside the module under go test).
func moduleDir() string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return ""
	}
	dir := filepath.Dir(file)
	if _, err := os.Stat(dir); err != nil {
		return ""
	}
	return dir
}

// NATSProcess is a nats-server child process with JetStream, for tests that
// need to kill -9 the server. Its methods are safe for concurrent use.
type NATSProcess struct {
	URL        string // nats://127.0.0.1:PORT
	Port       int
	StoreDir   string
	ConfigFile string
	LogFile    string // the server's stdout and stderr, across restarts
	Binary     string

	mu   sync.Mutex
	cmd  *exec.Cmd     // nil when not running
	done chan struct{} // closed once cmd has exited and been reaped
}

// StartNATSProcess runs NATSServerBinary(t) on 127.0.0.1:port with JetStream
// storing in storeDir (sync_interval: always, so acknowledged messages
// survive SIGKILL), and waits until JetStream answers. port 0 picks a free
// port; storeDir "" uses a t.TempDir(). The process is killed in t.Cleanup
// (and, on Linux, if the test binary dies).
func StartNATSProcess(t testing.TB, port int, storeDir string) *NATSProcess {
	t.Helper()
	bin := NATSServerBinary(t)
	if port == 0 {
		port = FreePort(t)
	}
	if storeDir == "" {
		storeDir = t.TempDir()
	}
	p, err := startNATSProcess(bin, port, storeDir, t.TempDir(), true)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() {
		if err := p.Kill(); err != nil && !errors.Is(err, errNotRunning) {
			t.Errorf("testenv: %v", err)
		}
	})
	return p
}

// StartNATSServer is StartNATSProcess for programs that are not tests (the benchmark in
// bench/): nats-server with JetStream on a free port, storing under dir/jetstream, its config
// and log in dir. syncAlways sets sync_interval: always (fsync per message); without it
// JetStream keeps its default (fsync every 2 minutes). The caller stops it with Kill or Stop.
func StartNATSServer(dir string, syncAlways bool) (*NATSProcess, error) {
	bin, err := natsServerBinary()
	if err != nil {
		return nil, fmt.Errorf("find or build nats-server: %w", err)
	}
	port, err := freePort()
	if err != nil {
		return nil, fmt.Errorf("pick a port: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	return startNATSProcess(bin, port, filepath.Join(dir, "jetstream"), dir, syncAlways)
}

func startNATSProcess(bin string, port int, storeDir, dir string, syncAlways bool) (*NATSProcess, error) {
	p := &NATSProcess{
		URL:        fmt.Sprintf("nats://127.0.0.1:%d", port),
		Port:       port,
		StoreDir:   storeDir,
		ConfigFile: filepath.Join(dir, "nats-server.conf"),
		LogFile:    filepath.Join(dir, "nats-server.log"),
		Binary:     bin,
	}
	sync := ""
	if syncAlways {
		sync = "  sync_interval: always\n"
	}
	conf := fmt.Sprintf("listen: \"127.0.0.1:%d\"\njetstream {\n  store_dir: %q\n%s}\n", port, storeDir, sync)
	if err := os.WriteFile(p.ConfigFile, []byte(conf), 0o644); err != nil {
		return nil, fmt.Errorf("write nats-server config: %w", err)
	}
	if err := p.Start(); err != nil {
		return nil, err
	}
	return p, nil
}

var errNotRunning = errors.New("not running")

// PID returns the server's PID, or 0 when it is not running.
func (p *NATSProcess) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// Log returns the server's output so far.
func (p *NATSProcess) Log() string {
	b, _ := os.ReadFile(p.LogFile)
	return string(b)
}

// Start starts the (stopped or killed) server on the same port and store
// directory and waits until JetStream answers.
func (p *NATSProcess) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.spawnLocked(); err != nil {
		return err
	}
	return p.waitReadyLocked(natsProcReadyWait)
}

// spawnLocked starts the process without waiting for it to serve. p.mu is held.
func (p *NATSProcess) spawnLocked() error {
	if p.cmd != nil {
		return fmt.Errorf("start nats-server on port %d: already running as PID %d", p.Port, p.cmd.Process.Pid)
	}
	logFile, err := os.OpenFile(p.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open nats-server log: %w", err)
	}
	defer logFile.Close() // the child has its own copy
	cmd := exec.Command(p.Binary, "-c", p.ConfigFile)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = childProcAttr()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", p.Binary, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	p.cmd, p.done = cmd, done
	return nil
}

// waitReadyLocked waits up to wait until JetStream answers at p.URL; on failure the process
// is killed. p.mu is held.
func (p *NATSProcess) waitReadyLocked(wait time.Duration) error {
	cmd, done := p.cmd, p.done
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	go func() { // stop waiting early if the server dies
		select {
		case <-done:
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := waitJetStream(ctx, p.URL); err != nil {
		p.signalLocked(syscall.SIGKILL)
		return fmt.Errorf("start nats-server (PID %d) on port %d: %w\nlog (tail):\n%s", cmd.Process.Pid, p.Port, err, tail(p.Log(), 20))
	}
	return nil
}

// Kill sends SIGKILL to the server and waits until it has exited.
func (p *NATSProcess) Kill() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return fmt.Errorf("kill nats-server on port %d: %w", p.Port, errNotRunning)
	}
	return p.signalLocked(syscall.SIGKILL)
}

// Stop asks the server to shut down cleanly (SIGTERM), falling back to
// SIGKILL after 10s, and waits until it has exited.
func (p *NATSProcess) Stop() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return fmt.Errorf("stop nats-server on port %d: %w", p.Port, errNotRunning)
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err == nil {
		select {
		case <-p.done:
			p.cmd = nil
			return nil
		case <-time.After(10 * time.Second):
		}
	}
	return p.signalLocked(syscall.SIGKILL)
}

// Pause stops the server with SIGSTOP (it keeps its sockets but answers nothing); Resume
// continues it with SIGCONT.
func (p *NATSProcess) Pause() error { return p.signal(syscall.SIGSTOP) }

// Resume continues a server stopped by Pause.
func (p *NATSProcess) Resume() error { return p.signal(syscall.SIGCONT) }

func (p *NATSProcess) signal(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return fmt.Errorf("signal nats-server on port %d with %v: %w", p.Port, sig, errNotRunning)
	}
	if err := syscall.Kill(p.cmd.Process.Pid, sig); err != nil {
		return fmt.Errorf("signal nats-server PID %d with %v: %w", p.cmd.Process.Pid, sig, err)
	}
	return nil
}

// Restart kills the server with SIGKILL and starts it again.
func (p *NATSProcess) Restart() error {
	if err := p.Kill(); err != nil {
		return err
	}
	return p.Start()
}

// signalLocked sends sig by PID and waits for the process to exit. p.mu is held.
func (p *NATSProcess) signalLocked(sig syscall.Signal) error {
	pid := p.cmd.Process.Pid
	if err := syscall.Kill(pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("signal nats-server PID %d with %v: %w", pid, sig, err)
	}
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		return fmt.Errorf("nats-server PID %d did not exit within 10s of %v", pid, sig)
	}
	p.cmd = nil
	return nil
}

// pingJetStream makes one JetStream account info request at url.
func pingJetStream(ctx context.Context, url string) error {
	nc, err := nats.Connect(url, nats.Timeout(time.Second), nats.NoReconnect())
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, err = js.AccountInfo(ctx)
	return err
}

// waitJetStream connects to url and waits until JetStream answers an
// account info request, or ctx ends.
func waitJetStream(ctx context.Context, url string) error {
	var lastErr error
	for {
		lastErr = pingJetStream(ctx, url)
		if lastErr == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("jetstream at %s not ready: %w", url, lastErr)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
