package main

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/sink"
)

func insertEvents(t *testing.T, e *env, aggregate string, n int) {
	t.Helper()
	e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
		SELECT 'o', $1, 'E', jsonb_build_object('seq', g) FROM generate_series(1, $2::int) g`, aggregate, n)
}

func TestStandby_SecondRelayTakesOverWhenTheFirstStops(t *testing.T) {
	e := newEnv(t)
	stopA, logA := inProcess(t, e.args("--standby"))
	waitStreaming(t, e.pg, "outbox_relay")
	stopB, logB := inProcess(t, e.args("--standby"))
	baseB := httpAddrOf(t, logB)
	require.Eventually(t, func() bool { return strings.Contains(logB.String(), "standing by: another relay holds the slot") },
		30*time.Second, 20*time.Millisecond)
	code, body := testenv.HTTPGet(t, baseB+"/readyz")
	require.Equal(t, http.StatusServiceUnavailable, code)
	require.Contains(t, body, "standing by")
	// /readyz?standby=ok: a standby waiting for the slot counts as ready (the Kubernetes
	// readiness probe of the pair in deploy/kubernetes); the active relay is ready either way.
	code, body = testenv.HTTPGet(t, baseB+"/readyz?standby=ok")
	require.Equal(t, http.StatusOK, code, body)
	// The active relay is ready once its session is set up, a moment after the slot turns
	// active (waitStreaming): it then checks the slot against its position record.
	require.Eventually(t, func() bool {
		code, _ := testenv.HTTPGet(t, httpAddrOf(t, logA)+"/readyz?standby=ok")
		return code == http.StatusOK
	}, 10*time.Second, 20*time.Millisecond)

	insertEvents(t, e, "a", 50)
	waitStream(t, e.nats.URL, 50, 30*time.Second)
	require.NotContains(t, logB.String(), "replication started", "the standby must not read while the slot is held")

	require.NoError(t, stopA())
	require.Eventually(t, func() bool { return strings.Contains(logB.String(), "replication started") }, 30*time.Second, 20*time.Millisecond)
	require.Eventually(t, func() bool { code, _ := testenv.HTTPGet(t, baseB+"/readyz"); return code == http.StatusOK }, 10*time.Second, 20*time.Millisecond)
	insertEvents(t, e, "b", 50)
	waitStream(t, e.nats.URL, 100, 30*time.Second)
	require.NoError(t, stopB())
	require.Equal(t, 1, strings.Count(logB.String(), "standing by:"), "logged once per minute, not per attempt")
	requireClean(t, check(t, outboxRows(t, e.pg), readStream(t, e.nats.URL, sink.DefaultStream)))
}

func TestTemporarySlot_LivesOnlyWhileTheRelayRuns(t *testing.T) {
	e := newEnv(t)
	stop, _ := inProcess(t, e.args("--temporary-slot", "--slot", "dev_tmp"))
	waitStreaming(t, e.pg, "dev_tmp")
	var temporary bool
	require.NoError(t, e.pg.QueryRow(t, `SELECT temporary FROM pg_replication_slots WHERE slot_name = 'dev_tmp'`).Scan(&temporary))
	require.True(t, temporary)
	insertEvents(t, e, "t", 10)
	waitStream(t, e.nats.URL, 10, 30*time.Second)
	require.NoError(t, stop())
	require.Eventually(t, func() bool {
		var n int
		require.NoError(t, e.pg.QueryRow(t, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'dev_tmp'`).Scan(&n))
		return n == 0
	}, 10*time.Second, 20*time.Millisecond, "the temporary slot is dropped with the connection")

	// A persistent slot of the same name is refused.
	e.pg.Exec(t, `SELECT pg_create_logical_replication_slot('dev_tmp', 'pgoutput')`)
	msg, _ := runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--temporary-slot", "--slot", "dev_tmp")
	require.Contains(t, msg, `--temporary-slot: a slot named "dev_tmp" already exists`)
}

func TestStartLSN_SkipsEarlierEventsAndIsRefusedBehindTheSlot(t *testing.T) {
	e := newEnv(t)
	e.createSlot(t)
	insertEvents(t, e, "skipped", 3)
	var at string
	require.NoError(t, e.pg.QueryRow(t, `SELECT pg_current_wal_lsn()::text`).Scan(&at))
	insertEvents(t, e, "kept", 2)

	msg, _ := runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--start-lsn", "0/1")
	require.Contains(t, msg, "--start-lsn 0/1 is behind the slot's confirmed_flush_lsn")

	stop, _ := inProcess(t, e.args("--start-lsn", at))
	waitStream(t, e.nats.URL, 2, 30*time.Second)
	insertEvents(t, e, "marker", 1)
	waitStream(t, e.nats.URL, 3, 30*time.Second)
	require.NoError(t, stop())
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	require.Len(t, recs, 3)
	for i, want := range []string{"kept", "kept", "marker"} {
		require.Equal(t, want, recs[i].Header.Get(sink.HeaderAggregateID))
	}
}
