package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// postgres is a throwaway cluster: initdb'd into a temporary directory, started with pg_ctl
// on a free loopback port with wal_level=logical, and removed by stop.
type postgres struct {
	bin     string // directory of initdb, pg_ctl
	cred    *syscall.Credential
	dataDir string
	logFile string
	port    int
	pid     int
}

// findPostgres returns the directory holding initdb and pg_ctl: PATH first, then the highest
// /usr/lib/postgresql/*/bin. When none is found and install is true and we are root on a
// Debian-like system, it installs postgresql-15 with apt-get.
func findPostgres(ctx context.Context, install bool, out io.Writer) (string, error) {
	if dir, ok := lookPostgres(); ok {
		return dir, nil
	}
	if !install {
		return "", errors.New("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql-15")
	}
	if os.Geteuid() != 0 {
		return "", errors.New("PostgreSQL server binaries (initdb, pg_ctl) not found; install them: sudo apt-get install postgresql-15")
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		return "", errors.New("PostgreSQL server binaries (initdb, pg_ctl) not found and apt-get is missing: install the PostgreSQL 15 server package")
	}
	fmt.Fprintln(out, "demo | PostgreSQL not found: apt-get install postgresql-15")
	for _, args := range [][]string{{"update", "-qq"}, {"install", "-y", "-qq", "--no-install-recommends", "postgresql-15"}} {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Run(); err != nil {
			return "", fmt.Errorf("apt-get %s: %w", strings.Join(args, " "), err)
		}
	}
	if dir, ok := lookPostgres(); ok {
		return dir, nil
	}
	return "", errors.New("installed postgresql-15 but initdb is still not in /usr/lib/postgresql/*/bin")
}

func lookPostgres() (string, bool) {
	if p, err := exec.LookPath("initdb"); err == nil {
		if _, err := exec.LookPath("pg_ctl"); err == nil {
			return filepath.Dir(p), true
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	version := func(dir string) float64 {
		v, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(dir)), 64)
		return v
	}
	sort.Slice(dirs, func(i, j int) bool { return version(dirs[i]) > version(dirs[j]) })
	for _, d := range dirs {
		if fi, err := os.Stat(filepath.Join(d, "initdb")); err == nil && fi.Mode()&0o111 != 0 {
			return d, true
		}
	}
	return "", false
}

// startPostgres creates and starts a cluster under base (a directory the postgres OS user
// owns when we are root).
func startPostgres(bin, base string, cred *syscall.Credential) (*postgres, error) {
	p := &postgres{bin: bin, cred: cred, dataDir: filepath.Join(base, "pgdata"), logFile: filepath.Join(base, "postgres.log")}
	if err := p.run(60*time.Second, "initdb", "--no-sync", "--no-instructions", "-U", "postgres", "--auth=trust",
		"--encoding=UTF8", "--locale=C", "-D", p.dataDir); err != nil {
		return nil, err
	}
	var err error
	if p.port, err = freePort(); err != nil {
		return nil, err
	}
	conf := fmt.Sprintf(`
# --- outbox-demo ---
port = %d
listen_addresses = '127.0.0.1'
unix_socket_directories = '%s'
wal_level = logical
max_wal_senders = 10
max_replication_slots = 10
fsync = off
`, p.port, p.dataDir)
	f, err := os.OpenFile(filepath.Join(p.dataDir, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return nil, err
	}
	_, err = f.WriteString(conf)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("write postgresql.conf: %w", err)
	}
	if err := p.run(60*time.Second, "pg_ctl", "start", "-w", "-t", "60", "-D", p.dataDir, "-l", p.logFile); err != nil {
		b, _ := os.ReadFile(p.logFile)
		return nil, fmt.Errorf("%w\nserver log:\n%s", err, b)
	}
	if p.pid, err = postmasterPID(p.dataDir); err != nil {
		return nil, err
	}
	return p, nil
}

// URL is the superuser's URL for database postgres.
func (p *postgres) URL() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", p.port)
}

// stop shuts the cluster down (fast mode), then kills the postmaster by PID if it is still
// there.
func (p *postgres) stop() error {
	if p == nil || p.pid == 0 {
		return nil
	}
	err := p.run(20*time.Second, "pg_ctl", "stop", "-D", p.dataDir, "-m", "fast", "-w", "-t", "15")
	if alive(p.pid) {
		_ = syscall.Kill(p.pid, syscall.SIGKILL)
		for i := 0; i < 100 && alive(p.pid); i++ {
			time.Sleep(50 * time.Millisecond)
		}
	}
	if !alive(p.pid) {
		err = nil
	}
	p.pid = 0
	return err
}

func (p *postgres) run(timeout time.Duration, prog string, args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(p.bin, prog), args...)
	cmd.Dir = filepath.Dir(p.dataDir)
	// Own process group: a Ctrl-C in the terminal must not shut the postmaster down before
	// the relay confirmed its last position; the demo stops it last.
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred, Setpgid: true}
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.WaitDelay = time.Second // pg_ctl start leaves the postmaster holding no pipe of ours, but never hang on it
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w\n%s", prog, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// postgresCredential is the postgres OS user: initdb and postgres refuse to run as root.
func postgresCredential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root, Postgres must run as the OS user postgres, which does not exist (apt-get install postgresql-15 creates it): %w", err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

func postmasterPID(dataDir string) (int, error) {
	b, err := os.ReadFile(filepath.Join(dataDir, "postmaster.pid"))
	if err != nil {
		return 0, fmt.Errorf("read postmaster.pid: %w", err)
	}
	first, _, _ := strings.Cut(string(b), "\n")
	return strconv.Atoi(strings.TrimSpace(first))
}

func alive(pid int) bool {
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := strings.LastIndexByte(string(b), ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
