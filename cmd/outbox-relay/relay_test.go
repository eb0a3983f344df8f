package main

import (
	"bytes"
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/sink"
)

func TestRelay_DeliversEveryEventOnceInAggregateOrderWithExactBodyAndHeaders(t *testing.T) {
	e := newEnv(t)
	stop, _ := inProcess(t, e.args("--max-in-flight", "64"))
	waitStreaming(t, e.pg, "outbox_relay")
	n := workload{Writers: 4, Aggregates: 25, Txs: 60, MaxTx: 40, Seed: 1}.run(t, e.pg)
	waitStream(t, e.nats.URL, uint64(n), 60*time.Second)
	require.NoError(t, stop())

	rows := outboxRows(t, e.pg)
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	requireClean(t, check(t, rows, recs))
	for _, r := range recs {
		id := r.Header.Get(sink.HeaderMsgID)
		row := rows[id]
		require.Equal(t, "outbox.order.Order_Updated", r.Subject)
		require.Equal(t, row.Payload, string(r.Data), "body must be the payload exactly as Postgres outputs it")
		require.Equal(t, "order", r.Header.Get(sink.HeaderAggregateType))
		require.Equal(t, row.AggregateID, r.Header.Get(sink.HeaderAggregateID))
		require.Equal(t, "Order.Updated", r.Header.Get(sink.HeaderEventType))
		require.Equal(t, row.CreatedAt, r.Header.Get(sink.HeaderCreatedAt))
		require.Equal(t, "00-"+row.AggregateID+"-01", r.Header.Get("traceparent"))
		require.Empty(t, r.Header.Get("n"), "non-string headers are not copied")
		require.NotEmpty(t, r.Header.Get(sink.HeaderCommitLSN))
	}
	// Everything acked: the slot has confirmed past every transaction.
	require.Eventually(t, func() bool {
		var behind int64
		require.NoError(t, e.pg.QueryRow(t, `SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'outbox_relay'`).Scan(&behind))
		return behind < 1<<20
	}, 10*time.Second, 100*time.Millisecond)
}

func TestRelay_RollbackPublishesNothing(t *testing.T) {
	e := newEnv(t)
	stop, _ := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	e.pg.Exec(t, `BEGIN;
		INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) SELECT gen_random_uuid(), 'rb', g::text, 'Gone', '{}' FROM generate_series(1, 3000) g;
		ROLLBACK;`)
	e.pg.Exec(t, `BEGIN; SAVEPOINT s;
		INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('rb', 'sp', 'Gone', '{}');
		ROLLBACK TO s;
		INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('ok', 'marker', 'Kept', '{}');
		COMMIT;`)
	waitStream(t, e.nats.URL, 1, 30*time.Second)
	require.NoError(t, stop())
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	require.Len(t, recs, 1)
	require.Equal(t, "outbox.ok.Kept", recs[0].Subject)
}

func TestRelay_InsertDeletedInSameTransactionIsStillPublished(t *testing.T) {
	e := newEnv(t)
	stop, _ := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	e.pg.Exec(t, `BEGIN;
		INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) VALUES ('00000000-0000-4000-8000-000000000001', 'order', '1', 'Created', '{"x": 1}');
		DELETE FROM outbox WHERE id = '00000000-0000-4000-8000-000000000001';
		COMMIT;
		INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', '2', 'Created', '{}');
		UPDATE outbox SET event_type = 'Changed';
		DELETE FROM outbox;
		TRUNCATE outbox;`)
	waitStream(t, e.nats.URL, 2, 30*time.Second)
	// Give ignored UPDATE/DELETE/TRUNCATE a chance to (wrongly) produce something.
	e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', '3', 'Last', '{}')`)
	waitStream(t, e.nats.URL, 3, 30*time.Second)
	require.NoError(t, stop())
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	require.Len(t, recs, 3)
	require.Equal(t, "00000000-0000-4000-8000-000000000001", recs[0].Header.Get(sink.HeaderMsgID))
	require.Equal(t, `{"x": 1}`, string(recs[0].Data))
	require.Equal(t, "outbox.order.Last", recs[2].Subject)
}

func TestRelay_RestartAfterCancelLosesNothingAndDuplicatesNothing(t *testing.T) {
	e := newEnv(t)
	stop, _ := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	n1 := workload{Writers: 2, Aggregates: 10, Txs: 30, MaxTx: 20, Seed: 2}.run(t, e.pg)
	waitStream(t, e.nats.URL, uint64(n1), 30*time.Second)
	require.NoError(t, stop())
	// Written while the relay is down.
	n2 := workload{Writers: 2, Aggregates: 10, Txs: 30, MaxTx: 20, Seed: 3}.run(t, e.pg)
	stop, _ = inProcess(t, e.args())
	waitStream(t, e.nats.URL, uint64(n1+n2), 30*time.Second)
	require.NoError(t, stop())
	requireClean(t, check(t, outboxRows(t, e.pg), readStream(t, e.nats.URL, sink.DefaultStream)))
}

