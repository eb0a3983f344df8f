package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
	"github.com/outbox-relay/outbox-relay/sink"
)

// runRelay runs the relay in this process; its error arrives on done when it stops by itself.
func runRelay(t *testing.T, args []string) (done <-chan error, log *testLog) {
	t.Helper()
	log = &testLog{}
	dumpOnFailure(t, "relay", log)
	ctx, cancel := context.WithCancel(context.Background())
	ch, fin := make(chan error, 1), make(chan struct{})
	go func() { ch <- dispatch(ctx, freeHTTPAddr(args), log, log, noEnv); close(fin) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-fin:
		case <-time.After(30 * time.Second):
		}
	})
	return ch, log
}

// relayExit waits for the relay to stop by itself and returns its error.
func relayExit(t *testing.T, done <-chan error, timeout time.Duration, why string) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(timeout):
		t.Fatalf("the relay kept running %s after %s", timeout, why)
		return nil
	}
}

// forkedCount reads the count of events from lost transactions a fork error reports.
func forkedCount(t *testing.T, msg string) int {
	t.Helper()
	if strings.Contains(msg, "The stream holds no event published from past") {
		return 0
	}
	m := regexp.MustCompile(`The stream holds (?:at least )?(\d+) events published from past`).FindStringSubmatch(msg)
	require.NotNil(t, m, "the fork error reports no count of events from lost transactions: %s", msg)
	n, err := strconv.Atoi(m[1])
	require.NoError(t, err)
	return n
}

// pgClusterEnv is an env on a private cluster (which the test may stop, snapshot, restore).
func pgClusterEnv(t *testing.T) (*testenv.Cluster, *env) {
	t.Helper()
	c := testenv.NewCluster(t)
	e := &env{pg: c.NewDatabase(t), nats: natsembed.JetStream(t)}
	e.migrate(t)
	return c, e
}

// withTag keeps the rows whose aggregate id starts with one of tags.
func withTag(rows map[string]row, tags ...string) map[string]row {
	out := map[string]row{}
	for id, r := range rows {
		for _, tag := range tags {
			if strings.HasPrefix(r.AggregateID, tag+"-") {
				out[id] = r
			}
		}
	}
	return out
}

// A restore under a running relay: 100 events published, snapshot, 100 more published, the
// snapshot restored. Before the fix the relay resumed at its old position, above the restored
// server's WAL end, and never published the new history's events, logging nothing.
func TestFork_RestoreUnderRunningRelay(t *testing.T) {
	c, e := pgClusterEnv(t)
	done, _ := runRelay(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "before", 100)
	waitStream(t, e.nats.URL, 100, 30*time.Second)
	waitSlotCaughtUp(t, e.pg, "outbox_relay", "the first 100 events")
	snap, err := c.Snapshot()
	require.NoError(t, err)
	waitStreaming(t, e.pg, "outbox_relay") // reconnected after the snapshot's restart
	insertGapEvents(t, e.pg, "after", 100)
	waitStream(t, e.nats.URL, 200, 30*time.Second)
	waitSlotCaughtUp(t, e.pg, "outbox_relay", "the next 100 events") // the relay confirmed past the snapshot
	require.NoError(t, c.Restore(snap))

	err = relayExit(t, done, 60*time.Second, "the restore")
	require.ErrorIs(t, err, errForkedHistory)
	msg := err.Error()
	require.Contains(t, msg, "which this relay confirmed on timeline 1 before it reconnected")
	require.Contains(t, msg, "--accept-slot-gap")
	require.Equal(t, uint64(200), streamMsgs(t, e.nats.URL, sink.DefaultStream))

	// Restarted, the relay refuses too (the position record), and counts the events the stream
	// holds from transactions the restore lost.
	insertGapEvents(t, e.pg, "new", 10)
	err = runToStop(t, e.args())
	require.ErrorIs(t, err, errForkedHistory)
	require.Contains(t, err.Error(), "no longer holds the recorded position")
	lost := forkedCount(t, err.Error())
	t.Logf("the stream holds %d events from transactions the restore lost (100 were published after the snapshot)", lost)
	require.Greater(t, lost, 0)
	require.LessOrEqual(t, lost, 100)

	// Accepted: the new history's events are all published, once, in order.
	stop, log := inProcess(t, e.args("--accept-slot-gap"))
	waitStream(t, e.nats.URL, 210, 30*time.Second)
	require.Contains(t, log.String(), "--accept-slot-gap: continuing past a slot gap")
	require.NoError(t, stop())
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	require.Len(t, recs, 210)
	requireClean(t, check(t, withTag(outboxRows(t, e.pg), "new"), recs[200:]))
	requireNeverAhead(t, e)
}

