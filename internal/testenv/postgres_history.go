package testenv

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// Snapshot takes a copy of the data directory as a file-system snapshot or a backup would:
// it stops the server (fast), copies the directory, and starts it again. Restore puts the
// copy back. The copy is removed with the cluster.
func (c *Cluster) Snapshot() (string, error) {
	if err := c.checkOwnable("snapshot postgres"); err != nil {
		return "", err
	}
	if err := c.Stop(StopFast); err != nil {
		return "", err
	}
	c.mu.Lock()
	c.snapshots++
	snap := filepath.Join(c.baseDir, "snapshot-"+strconv.Itoa(c.snapshots))
	err := c.run("/bin/cp", pgStopTimeout, "-a", c.DataDir, snap)
	c.mu.Unlock()
	if err != nil {
		return "", fmt.Errorf("testenv: snapshot %s: %w", c.DataDir, err)
	}
	return snap, c.Start()
}

// Restore replaces the data directory with snap (from Snapshot), as an operator restoring a
// snapshot or backup does: the server is stopped (immediate), the directory swapped, and the
// server started on the same port. Its WAL then ends where the snapshot's did.
func (c *Cluster) Restore(snap string) error {
	if err := c.checkOwnable("restore postgres"); err != nil {
		return err
	}
	if c.Running() {
		if err := c.Stop(StopImmediate); err != nil {
			return err
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.run("/bin/rm", pgStopTimeout, "-rf", c.DataDir); err != nil {
		return fmt.Errorf("testenv: restore: remove %s: %w", c.DataDir, err)
	}
	if err := c.run("/bin/cp", pgStopTimeout, "-a", snap, c.DataDir); err != nil {
		return fmt.Errorf("testenv: restore %s: %w", snap, err)
	}
	if err := c.startLocked(); err != nil {
		return fmt.Errorf("testenv: restore: %w", err)
	}
	return nil
}

// NewStandby makes a streaming physical standby of c (pg_basebackup -R into a data directory
// of its own, own port) and starts it. With slot, it streams from that physical slot of c
// (created by pg_basebackup -C). It is removed in t.Cleanup. Promote makes it a primary.
func (c *Cluster) NewStandby(t testing.TB, slot string) *Cluster {
	t.Helper()
	s, err := c.newStandby(slot)
	if err != nil {
		t.Fatalf("testenv: new standby of the cluster on port %d: %v", c.Port, err)
	}
	t.Cleanup(func() {
		if err := s.destroy(); err != nil {
			t.Errorf("testenv: destroy standby %s: %v", s.DataDir, err)
		}
	})
	return s
}

func (c *Cluster) newStandby(slot string) (_ *Cluster, err error) {
	base, err := os.MkdirTemp("", pgDirPrefix)
	if err != nil {
		return nil, fmt.Errorf("create standby directory: %w", err)
	}
	s := &Cluster{
		DataDir:    filepath.Join(base, "data"),
		LogFile:    filepath.Join(base, "postgres.log"),
		baseDir:    base,
		env:        c.env,
		baseConfig: c.baseConfig,
	}
	defer func() {
		if err != nil {
			_ = s.destroy()
		}
	}()
	if err := os.WriteFile(filepath.Join(base, pgOwnerFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return nil, fmt.Errorf("write owner file: %w", err)
	}
	if c.env.cred != nil {
		if err := chownTree(base, int(c.env.cred.Uid), int(c.env.cred.Gid)); err != nil {
			return nil, fmt.Errorf("hand standby directory to user postgres: %w", err)
		}
	}
	basebackup := filepath.Join(filepath.Dir(c.env.pgCtl), "pg_basebackup")
	if real, err := filepath.EvalSymlinks(c.env.pgCtl); err == nil {
		basebackup = filepath.Join(filepath.Dir(real), "pg_basebackup") // the same version as pg_ctl
	}
	args := []string{"-h", "127.0.0.1", "-p", strconv.Itoa(c.Port), "-U", "postgres", "-D", s.DataDir, "-R", "-X", "stream", "-c", "fast", "--no-sync"}
	if slot != "" {
		args = append(args, "-C", "-S", slot)
	}
	if err := s.run(basebackup, time.Minute, args...); err != nil {
		return nil, err
	}
	for attempt := 1; ; attempt++ {
		if s.Port, err = freePort(); err != nil {
			return nil, fmt.Errorf("pick a port: %w", err)
		}
		if err := s.writeConfig([]string{"hot_standby = on"}); err != nil {
			return nil, err
		}
		s.mu.Lock()
		err = s.startLocked()
		s.mu.Unlock()
		if err == nil {
			return s, nil
		}
		if attempt == 3 {
			return nil, err
		}
	}
}

// Promote ends recovery on a standby (pg_ctl promote -w): it becomes a primary on a new
// timeline.
func (c *Cluster) Promote() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.pgCtl(pgStartTimeout, "promote", "-D", c.DataDir, "-w", "-t", seconds(pgStartTimeout)); err != nil {
		return fmt.Errorf("testenv: promote %s: %w", c.DataDir, err)
	}
	return nil
}