// The relay is SIGKILLed after JetStream stored events but before their position reached
// Postgres: on restart Postgres re-sends them and JetStream absorbs the copies.
func TestRelay_SIGKILLAfterPublishBeforeConfirmLosesNothing(t *testing.T) {
	e := newEnv(t)
	e.createSlot(t)
	n := workload{Writers: 3, Aggregates: 20, Txs: 40, MaxTx: 30, Seed: 4}.run(t, e.pg)
	p := startProc(t, e.args("--status-interval", "1h"), "OUTBOX_RELAY_FAILPOINT=kill_after_acks:500")
	require.Equal(t, -1, p.wait(t, 60*time.Second), "the failpoint kills the relay")
	stored := streamMsgs(t, e.nats.URL, sink.DefaultStream)
	require.GreaterOrEqual(t, stored, uint64(500))
	require.Less(t, stored, uint64(n))

	p = startProc(t, e.args())
	waitStream(t, e.nats.URL, uint64(n), 60*time.Second)
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	require.Equal(t, 0, p.wait(t, 30*time.Second))
	requireClean(t, check(t, outboxRows(t, e.pg), readStream(t, e.nats.URL, sink.DefaultStream)))
	require.Contains(t, p.log.String(), `"slot":"outbox_relay"`)
}

// One INSERT ... SELECT: every row shares one commit (and many share a WAL position). A kill in
// the middle must not lose the rest of the transaction.
func TestRelay_BigMultiRowInsertArrivesWholeAfterKillInItsMiddle(t *testing.T) {
	e := newEnv(t)
	e.createSlot(t)
	e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
		SELECT 'bulk', (g % 50)::text, 'Imported', jsonb_build_object('agg', (g % 50)::text, 'seq', g) FROM generate_series(1, 20000) g`)
	p := startProc(t, e.args(), "OUTBOX_RELAY_FAILPOINT=kill_after_acks:7000")
	require.Equal(t, -1, p.wait(t, 60*time.Second))
	require.Less(t, streamMsgs(t, e.nats.URL, sink.DefaultStream), uint64(20000))
	p = startProc(t, e.args())
	waitStream(t, e.nats.URL, 20000, 60*time.Second)
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	require.Equal(t, 0, p.wait(t, 30*time.Second))
	rows := outboxRows(t, e.pg)
	requireClean(t, check(t, rows, readStream(t, e.nats.URL, sink.DefaultStream)))
}

func TestRelay_SIGTERMDrainsConfirmsAndExitsZero(t *testing.T) {
	e := newEnv(t)
	p := startProc(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	n := workload{Writers: 2, Aggregates: 5, Txs: 20, MaxTx: 10, Seed: 5}.run(t, e.pg)
	waitStream(t, e.nats.URL, uint64(n), 30*time.Second)
	var walNow string
	require.NoError(t, e.pg.QueryRow(t, `SELECT pg_current_wal_lsn()::text`).Scan(&walNow))
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	require.Equal(t, 0, p.wait(t, 30*time.Second))
	require.Contains(t, p.log.String(), "final position confirmed")
	// The final status update confirmed the last transaction: nothing is re-sent on restart.
	before := streamMsgs(t, e.nats.URL, sink.DefaultStream)
	stop, log := inProcess(t, e.args())
	e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('m', 'm', 'M', '{}')`)
	waitStream(t, e.nats.URL, before+1, 30*time.Second)
	require.NoError(t, stop())
	require.Equal(t, before+1, streamMsgs(t, e.nats.URL, sink.DefaultStream))
	_ = log
}

func TestRelay_MissingSlotIsAnErrorNamingTheFlag(t *testing.T) {
	e := newEnv(t)
	var out bytes.Buffer
	err := dispatch(context.Background(), []string{"run", "--pg-url", e.pg.URL, "--nats-url", e.nats.URL}, &out, &out, noEnv)
	require.ErrorContains(t, err, "--create-slot")
}

func TestMigrate_IsIdempotent(t *testing.T) {
	e := newEnv(t) // migrated once
	var out bytes.Buffer
	require.NoError(t, dispatch(context.Background(), []string{"migrate", "--pg-url", e.pg.URL}, &out, &out, noEnv))
	require.Contains(t, out.String(), `created_table=false`)
	require.Contains(t, out.String(), `created_publication=false`)
	var n int
	require.NoError(t, e.pg.QueryRow(t, `SELECT count(*) FROM pg_publication_tables WHERE pubname = 'outbox_pub' AND tablename = 'outbox'`).Scan(&n))
	require.Equal(t, 1, n)
}

// Exactly once into the stream past the duplicate window: the relay is killed after JetStream
// stored events whose position Postgres never got, and restarts after the stream's 1 s
// duplicate window expired. Postgres re-sends those events; the relay skips the ones the stream
// already holds (read from its last message's Outbox-Commit-Lsn/Outbox-Tx-Index), so JetStream
// dedup is not needed.
func TestRelay_KillAndRestartAfterDuplicateWindowStoresNoDuplicate(t *testing.T) {
	e := newEnv(t)
	e.createSlot(t)
	n := workload{Writers: 3, Aggregates: 20, Txs: 40, MaxTx: 30, Seed: 14}.run(t, e.pg)
	args := e.args("--duplicate-window", "1s", "--status-interval", "1h")
	p := startProc(t, args, "OUTBOX_RELAY_FAILPOINT=kill_after_acks:500")
	require.Equal(t, -1, p.wait(t, 60*time.Second), "the failpoint kills the relay")
	stored := streamMsgs(t, e.nats.URL, sink.DefaultStream)
	require.GreaterOrEqual(t, stored, uint64(500))
	time.Sleep(1500 * time.Millisecond) // the duplicate window expires

	p = startProc(t, args)
	waitStream(t, e.nats.URL, uint64(n), 60*time.Second)
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	require.Equal(t, 0, p.wait(t, 30*time.Second))
	requireClean(t, check(t, outboxRows(t, e.pg), readStream(t, e.nats.URL, sink.DefaultStream)))
	_, _, skipped := sessionSkips(t, p.log.String())
	require.NotZero(t, skipped, "replayed events were skipped, not left to JetStream dedup")
}
