package testenv

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

const pgQueryTimeout = 30 * time.Second

// PG is a fresh database in a running cluster.
type PG struct {
	URL     string // postgres://postgres@127.0.0.1:PORT/DBNAME?sslmode=disable
	Port    int
	DBName  string
	Cluster *Cluster
}

// Postgres returns a new, empty database in the cluster shared by this test
// binary (started on first use, stopped by Main). The database is dropped in
// t.Cleanup. The package's TestMain must call Main.
func Postgres(t testing.TB) *PG {
	t.Helper()
	return sharedCluster(t).NewDatabase(t)
}

// NewDatabase creates a database with a unique name in c and drops it in
// t.Cleanup, together with its replication slots and prepared transactions.
func (c *Cluster) NewDatabase(t testing.TB) *PG {
	t.Helper()
	name := uniqueDBName(t.Name())
	ctx, cancel := context.WithTimeout(context.Background(), pgQueryTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.URL("postgres"))
	if err == nil {
		_, err = conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize())
		conn.Close(ctx)
	}
	if err != nil {
		t.Fatalf("testenv: create database %s on port %d: %v", name, c.Port, err)
	}
	pg := &PG{URL: c.URL(name), Port: c.Port, DBName: name, Cluster: c}
	t.Cleanup(func() { pg.drop(t) })
	return pg
}

// ReplicationURL returns URL with replication=database, for logical
// replication connections (pglogrepl and pgconn).
func (p *PG) ReplicationURL() string { return p.URL + "&replication=database" }

// Exec runs sql on a new connection and fails the test on error. Without
// args, sql may hold several ;-separated statements. A connection per call
// keeps Exec working across cluster restarts.
func (p *PG) Exec(t testing.TB, sql string, args ...any) pgconn.CommandTag {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), pgQueryTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, p.URL)
	if err != nil {
		t.Fatalf("testenv: connect to %s: %v", p.URL, err)
	}
	defer conn.Close(ctx)
	tag, err := conn.Exec(ctx, sql, args...)
	if err != nil {
		t.Fatalf("testenv: exec %q in %s: %v", sql, p.DBName, err)
	}
	return tag
}

// QueryRow runs a query returning at most one row on a new connection.
// Errors, including failing to connect, are returned by Scan and name the
// query:
//
//	var level string
//	require.NoError(t, pg.QueryRow(t, "SHOW wal_level").Scan(&level))
func (p *PG) QueryRow(t testing.TB, sql string, args ...any) pgx.Row {
	t.Helper()
	return &row{url: p.URL, sql: sql, args: args}
}

// row defers the query to Scan so that the connection is closed after it.
type row struct {
	url, sql string
	args     []any
}

func (r *row) Scan(dest ...any) error {
	ctx, cancel := context.WithTimeout(context.Background(), pgQueryTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, r.url)
	if err != nil {
		return fmt.Errorf("query %q: connect: %w", r.sql, err)
	}
	defer conn.Close(ctx)
	if err := conn.QueryRow(ctx, r.sql, r.args...).Scan(dest...); err != nil {
		return fmt.Errorf("query %q: %w", r.sql, err)
	}
	return nil
}

// Conn opens a connection to the database, closed in t.Cleanup. Use it for
// several queries in a row or for session state such as PREPARE TRANSACTION.
func (p *PG) Conn(t testing.TB) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), pgQueryTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, p.URL)
	if err != nil {
		t.Fatalf("testenv: connect to %s: %v", p.URL, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = conn.Close(ctx)
	})
	return conn
}

// drop removes the database: replication slots first (terminating the
// walsenders holding them), then prepared transactions, both of which would
// block DROP DATABASE, then DROP DATABASE ... WITH (FORCE), which terminates
// remaining sessions. Failures are logged, not fatal: the cluster is
// throwaway. Nothing is done if the test left the cluster stopped.
func (p *PG) drop(t testing.TB) {
	if !p.Cluster.Running() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), pgQueryTimeout)
	defer cancel()
	logf := func(format string, args ...any) {
		t.Logf("testenv: cleanup of database %s: "+format, append([]any{p.DBName}, args...)...)
	}

	admin, err := pgx.Connect(ctx, p.Cluster.URL("postgres"))
	if err != nil {
		logf("connect: %v", err)
		return
	}
	defer admin.Close(ctx)

	slotCtx, cancelSlots := context.WithTimeout(ctx, 10*time.Second)
	defer cancelSlots()
	if err := dropReplicationSlots(slotCtx, admin, p.DBName); err != nil {
		logf("drop replication slots: %v", err)
	}
	if err := rollbackPrepared(ctx, admin, p.URL, p.DBName); err != nil {
		logf("roll back prepared transactions: %v", err)
	}
	if _, err := admin.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{p.DBName}.Sanitize()+" WITH (FORCE)"); err != nil {
		logf("drop database: %v", err)
	}
}

// dropReplicationSlots drops the slots of database dbname, terminating the
// backends that hold active ones; it retries until they are released.
func dropReplicationSlots(ctx context.Context, admin *pgx.Conn, dbname string) error {
	var lastErr error
	for {
		rows, err := admin.Query(ctx, "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = $1", dbname)
		if err != nil {
			return err
		}
		type slot struct {
			name string
			pid  *int32
		}
		slots, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (s slot, err error) {
			return s, r.Scan(&s.name, &s.pid)
		})
		if err != nil {
			return err
		}
		if len(slots) == 0 {
			return nil
		}
		for _, s := range slots {
			if s.pid != nil {
				_, lastErr = admin.Exec(ctx, "SELECT pg_terminate_backend($1)", *s.pid)
				continue
			}
			if _, err := admin.Exec(ctx, "SELECT pg_drop_replication_slot($1)", s.name); err != nil {
				lastErr = err // e.g. became active again in between; retry
			}
		}
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), lastErr)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// rollbackPrepared rolls back the prepared transactions of database dbname,
// which can only be done while connected to it.
func rollbackPrepared(ctx context.Context, admin *pgx.Conn, dbURL, dbname string) error {
	rows, err := admin.Query(ctx, "SELECT gid FROM pg_prepared_xacts WHERE database = $1", dbname)
	if err != nil {
		return err
	}
	gids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil || len(gids) == 0 {
		return err
	}
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	var errs []error
	for _, gid := range gids {
		// ROLLBACK PREPARED takes a literal, not a parameter.
		if _, err := conn.Exec(ctx, "ROLLBACK PREPARED '"+strings.ReplaceAll(gid, "'", "''")+"'"); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// uniqueDBName derives a database name from the test name plus a random
// suffix, within PostgreSQL's 63-byte identifier limit.
func uniqueDBName(testName string) string {
	var b strings.Builder
	b.WriteString("t_")
	for _, r := range strings.ToLower(testName) {
		if b.Len() >= 44 {
			break
		}
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	fmt.Fprintf(&b, "_%08x", rand.Uint32())
	return b.String()
}