// A restore while the relay is stopped, and the restored server's WAL outgrows the relay's
// record before it starts: positions alone cannot tell. The replay from the restored slot
// reaches the stream's last event's position without yielding it, and the relay refuses
// before confirming anything past the slot. Accepted, the new history is published.
func TestFork_RestoreWhileStoppedAndWALOutgrewTheRecord(t *testing.T) {
	c, e := pgClusterEnv(t)
	stop, _ := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "before", 50)
	waitStream(t, e.nats.URL, 50, 30*time.Second)
	require.NoError(t, stop())
	snap, err := c.Snapshot()
	require.NoError(t, err)
	stop, _ = inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "after", 50)
	waitStream(t, e.nats.URL, 100, 30*time.Second)
	require.NoError(t, stop())
	rec := positionRecord(t, e.nats)

	require.NoError(t, c.Restore(snap))
	// The restored history commits new events below the old positions, then outgrows them.
	insertGapEvents(t, e.pg, "new", 10)
	e.pg.Exec(t, `CREATE TABLE filler AS SELECT g, repeat('x', 200) AS v FROM generate_series(1, 20000) g`)
	var walEnd string
	require.NoError(t, e.pg.QueryRow(t, `SELECT pg_current_wal_lsn()::text`).Scan(&walEnd))
	require.Greater(t, mustLSN(t, walEnd), rec.LSN, "the test needs the restored WAL past the record")
	insertGapEvents(t, e.pg, "later", 5)
	slotBefore := confirmedFlush(t, e.pg, "outbox_relay")

	err = runToStop(t, e.args())
	require.ErrorIs(t, err, errForkedHistory)
	require.Contains(t, err.Error(), "but replaying the slot from")
	require.Equal(t, uint64(100), streamMsgs(t, e.nats.URL, sink.DefaultStream), "nothing published")
	require.Equal(t, slotBefore, confirmedFlush(t, e.pg, "outbox_relay"), "nothing past the slot confirmed")

	stop, log := inProcess(t, e.args("--accept-slot-gap"))
	waitStream(t, e.nats.URL, 115, 60*time.Second)
	require.Contains(t, log.String(), "--accept-slot-gap: the stream's events are from another history")
	require.NoError(t, stop())
	// A plain restart goes on.
	stop, _ = inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "restart", 3)
	waitStream(t, e.nats.URL, 118, 30*time.Second)
	require.NoError(t, stop())
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	require.Len(t, recs, 118)
	requireClean(t, check(t, withTag(outboxRows(t, e.pg), "new", "later", "restart"), recs[100:]))
	requireNeverAhead(t, e)
}

func mustLSN(t *testing.T, s string) pglogrepl.LSN {
	t.Helper()
	lsn, err := pglogrepl.ParseLSN(s)
	require.NoError(t, err)
	return lsn
}

// waitReplayed waits until standby replayed everything primary has written so far.
func waitReplayed(t *testing.T, primary, standby *testenv.PG) {
	t.Helper()
	var walNow string
	require.NoError(t, primary.QueryRow(t, `SELECT pg_current_wal_lsn()::text`).Scan(&walNow))
	require.Eventually(t, func() bool {
		var behind int64
		require.NoError(t, standby.QueryRow(t, `SELECT $1::pg_lsn - pg_last_wal_replay_lsn()`, walNow).Scan(&behind))
		return behind <= 0
	}, 30*time.Second, 50*time.Millisecond, "the standby never replayed up to %s", walNow)
}

// A failover to an asynchronous standby that lacked the latest WAL: the primary is killed,
// the standby promoted (timeline 2) and the slot recreated on it. The relay refuses, names the
// timeline switch and counts the events the stream holds from transactions the failover
// lost; accepted, it publishes the new primary's events although their positions are below
// the stream's last one.
func TestFork_PromotedStandbyThatLackedTheLatestWAL(t *testing.T) {
	testPromotedStandby(t, false)
}

// The same failover with --sync-standby-slot: the relay publishes nothing the standby has not
// flushed, so the stream holds no event from the transactions the failover lost.
func TestSyncStandbySlot_FailoverLosesNoPublishedEvent(t *testing.T) {
	testPromotedStandby(t, true)
}

