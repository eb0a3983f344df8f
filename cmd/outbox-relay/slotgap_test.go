package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/sink"
)

// positionRecord reads the relay's position record of the default stream and prefix.
func positionRecord(t *testing.T, n *natsembed.NATS) sink.SourcePosition {
	t.Helper()
	js, closeNC := connectJS(t, n.URL)
	defer closeNC()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := sink.OpenPositionRecord(ctx, js, sink.DefaultPositionBucket, sink.Config{})
	require.NoError(t, err)
	p, ok, err := r.Get(ctx)
	require.NoError(t, err)
	require.True(t, ok, "no position record")
	return p
}

// relayEvents runs a relay until n new events are in the stream (which held none), then stops it.
func relayEvents(t *testing.T, e *env, tag string, n int) {
	t.Helper()
	stop, _ := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, tag, n)
	waitStream(t, e.nats.URL, uint64(n), 30*time.Second)
	require.NoError(t, stop())
}

// requireNeverAhead: the slot never confirmed a position the record does not hold.
func requireNeverAhead(t *testing.T, e *env) {
	t.Helper()
	rec := positionRecord(t, e.nats)
	slot := confirmedFlush(t, e.pg, "outbox_relay")
	require.LessOrEqual(t, slot, rec.LSN, "the slot confirmed %s, the record holds %s", slot, rec.LSN)
}

// The backfill of the gap itself: TestBackfill_RepublishesEventsCommittedWhileTheSlotWasGone.
func TestSlotGap_RecreatedSlotRefusedThenAccepted(t *testing.T) {
	e := newEnv(t)
	stop, _ := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	n := workload{Writers: 2, Aggregates: 10, Txs: 20, MaxTx: 10, Seed: 4}.run(t, e.pg)
	waitStream(t, e.nats.URL, uint64(n), 30*time.Second)
	require.NoError(t, stop())
	requireNeverAhead(t, e)
	rec := positionRecord(t, e.nats)

	// The slot is dropped; events are committed; a new slot is created past them.
	e.pg.Exec(t, `SELECT pg_drop_replication_slot('outbox_relay')`)
	insertGapEvents(t, e.pg, "lost", 30)
	e.pg.Exec(t, `SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')`)

	err := runToStop(t, e.args())
	require.ErrorIs(t, err, relay.ErrSlotGap)
	msg := err.Error()
	require.Contains(t, msg, `replication slot "outbox_relay" is at `)
	require.Contains(t, msg, "this relay last confirmed "+rec.LSN.String())
	require.Contains(t, msg, "--accept-slot-gap")
	require.Contains(t, msg, "outbox-relay backfill")
	require.Contains(t, msg, "--since ")
	require.Equal(t, uint64(n), streamMsgs(t, e.nats.URL, sink.DefaultStream), "nothing published while refusing")

	// The operator accepts the gap: the relay continues with new events.
	stop, log := inProcess(t, e.args("--accept-slot-gap"))
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "live", 5)
	waitStream(t, e.nats.URL, uint64(n+5), 30*time.Second)
	require.Contains(t, log.String(), "--accept-slot-gap: continuing past a slot gap")
	require.NoError(t, stop())
	requireNeverAhead(t, e)

	// The accepted gap is history: a plain restart starts.
	stop, _ = inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "restart", 2)
	waitStream(t, e.nats.URL, uint64(n+7), 30*time.Second)
	require.NoError(t, stop())
	// Everything but the gap arrived (backfilling it is the operator's next step).
	rows := outboxRows(t, e.pg)
	for id, r := range rows {
		if strings.HasPrefix(r.AggregateID, "lost-") {
			delete(rows, id)
		}
	}
	require.Len(t, rows, n+7)
	requireClean(t, check(t, rows, readStream(t, e.nats.URL, sink.DefaultStream)))
}

func TestSlotGap_AdvancedSlotRefused(t *testing.T) {
	e := newEnv(t)
	relayEvents(t, e, "before", 3)

	// Someone skips the slot past events the relay never saw.
	insertGapEvents(t, e.pg, "skipped", 4)
	e.pg.Exec(t, `SELECT pg_replication_slot_advance('outbox_relay', pg_current_wal_lsn())`)
	err := runToStop(t, e.args())
	require.ErrorIs(t, err, relay.ErrSlotGap)
	require.Contains(t, err.Error(), "advanced by someone else")
	require.Equal(t, uint64(3), streamMsgs(t, e.nats.URL, sink.DefaultStream))
}

