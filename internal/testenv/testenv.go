package testenv

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// shared is the PostgreSQL cluster shared by all tests of this test binary,
// and the only package-level state in testenv. No single test owns the
// cluster, so Postgres(t) starts it lazily on first use and Main stops it
// after all tests have run. mu is held while the cluster starts, so
// concurrent first callers wait for one start instead of racing.
var shared struct {
	mu       sync.Mutex
	mainUsed bool     // Main is running: the cluster will be stopped
	cluster  *Cluster // nil until the first successful start
	err      error    // the first start's error; later callers fail fast
}

// Main runs the tests, then stops every shared server this test binary
// started (killing it by PID if a clean stop fails) and exits with the
// tests' exit code. Call it from TestMain:
//
//	func TestMain(m *testing.M) { testenv.Main(m) }
func Main(m *testing.M) {
	shared.mu.Lock()
	shared.mainUsed = true
	shared.mu.Unlock()

	code := m.Run()

	shared.mu.Lock()
	c := shared.cluster
	shared.cluster = nil
	shared.mu.Unlock()
	if c != nil {
		if err := c.destroy(); err != nil {
			fmt.Fprintf(os.Stderr, "testenv: stop shared postgres cluster: %v\n", err)
		}
	}
	os.Exit(code)
}

// sharedCluster returns the binary-wide cluster, starting it on first use.
func sharedCluster(t testing.TB) *Cluster {
	t.Helper()
	env := requirePostgres(t)

	shared.mu.Lock()
	defer shared.mu.Unlock()
	if !shared.mainUsed {
		t.Fatal("testenv: Postgres(t) needs the package's TestMain to call testenv.Main(m), which stops the shared cluster")
	}
	if shared.cluster == nil && shared.err == nil {
		shared.cluster, shared.err = startCluster(env, clusterConfig{})
		if shared.err == nil {
			shared.cluster.shared = true
		}
	}
	if shared.err != nil {
		t.Fatalf("testenv: shared postgres cluster: %v", shared.err)
	}
	return shared.cluster
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
// Another process may grab it before the caller binds it; servers started
// by testenv retry with a new port where they can.
func FreePort(t testing.TB) int {
	t.Helper()
	port, err := freePort()
	if err != nil {
		t.Fatalf("testenv: pick a free port: %v", err)
	}
	return port
}

// freePorts returns n distinct free ports: their listeners are all open while the ports are
// read (freePort called n times may return the same port twice).
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, err
	}
	return port, nil
}

// skipOrFatal skips the test because the environment lacks something, or
// fails it when running in CI (CI=true), where skipping would hide the gap.
func skipOrFatal(t testing.TB, format string, args ...any) {
	t.Helper()
	if ci, _ := strconv.ParseBool(os.Getenv("CI")); ci {
		t.Fatalf("testenv (CI=true, so not skipping): "+format, args...)
	}
	t.Skipf("testenv: "+format, args...)
}

// processExists reports whether pid names a process, including a zombie
// that has exited but not been reaped yet.
func processExists(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// processRunning reports whether pid names a process that has not exited.
// Zombies count as not running (detected through /proc where available).
func processRunning(pid int) bool {
	if !processExists(pid) {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// The state field follows the parenthesised command name.
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) {
		return stat[i+2] != 'Z'
	}
	return true
}

// waitUntil polls cond every 20ms until it returns true or timeout passes.
func waitUntil(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}
