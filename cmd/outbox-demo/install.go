package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// installPostgres makes sure the PostgreSQL server binaries exist (PATH or
// /usr/lib/postgresql/*/bin, where the demo's cluster looks for them). When they are missing
// and install is true and we are root on a Debian-like system, it installs postgresql-15 with
// apt-get.
func installPostgres(ctx context.Context, install bool, out io.Writer) error {
	if havePostgres() {
		return nil
	}
	if !install {
		return errors.New("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql-15")
	}
	if os.Geteuid() != 0 {
		return errors.New("PostgreSQL server binaries (initdb, pg_ctl) not found; install them: sudo apt-get install postgresql-15")
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		return errors.New("PostgreSQL server binaries (initdb, pg_ctl) not found and apt-get is missing: install the PostgreSQL 15 server package")
	}
	fmt.Fprintln(out, "demo     | PostgreSQL not found: apt-get install postgresql-15")
	for _, args := range [][]string{{"update", "-qq"}, {"install", "-y", "-qq", "--no-install-recommends", "postgresql-15"}} {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("apt-get %s: %w", strings.Join(args, " "), err)
		}
	}
	if !havePostgres() {
		return errors.New("installed postgresql-15 but initdb is still not in /usr/lib/postgresql/*/bin")
	}
	return nil
}

func havePostgres() bool {
	if _, err := exec.LookPath("initdb"); err == nil {
		if _, err := exec.LookPath("pg_ctl"); err == nil {
			return true
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	return len(dirs) > 0
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