func TestSlotGap_CreateSlotRefusesReplacement(t *testing.T) {
	e := newEnv(t)
	relayEvents(t, e, "before", 3)
	e.pg.Exec(t, `SELECT pg_drop_replication_slot('outbox_relay')`)

	err := runToStop(t, e.args())
	require.Error(t, err)
	require.Contains(t, err.Error(), "--create-slot refuses to create a replacement")
	require.Contains(t, err.Error(), "--accept-slot-gap")
	var slots int
	require.NoError(t, e.pg.QueryRow(t, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outbox_relay'`).Scan(&slots))
	require.Zero(t, slots, "no replacement slot was created")

	stop, _ := inProcess(t, e.args("--accept-slot-gap"))
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "after", 2)
	waitStream(t, e.nats.URL, 5, 30*time.Second)
	require.NoError(t, stop())
}

// Restarts are no gap: a Postgres restart may move the slot back (confirmed_flush is saved at
// checkpoints), and a relay killed on an idle outbox whose slot moved with keepalives (traffic
// on other tables) recorded those positions first.
func TestSlotGap_RestartsAndKillsOnAnIdleOutboxAreNoGap(t *testing.T) {
	c := testenv.NewCluster(t)
	e := &env{pg: c.NewDatabase(t), nats: natsembed.JetStream(t)}
	e.migrate(t)
	e.pg.Exec(t, `CREATE TABLE other (id bigserial PRIMARY KEY, v text)`)
	stop, log := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "one", 5)
	waitStream(t, e.nats.URL, 5, 30*time.Second)
	require.NoError(t, c.Stop("immediate"))
	require.NoError(t, c.Start())
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "two", 5)
	waitStream(t, e.nats.URL, 10, 60*time.Second)
	require.NoError(t, stop())
	require.NotContains(t, log.String(), "slot gap")

	// The built binary on an idle outbox: the slot moves past the last event with traffic
	// elsewhere, then the relay is killed.
	p := startProc(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	before := confirmedFlush(t, e.pg, "outbox_relay")
	for i := 0; i < 20; i++ {
		e.pg.Exec(t, `INSERT INTO other (v) SELECT repeat('x', 100) FROM generate_series(1, 1000)`)
	}
	require.Eventually(t, func() bool { return confirmedFlush(t, e.pg, "outbox_relay") > before },
		30*time.Second, 50*time.Millisecond, "the slot never moved on an idle outbox")
	p.kill()
	requireNeverAhead(t, e)
	require.NoError(t, c.Stop("immediate"))
	require.NoError(t, c.Start())

	stop, log = inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "three", 5)
	waitStream(t, e.nats.URL, 15, 30*time.Second)
	require.NoError(t, stop())
	require.NotContains(t, log.String(), "slot gap")
	requireNeverAhead(t, e)
	requireClean(t, check(t, outboxRows(t, e.pg), readStream(t, e.nats.URL, sink.DefaultStream)))
}

// A stream fed by a relay on another cluster (a replaced database): refused, and once
// accepted, the new cluster's events are published although their LSNs are below the stream's
// last Outbox-Commit-Lsn (the old cluster's), even across a restart before any new event.
func TestSlotGap_NewClusterRefusedThenPublishedDespiteLowerLSNs(t *testing.T) {
	old := testenv.NewCluster(t)
	e := &env{pg: old.NewDatabase(t), nats: natsembed.JetStream(t)}
	e.migrate(t)
	// Push the old cluster's WAL well ahead of a fresh one's.
	e.pg.Exec(t, `CREATE TABLE filler AS SELECT g, repeat('x', 200) AS v FROM generate_series(1, 100000) g`)
	stop, _ := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "old", 5)
	waitStream(t, e.nats.URL, 5, 30*time.Second)
	require.NoError(t, stop())
	oldLast := readStream(t, e.nats.URL, sink.DefaultStream)[4].Header.Get(sink.HeaderCommitLSN)

	fresh := testenv.NewCluster(t)
	e2 := &env{pg: fresh.NewDatabase(t), nats: e.nats}
	e2.migrate(t)
	err := runToStop(t, e2.args())
	require.ErrorContains(t, err, "--create-slot refuses to create a replacement")
	e2.createSlot(t)
	err = runToStop(t, e2.args())
	require.ErrorIs(t, err, relay.ErrSlotGap)
	require.Contains(t, err.Error(), "is on Postgres cluster")

	// Accepted, then stopped before any event: the restart must not take the old cluster's
	// last position as its own.
	oldSystem := positionRecord(t, e.nats).SystemID
	stop, _ = inProcess(t, e2.args("--accept-slot-gap"))
	require.Eventually(t, func() bool { return positionRecord(t, e.nats).SystemID != oldSystem },
		30*time.Second, 20*time.Millisecond, "the accepted source was never recorded")
	require.NoError(t, stop())
	stop, log := inProcess(t, e2.args())
	waitStreaming(t, e2.pg, "outbox_relay")
	insertGapEvents(t, e2.pg, "new", 5)
	waitStream(t, e.nats.URL, 10, 30*time.Second)
	require.NoError(t, stop())
	require.NotContains(t, log.String(), "replayed events up to it are skipped")

	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	require.Len(t, recs, 10)
	newLSN, err := pglogrepl.ParseLSN(recs[9].Header.Get(sink.HeaderCommitLSN))
	require.NoError(t, err)
	oldLSN, err := pglogrepl.ParseLSN(oldLast)
	require.NoError(t, err)
	require.Less(t, newLSN, oldLSN, "the test needs the new cluster's positions below the old one's")
	requireClean(t, check(t, outboxRows(t, e2.pg), recs[5:]))
}