func testPromotedStandby(t *testing.T, syncStandby bool) {
	primary, e := pgClusterEnv(t)
	var args []string
	slot := ""
	if syncStandby {
		slot = "standby1"
		args = []string{"--sync-standby-slot", slot}
	}
	standby := primary.NewStandby(t, slot)
	onStandby := &testenv.PG{URL: standby.URL(e.pg.DBName), Port: standby.Port, DBName: e.pg.DBName, Cluster: standby}

	stop, _ := inProcess(t, e.args(args...))
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "before", 20)
	waitStream(t, e.nats.URL, 20, 30*time.Second)
	waitReplayed(t, e.pg, onStandby)

	// The standby falls behind; the primary commits 30 more events; the primary dies.
	require.NoError(t, standby.Stop(testenv.StopFast))
	insertGapEvents(t, e.pg, "lost", 30)
	lost := 30
	if syncStandby {
		// Held until the standby flushes their commit, which it never does.
		time.Sleep(2 * time.Second)
		require.Equal(t, uint64(20), streamMsgs(t, e.nats.URL, sink.DefaultStream), "published before the standby had the commit")
		lost = 0
	} else {
		waitStream(t, e.nats.URL, 50, 30*time.Second)
		waitSlotCaughtUp(t, e.pg, "outbox_relay", "the lost events")
	}
	require.NoError(t, stop())
	require.NoError(t, primary.Kill())

	// Failover: the standby is promoted, the operator recreates the slot (Postgres 15 keeps no
	// logical slot on a standby) before the applications write again.
	require.NoError(t, standby.Start())
	require.NoError(t, standby.Promote())
	require.Eventually(t, func() bool {
		var inRecovery bool
		require.NoError(t, onStandby.QueryRow(t, `SELECT pg_is_in_recovery()`).Scan(&inRecovery))
		return !inRecovery
	}, 30*time.Second, 50*time.Millisecond)
	onStandby.Exec(t, `SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')`)
	insertGapEvents(t, onStandby, "new", 10)

	e2 := &env{pg: onStandby, nats: e.nats}
	err := runToStop(t, e2.args())
	require.ErrorIs(t, err, errSlotGap)
	msg := err.Error()
	if !syncStandby || errors.Is(err, errForkedHistory) {
		require.ErrorIs(t, err, errForkedHistory)
		require.Contains(t, msg, "no longer holds the recorded position")
		require.Contains(t, msg, "on timeline 2, which began at")
		require.Equal(t, lost, forkedCount(t, msg), "events from the transactions the failover lost: %s", msg)
	}
	t.Logf("events in the stream from transactions the failover lost: %d (sync standby: %v)", lost, syncStandby)
	published := uint64(20 + lost)
	require.Equal(t, published, streamMsgs(t, e.nats.URL, sink.DefaultStream))

	stop, _ = inProcess(t, e2.args("--accept-slot-gap"))
	waitStream(t, e.nats.URL, published+10, 30*time.Second)
	require.NoError(t, stop())
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	require.Len(t, recs, int(published)+10)
	requireClean(t, check(t, withTag(outboxRows(t, onStandby), "before", "new"), append(recs[:20:20], recs[published:]...)))
	require.Equal(t, int32(2), positionRecord(t, e.nats).Timeline)
	requireNeverAhead(t, e2)
}

// The broker loses messages it acknowledged (its stream directory restored from an older
// backup; a power loss does the same with the default sync_interval) while the position record
// kept its newer state: the relay refuses, naming both sequences, instead of going on as if
// every confirmed event were in the stream.
func TestStreamLostAcknowledgedMessagesRefused(t *testing.T) {
	e := &env{pg: testenv.Postgres(t), nats: natsembed.JetStream(t)}
	e.migrate(t)
	relayEvents(t, e, "kept", 10)
	streamDir := func() string {
		dirs, err := filepath.Glob(filepath.Join(e.nats.StoreDir, "jetstream", "*", "streams", sink.DefaultStream))
		require.NoError(t, err)
		require.Len(t, dirs, 1, "stream directory of %s", sink.DefaultStream)
		return dirs[0]
	}
	backup := filepath.Join(t.TempDir(), "stream-backup")
	e.nats.Shutdown()
	require.NoError(t, os.CopyFS(backup, os.DirFS(streamDir())))
	e.nats.Restart(t)

	stop, _ := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "dropped", 10)
	waitStream(t, e.nats.URL, 20, 30*time.Second)
	waitSlotCaughtUp(t, e.pg, "outbox_relay", "the events the broker will lose")
	require.Eventually(t, func() bool { return positionRecord(t, e.nats).StreamSeq >= 20 },
		10*time.Second, 20*time.Millisecond, "the stream sequence was never recorded")
	require.NoError(t, stop())

	e.nats.Shutdown()
	dir := streamDir()
	require.NoError(t, os.RemoveAll(dir))
	require.NoError(t, os.CopyFS(dir, os.DirFS(backup)))
	e.nats.Restart(t)
	require.Equal(t, uint64(10), streamMsgs(t, e.nats.URL, sink.DefaultStream))

	err := runToStop(t, e.args())
	require.ErrorIs(t, err, errSlotGap)
	require.Contains(t, err.Error(), "stream OUTBOX ends at sequence 10, before sequence 20")
	require.Contains(t, err.Error(), "the broker lost messages it had acknowledged")
	require.Contains(t, err.Error(), "outbox-relay backfill")

	// Accepted, the relay goes on (the lost events are the backfill's).
	stop, _ = inProcess(t, e.args("--accept-slot-gap"))
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "after", 5)
	waitStream(t, e.nats.URL, 15, 30*time.Second)
	require.NoError(t, stop())
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	requireClean(t, check(t, withTag(outboxRows(t, e.pg), "after"), recs[10:]))
}

