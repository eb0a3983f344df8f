package main

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func prune(t *testing.T, e *env, extra ...string) string {
	t.Helper()
	var out bytes.Buffer
	args := append([]string{"prune", "--pg-url", e.pg.URL, "--older-than", "72h", "--log-level", "warn"}, extra...)
	require.NoError(t, dispatch(context.Background(), args, &out, &out, noEnv))
	return out.String()
}

func countRows(t *testing.T, e *env, where string) int {
	t.Helper()
	var n int
	require.NoError(t, e.pg.QueryRow(t, `SELECT count(*) FROM outbox WHERE `+where).Scan(&n))
	return n
}

func TestPrune_DeletesOnlyOldRowsTheSlotHasConfirmed(t *testing.T) {
	e := newEnv(t)
	e.createSlot(t)
	insertOld := `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at)
		SELECT 'order', g::text, 'Old', '{}', now() - interval '100 hours' FROM generate_series(1, 50) g`
	e.pg.Exec(t, insertOld)
	e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) SELECT 'order', g::text, 'New', '{}' FROM generate_series(1, 5) g`)

	// Old enough, but not published yet: the relay is not running, nothing may go.
	require.Contains(t, prune(t, e), "deleted 0 rows")
	require.Equal(t, 55, countRows(t, e, "true"))

	stop, _ := inProcess(t, e.args("--status-interval", "1s"))
	waitStream(t, e.nats.URL, 55, 30*time.Second)
	// The slot's catalog_xmin moves past the rows once a running-transactions record (logged
	// by CHECKPOINT) is decoded and the relay confirmed a position after it.
	require.Eventually(t, func() bool {
		e.pg.Exec(t, `CHECKPOINT`)
		return prune(t, e, "--dry-run") == "would delete 50 rows from \"public\".\"outbox\"\n"
	}, 30*time.Second, 200*time.Millisecond)

	// Old rows committed now, with the relay stopped, are not confirmed and stay.
	require.NoError(t, stop())
	e.pg.Exec(t, insertOld)
	require.Contains(t, prune(t, e, "--batch", "7"), "deleted 50 rows")
	require.Equal(t, 50, countRows(t, e, "event_type = 'Old'"), "the unconfirmed old rows stay")
	require.Equal(t, 5, countRows(t, e, "event_type = 'New'"), "rows newer than --older-than stay")
}

func TestPrune_RefusesWithoutTheSlot(t *testing.T) {
	e := newEnv(t)
	var out bytes.Buffer
	err := dispatch(context.Background(), []string{"prune", "--pg-url", e.pg.URL, "--older-than", "1h", "--slot", "nope"}, &out, &out, noEnv)
	require.ErrorContains(t, err, `replication slot "nope" does not exist`)
	err = dispatch(context.Background(), []string{"prune", "--pg-url", e.pg.URL}, &out, &out, noEnv)
	require.ErrorContains(t, err, "--older-than is required")
}
