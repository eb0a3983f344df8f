package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
	"github.com/outbox-relay/outbox-relay/sink"
)

// sessionStats sums the "replication session ended" lines of a JSON relay log.
func sessionStats(t *testing.T, log string) (sessions int, published, duplicates uint64) {
	t.Helper()
	for _, line := range strings.Split(log, "\n") {
		if !strings.Contains(line, "replication session ended") {
			continue
		}
		var v struct {
			Published  uint64 `json:"published"`
			Duplicates uint64 `json:"duplicates"`
		}
		require.NoError(t, json.Unmarshal([]byte(line), &v))
		sessions++
		published += v.Published
		duplicates += v.Duplicates
	}
	return
}

// sessionSkips sums published, duplicate acks and skipped_stored over the session lines.
func sessionSkips(t *testing.T, log string) (published, duplicates, skipped uint64) {
	t.Helper()
	for _, line := range strings.Split(log, "\n") {
		if !strings.Contains(line, "replication session ended") {
			continue
		}
		var v struct {
			Published  uint64 `json:"published"`
			Duplicates uint64 `json:"duplicates"`
			Skipped    uint64 `json:"skipped_stored"`
		}
		require.NoError(t, json.Unmarshal([]byte(line), &v))
		published += v.Published
		duplicates += v.Duplicates
		skipped += v.Skipped
	}
	return
}

// On Postgres 15 even a clean restart sends back transactions the relay already confirmed
// (confirmed_flush is saved only at checkpoints). The relay resumes from its own higher
// position, so nothing is re-sent at all, and the stream holds each event once.
func TestRelay_PostgresRestartLeavesNoDuplicate(t *testing.T) {
	cluster := testenv.NewCluster(t)
	e := &env{pg: cluster.NewDatabase(t), nats: natsembed.JetStream(t)}
	e.migrate(t)
	stop, log := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	n := workload{Writers: 2, Aggregates: 10, Txs: 30, MaxTx: 20, Seed: 10}.run(t, e.pg)
	waitStream(t, e.nats.URL, uint64(n), 30*time.Second)

	for _, mode := range []string{"fast", "immediate"} {
		require.NoError(t, cluster.Stop(mode))
		require.NoError(t, cluster.Start())
		waitStreaming(t, e.pg, "outbox_relay")
		n += workload{Writers: 2, Aggregates: 10, Txs: 20, MaxTx: 20, Seed: uint64(len(mode))}.run(t, e.pg)
		waitStream(t, e.nats.URL, uint64(n), 60*time.Second)
	}
	require.NoError(t, stop())
	requireClean(t, check(t, outboxRows(t, e.pg), readStream(t, e.nats.URL, sink.DefaultStream)))
	sessions, published, dups := sessionStats(t, log.String())
	require.Equal(t, 3, sessions, "one session per Postgres run")
	require.Equal(t, uint64(n), published)
	require.Zero(t, dups, "resuming from the relay's own confirmed position re-sends nothing")
}

// While the broker is down the flush position must not move (the events are not stored), yet
// the relay must keep answering Postgres so the walsender (wal_sender_timeout = 10s in testenv)
// does not drop it.
func TestRelay_ConfirmedFlushHoldsWhileBrokerDownAndWalsenderSurvives(t *testing.T) {
	e := newEnv(t)
	// A 2s idle timeout: the outage (15s) is far longer, and the relay, blocked on a full
	// window, must not mistake its own not-reading for a dead connection.
	stop, log := inProcess(t, e.args("--max-in-flight", "4", "--ack-timeout", "1s", "--status-interval", "2s", "--pg-idle-timeout", "2s"))
	waitStreaming(t, e.pg, "outbox_relay")
	e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('a', '0', 'Before', '{}')`)
	waitStream(t, e.nats.URL, 1, 30*time.Second)
	var walsender int
	require.NoError(t, e.pg.QueryRow(t, `SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'outbox_relay'`).Scan(&walsender))
	require.Eventually(t, func() bool {
		var behind int64
		require.NoError(t, e.pg.QueryRow(t, `SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'outbox_relay'`).Scan(&behind))
		return behind == 0
	}, 10*time.Second, 50*time.Millisecond)

	e.nats.Shutdown()
	before := confirmedFlush(t, e.pg, "outbox_relay")
	e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
		SELECT 'a', g::text, 'During', jsonb_build_object('seq', g) FROM generate_series(1, 10) g`)
	time.Sleep(15 * time.Second) // the outage: longer than wal_sender_timeout
	require.Equal(t, before, confirmedFlush(t, e.pg, "outbox_relay"), "nothing may be confirmed while the broker is down")
	var pid int
	require.NoError(t, e.pg.QueryRow(t, `SELECT coalesce(active_pid, 0) FROM pg_replication_slots WHERE slot_name = 'outbox_relay'`).Scan(&pid))
	require.Equal(t, walsender, pid, "the walsender survived the outage (status updates kept flowing)")
	// The cluster's log is shared with the package's other tests (some freeze a relay on
	// purpose): only this relay's walsender counts.
	require.NotContains(t, e.pg.Cluster.Log(), fmt.Sprintf("[%d] LOG:  terminating walsender process due to replication timeout", walsender))
	require.NotContains(t, log.String(), "presumed dead")

	e.nats.Restart(t)
	waitStream(t, e.nats.URL, 11, 60*time.Second)
	require.Eventually(t, func() bool { return confirmedFlush(t, e.pg, "outbox_relay") > before }, 30*time.Second, 50*time.Millisecond)
	require.NoError(t, stop())
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	require.Len(t, recs, 11)
	for i, r := range recs[1:] {
		require.Equal(t, `{"seq": `+itoa(i+1)+`}`, string(r.Data), "order kept across the outage")
	}
}

// Writes to other tables produce no events, only keepalives. Confirming a keepalive's WAL end
// once nothing is in flight lets the slot advance, so an idle outbox does not pin WAL.
func TestRelay_IdleOutboxWithTrafficElsewhereLetsSlotAdvance(t *testing.T) {
	e := newEnv(t)
	stop, _ := inProcess(t, e.args("--status-interval", "1s"))
	waitStreaming(t, e.pg, "outbox_relay")
	before := confirmedFlush(t, e.pg, "outbox_relay")
	e.pg.Exec(t, `CREATE TABLE other (id int, pad text)`)
	for i := 0; i < 20; i++ {
		e.pg.Exec(t, `INSERT INTO other SELECT g, repeat('x', 100) FROM generate_series(1, 2000) g`)
	}
	waitSlotCaughtUp(t, e.pg, "outbox_relay", "an idle outbox must let the slot advance (it started at "+before.String()+")")

	// And no event was skipped by confirming the keepalive.
	e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('a', '1', 'After', '{}')`)
	waitStream(t, e.nats.URL, 1, 30*time.Second)
	require.NoError(t, stop())
}