// The slot advanced by someone else after the relay read it and before START_REPLICATION held
// it: the check reads the slot again once it is held. Before, the stale read passed the check
// and the skipped events were silently lost.
func TestSlotGap_SlotAdvancedBeforeItIsHeldRefused(t *testing.T) {
	e := newEnv(t)
	relayEvents(t, e, "before", 3)
	insertGapEvents(t, e.pg, "skipped", 4)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	log := &testLog{}
	dumpOnFailure(t, "relay", log)
	go func() {
		done <- dispatch(ctx, freeHTTPAddr(e.args()), log, log, func(k string) (string, bool) {
			if k == "OUTBOX_RELAY_FAILPOINT" {
				return "pause_before_start_ms:3000", true
			}
			return "", false
		})
	}()
	require.Eventually(t, func() bool { return strings.Contains(log.String(), "failpoint: pausing before START_REPLICATION") },
		30*time.Second, 10*time.Millisecond) // the slot read, START_REPLICATION not yet sent
	e.pg.Exec(t, `SELECT pg_replication_slot_advance('outbox_relay', pg_current_wal_lsn())`)
	select {
	case err := <-done:
		require.ErrorIs(t, err, errSlotGap)
		require.Contains(t, err.Error(), "advanced by someone else")
	case <-time.After(30 * time.Second):
		t.Fatal("the relay ran on past a slot advanced before it held it")
	}
	require.Equal(t, uint64(3), streamMsgs(t, e.nats.URL, sink.DefaultStream))
}

// Inserts the publication sends from another table than the outbox (here: the outbox table
// renamed under a running relay) are not published: the relay says so, naming the table,
// instead of confirming them without a word.
func TestForeignRelationInsertsWarned(t *testing.T) {
	e := newEnv(t)
	stop, log := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "before", 2)
	waitStream(t, e.nats.URL, 2, 30*time.Second)
	e.pg.Exec(t, `ALTER TABLE outbox RENAME TO outbox_renamed`)
	e.pg.Exec(t, `INSERT INTO outbox_renamed (aggregate_type, aggregate_id, event_type, payload) VALUES ('gap', 'renamed-1', 'Gap.Happened', '{}')`)
	require.Eventually(t, func() bool {
		return strings.Contains(log.String(), "the publication sends inserts into another table than the outbox table")
	}, 30*time.Second, 20*time.Millisecond, "no warning for an insert into a renamed outbox table")
	require.Contains(t, log.String(), `"relation":"public.outbox_renamed"`)
	require.NoError(t, stop())
	require.Contains(t, log.String(), `"foreign_inserts":1`)
	require.Equal(t, uint64(2), streamMsgs(t, e.nats.URL, sink.DefaultStream))
}

// A message forged under the relay's subjects with a later Outbox-Commit-Lsn than the stream's
// real last event would make the relay skip every event up to it as already stored. The replay
// reaches that position without yielding the forged id: refused, nothing confirmed past the
// slot, nothing skipped for good.
func TestForgedLastMessageRefused(t *testing.T) {
	e := newEnv(t)
	relayEvents(t, e, "before", 3)
	slotBefore := confirmedFlush(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "hidden", 5)
	var walNow string
	require.NoError(t, e.pg.QueryRow(t, `SELECT pg_current_wal_lsn()::text`).Scan(&walNow))

	nc := e.nats.Connect(t)
	m := nats.NewMsg("outbox.gap.Forged")
	m.Header.Set(sink.HeaderMsgID, "forged-1")
	m.Header.Set(sink.HeaderCommitLSN, walNow)
	m.Header.Set(sink.HeaderTxIndex, "0")
	m.Data = []byte(`{}`)
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = js.PublishMsg(ctx, m)
	require.NoError(t, err)

	done, _ := runRelay(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "next", 1) // commits past the forged position
	t0 := time.Now()
	err = relayExit(t, done, 60*time.Second, "a forged last message")
	t.Logf("refused %s after the next event", time.Since(t0))
	require.ErrorIs(t, err, errForkedHistory)
	require.Contains(t, err.Error(), "another publisher wrote that message")
	require.Equal(t, uint64(4), streamMsgs(t, e.nats.URL, sink.DefaultStream), "the hidden events were neither published nor...")
	require.Equal(t, slotBefore, confirmedFlush(t, e.pg, "outbox_relay"), "...confirmed")
}
