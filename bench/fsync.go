package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// runLatencyFsync is the latency scenario with Postgres' fsync (and so the commit's WAL flush)
// on: every figure of runLatency, the bare pipe's included, under "latency fsync-on". The
// cluster runs with fsync = off otherwise; fsync takes effect on a configuration reload.
func (e *env) runLatencyFsync(ctx context.Context, o opts, rep int) (figures, error) {
	if err := e.setFsync(ctx, true); err != nil {
		return nil, err
	}
	defer e.setFsync(context.Background(), false) //nolint:errcheck
	f, err := e.runLatency(ctx, o, rep)
	if err != nil {
		return nil, err
	}
	on := figures{}
	for k, v := range f {
		on["latency fsync-on"+strings.TrimPrefix(k, "latency")] = v
	}
	return on, nil
}

func (e *env) setFsync(ctx context.Context, on bool) error {
	conn, err := pgx.Connect(ctx, e.cluster.URL("postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	stmt := "ALTER SYSTEM RESET fsync"
	if on {
		stmt = "ALTER SYSTEM SET fsync = on"
	}
	if _, err := conn.Exec(ctx, stmt); err != nil {
		return err
	}
	if _, err = conn.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
		return err
	}
	// The reload is signalled, not awaited: new backends (the next walsender, the producer's
	// connection) read it; check on a new connection that it took.
	want := map[bool]string{true: "on", false: "off"}[on]
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		c, err := pgx.Connect(ctx, e.cluster.URL("postgres"))
		if err != nil {
			return err
		}
		var got string
		err = c.QueryRow(ctx, "SHOW fsync").Scan(&got)
		c.Close(ctx)
		if err != nil {
			return err
		}
		if got == want {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("fsync is still %s 10s after setting it %s", got, want)
		}
	}
}