// While the record cannot be written (the broker is down), positions that only keepalives
// reached (traffic on other tables) are not confirmed either; once it is back they are.
func TestSlotGap_NoPositionConfirmedBeforeItIsRecorded(t *testing.T) {
	e := newEnv(t)
	e.pg.Exec(t, `CREATE TABLE other (id int, pad text)`)
	stop, log := inProcess(t, e.args("--status-interval", "1s"))
	base := httpAddrOf(t, log)
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "one", 1)
	waitStream(t, e.nats.URL, 1, 30*time.Second)
	recorded := positionRecord(t, e.nats).LSN
	require.Eventually(t, func() bool { return confirmedFlush(t, e.pg, "outbox_relay") == recorded }, 10*time.Second, 20*time.Millisecond)

	e.nats.Shutdown()
	// A keepalive may have been recorded (and then confirmed) after the record was read above
	// and before the broker went down: take the position once the last status update is out.
	time.Sleep(time.Second)
	recorded = confirmedFlush(t, e.pg, "outbox_relay")
	for i := 0; i < 20; i++ {
		e.pg.Exec(t, `INSERT INTO other SELECT g, repeat('x', 100) FROM generate_series(1, 2000) g`)
	}
	time.Sleep(4 * time.Second) // keepalives past that traffic arrive within a second or two
	require.Equal(t, recorded, confirmedFlush(t, e.pg, "outbox_relay"), "a position was confirmed that the record does not hold")
	_, m := testenv.HTTPGet(t, base+"/metrics")
	require.Greater(t, metric(t, m, "outbox_relay_position_record_failures_total"), 0.0, "the failed writes are counted")
	require.Equal(t, float64(recorded), metric(t, m, "outbox_relay_recorded_lsn"))

	e.nats.Restart(t)
	waitSlotCaughtUp(t, e.pg, "outbox_relay", "the slot never moved once the record could be written")
	require.NoError(t, stop())
	requireNeverAhead(t, e)
}

// Without a bucket the relay keeps no record; turning the record on later with events already
// in the stream says it cannot vouch for the past, and records from then on.
func TestSlotGap_RecordTurnedOnLaterWarnsOnce(t *testing.T) {
	e := newEnv(t)
	stop, _ := inProcess(t, e.args("--position-bucket", ""))
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "unrecorded", 3)
	waitStream(t, e.nats.URL, 3, 30*time.Second)
	require.NoError(t, stop())
	js, closeNC := connectJS(t, e.nats.URL)
	defer closeNC()
	_, err := js.KeyValue(context.Background(), sink.DefaultPositionBucket)
	require.ErrorIs(t, err, jetstream.ErrBucketNotFound, "--position-bucket '' writes no record")

	stop, log := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "recorded", 2)
	waitStream(t, e.nats.URL, 5, 30*time.Second)
	require.NoError(t, stop())
	require.Contains(t, log.String(), "there is no position record: the relay cannot tell")
	requireNeverAhead(t, e)

	stop, log = inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	require.NoError(t, stop())
	require.NotContains(t, log.String(), "no position record")
}
