package main

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/sink"
)

// clusterChaosConfig: OUTBOX_RELAY_CHAOS=long (make chaos) repeats every fault, anything else
// runs each once (part of the normal test run, skipped with -short).
type clusterChaosConfig struct {
	name          string
	rounds        int           // each fault once per round
	followerDown  time.Duration // how long a follower stays down
	frozenAtLeast time.Duration // a frozen node stays frozen at least this long (and until the relay recovered)
	writers       int           // producers
	pause         time.Duration // between two transactions of a producer
	reportTo      string        // markdown file whose cluster section is rewritten, "" for none
	// target fails the run when a recovery took longer; 0 reports recoveries without judging
	// them. The short run in make test only requires that the relay recovers at all (within
	// waitConfirmed's two minutes): how long a cluster takes to elect leaders and drop a frozen
	// peer's routes depends on the machine's load (the same fault took 15 s on one run and 48 s
	// on a loaded CI host), and a timing target is for make chaos to check, not make test.
	target time.Duration
}

func clusterChaosSettings(t *testing.T) clusterChaosConfig {
	if os.Getenv("OUTBOX_RELAY_CHAOS") == "long" {
		return clusterChaosConfig{name: "long", rounds: 4, followerDown: 30 * time.Second, frozenAtLeast: 30 * time.Second,
			writers: 2, pause: 20 * time.Millisecond, reportTo: os.Getenv("OUTBOX_RELAY_CHAOS_REPORT"),
			target: clusterRecoveryTarget}
	}
	if testing.Short() {
		t.Skip("cluster fault-injection suite skipped with -short")
	}
	return clusterChaosConfig{name: "short", rounds: 1, followerDown: 10 * time.Second, writers: 1, pause: 40 * time.Millisecond}
}

// clusterRecoveryTarget is the longest a fault may keep the relay from confirming new events.
const clusterRecoveryTarget = 30 * time.Second

// clusterFault is one kind of cluster fault and what it did over the run.
type clusterFault struct {
	name       string
	count      int
	recoveries []time.Duration
	events     int
	lost, dup  int
	outOfOrder int // per aggregate or in the stream's commit order
}

// The relay publishes to an R3 stream on a 3-node JetStream cluster while a producer writes
// continuously into Postgres, and the cluster suffers, one after the other: the stream leader
// killed with SIGKILL (restarted once the relay recovered), a leader step-down, a follower
// down, a rolling restart of all three nodes (SIGTERM, start, caught up, next), and a node
// frozen with SIGSTOP (the one the relay is connected to, the stream leader, a follower, in
// turn) until SIGCONT. A probe event committed just after each fault must be stored and
// confirmed (the slot's confirmed_flush_lsn passes its commit) within 30 s of the fault.
// At the end the stream must hold every committed event once, in per-aggregate order and in
// commit order. OUTBOX_RELAY_CHAOS=long (make chaos) repeats each fault and writes the figures
// to OUTBOX_RELAY_CHAOS_REPORT.
func TestChaos_R3ClusterFaultsUnderLoad(t *testing.T) {
	cc := clusterChaosSettings(t)
	loadAtStart := loadAverage()
	began := time.Now()
	e := newClusterEnv(t)
	args := []string{"run", "--pg-url", e.pg.URL, "--nats-url", e.cluster.URL, "--create-slot", "--stream-replicas", "3",
		"--log-format", "json", "--log-level", "info", "--ack-timeout", "2s", "--max-in-flight", "256"}
	stop, _ := inProcess(t, args)
	waitStreaming(t, e.pg, "outbox_relay")

	var stopProducer atomic.Bool
	var rolledBack, txErrors atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < cc.writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			chaosProduce(e.pg.URL, w, 61, cc.pause, &stopProducer, &rolledBack, &txErrors)
		}(w)
	}
	defer func() { stopProducer.Store(true); wg.Wait() }()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	require.Eventually(t, func() bool { return streamMsgs(t, e.cluster.URL, sink.DefaultStream) > 500 },
		30*time.Second, 50*time.Millisecond, "the relay published nothing")

	c := e.cluster
	node := c.Node
	follower := func(not ...string) string {
		for _, n := range c.Names {
			if !slices.Contains(not, n) {
				return n
			}
		}
		return c.Names[0]
	}
	leader := func() string {
		l, err := c.WaitStreamCurrent(ctx, sink.DefaultStream)
		require.NoError(t, err)
		return l
	}
	current := func() { leader() }

	faults := map[string]*clusterFault{}
	var order []string
	type window struct {
		fault string
		start time.Time
	}
	var windows []window
	// measure injects a fault, then commits a probe event, and returns a wait that returns
	// once the relay has confirmed the probe's commit (it was stored: the relay got past the
	// fault), or after timeout; it records how long that took from the fault. A WAL position
	// taken before the probe would do when the relay was caught up at the fault, with nothing
	// stored after it.
	measure := func(name string, inject func()) (wait func(timeout time.Duration) bool) {
		f := faults[name]
		if f == nil {
			f = &clusterFault{name: name}
			faults[name] = f
			order = append(order, name)
		}
		f.count++
		start := time.Now()
		windows = append(windows, window{name, start})
		inject()
		e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('probe', 'probe', 'Probe', '{}')`)
		var wal string
		require.NoError(t, e.pg.QueryRow(t, `SELECT pg_current_wal_lsn()::text`).Scan(&wal)) // past the probe's commit
		at, err := pglogrepl.ParseLSN(wal)
		require.NoError(t, err)
		done := make(chan time.Duration, 1)
		go func() { done <- waitConfirmed(e.pg.URL, at, start) }()
		got := false
		return func(timeout time.Duration) bool {
			t.Helper()
			if got {
				return true
			}
			select {
			case d := <-done:
				got = true
				require.NotEqual(t, time.Duration(-1), d, "%s: the relay did not confirm %s within 2 minutes", name, at)
				f.recoveries = append(f.recoveries, d)
				t.Logf("%s: the probe committed after the fault confirmed %s after the fault", name, d.Round(time.Millisecond))
				return true
			case <-time.After(timeout):
				return false
			}
		}
	}
	const bound = 3 * time.Minute // past waitConfirmed's own deadline

	t.Logf("cluster up, relay streaming after %s", time.Since(began).Round(time.Millisecond))
	for round := 0; round < cc.rounds; round++ {
		// The stream leader killed, restarted once the relay recovered without it.
		l := leader()
		wait := measure("stream leader kill -9, restarted", func() { require.NoError(t, node(l).Kill()) })
		wait(bound)
		require.NoError(t, node(l).Start())
		current()

		// Leader step-down.
		wait = measure("stream leader step-down", func() {
			_, err := c.StepDown(ctx, sink.DefaultStream)
			require.NoError(t, err)
		})
		wait(bound)
		current()

		// A follower down.
		f := follower(leader())
		down := time.Now()
		wait = measure(fmt.Sprintf("follower down %s", cc.followerDown), func() { require.NoError(t, node(f).Kill()) })
		wait(bound)
		time.Sleep(time.Until(down.Add(cc.followerDown)))
		require.NoError(t, node(f).Start())
		current()

		// Rolling restart: each node stopped cleanly, started, caught up.
		for _, n := range c.Names {
			wait = measure("rolling restart (per node)", func() { require.NoError(t, node(n).Stop()) })
			require.NoError(t, node(n).Start())
			wait(bound)
			current()
		}

		// A node frozen: the relay's, the leader, a follower, in turn.
		var frozen, role string
		var err error
		switch round % 3 {
		case 0:
			frozen, err = c.ClientNode(ctx, "outbox-relay")
			require.NoError(t, err)
			role = "the relay's server"
		case 1:
			frozen, role = leader(), "the stream leader"
		default:
			relays, _ := c.ClientNode(ctx, "outbox-relay")
			frozen, role = follower(leader(), relays), "a follower"
		}
		if frozen == leader() {
			role += " (stream leader)"
		}
		t.Logf("freezing %s: %s", frozen, role)
		paused := time.Now()
		wait = measure("node frozen (SIGSTOP), then SIGCONT", func() { require.NoError(t, node(frozen).Pause()) })
		// Frozen until the relay recovered without it (at most a minute) and frozenAtLeast.
		recoveredFrozen := wait(time.Minute)
		time.Sleep(time.Until(paused.Add(cc.frozenAtLeast)))
		require.NoError(t, node(frozen).Resume())
		t.Logf("%s resumed after %s frozen (relay recovered while frozen: %v)", frozen, time.Since(paused).Round(time.Millisecond), recoveredFrozen)
		wait(bound)
		current()
	}
	stopProducer.Store(true)
	wg.Wait()
	t.Logf("faults done after %s", time.Since(began).Round(time.Millisecond))

	var committed int
	require.NoError(t, e.pg.QueryRow(t, `SELECT count(*) FROM outbox`).Scan(&committed))
	awaitStream(t, e.cluster.URL, e.pg, "outbox_relay", uint64(committed), 2*time.Minute)
	require.NoError(t, stop())
	rows := outboxRows(t, e.pg)
	recs := readClusterStream(t, e.cluster.URL)
	t.Logf("stream read after %s", time.Since(began).Round(time.Millisecond))
	v := check(t, rows, recs)
	commitOrder := commitOrderBreaks(t, recs)

	// Attribute every event to the fault last injected before its transaction began.
	faultAt := func(id string) string {
		ts, err := time.Parse("2006-01-02T15:04:05.999999Z", rows[id].CreatedAt)
		if err != nil {
			return ""
		}
		name := ""
		for _, w := range windows {
			if !ts.Before(w.start) {
				name = w.fault
			}
		}
		return name
	}
	for id := range rows {
		if f := faults[faultAt(id)]; f != nil {
			f.events++
		}
	}
	for _, id := range v.Lost {
		if f := faults[faultAt(id)]; f != nil {
			f.lost++
		}
	}
	for _, id := range v.Dup {
		if f := faults[faultAt(id)]; f != nil {
			f.dup++
		}
	}
	for _, id := range append(append([]string(nil), v.OutOfOrderIDs...), commitOrder...) {
		if f := faults[faultAt(id)]; f != nil {
			f.outOfOrder++
		}
	}
	var fs []*clusterFault
	for _, name := range order {
		fs = append(fs, faults[name])
	}
	report := clusterChaosReport(cc, fs, v, len(commitOrder), rolledBack.Load()) +
		fmt.Sprintf("\nMachine: %d CPUs, load average (1, 5, 15 min) %s at the start, %s at the end.\n", runtime.NumCPU(), loadAtStart, loadAverage())
	t.Log("\n" + report)
	if cc.reportTo != "" {
		section := "## 3-node JetStream cluster, R3 stream\n\nWritten by `make chaos` (`TestChaos_R3ClusterFaultsUnderLoad` in\n" +
			"`cmd/outbox-relay/cluster_chaos_test.go`): the relay (in the test process) publishing to an R3 stream on three\n" +
			"nats-server processes (default `sync_interval`), producers writing continuously into Postgres 15 (1-20 rows per\n" +
			"transaction, one in ten rolled back, 40 aggregates each), and, one after the other in each round: the stream leader killed with\n" +
			"SIGKILL (restarted once the relay recovered), a leader step-down (`$JS.API.STREAM.LEADER.STEPDOWN.OUTBOX`), a\n" +
			"follower killed and kept down, a rolling restart (each node stopped with SIGTERM, started, caught up), and a node\n" +
			"frozen with SIGSTOP (in turn the relay's server, the stream leader, a follower) until the relay recovered and at\n" +
			"least the time shown, then SIGCONT. Recovery: from the fault until a probe event committed just after it is stored\n" +
			"and confirmed (the slot's `confirmed_flush_lsn` passes its commit); the target is 30 s. Events: those\n" +
			"committed from the fault until the next one. Out of order: per aggregate, and against the stream's commit order\n" +
			"(`Outbox-Commit-Lsn`, `Outbox-Tx-Index`).\n\n" + report
		require.NoError(t, writeReportSection(cc.reportTo, "cluster", section))
	}
	requireClean(t, v)
	require.Empty(t, commitOrder, "stream out of commit order")
	for _, f := range fs {
		for _, d := range f.recoveries {
			if cc.target > 0 {
				require.Less(t, d, cc.target, "%s: recovery took %s", f.name, d)
			} else if d >= clusterRecoveryTarget {
				t.Logf("%s: recovery took %s, over the %s target make chaos holds the relay to", f.name, d, clusterRecoveryTarget)
			}
		}
	}
	for _, n := range c.Nodes {
		require.NotContains(t, n.Log(), "critical write error")
	}
}

// waitConfirmed polls the relay's slot until its confirmed_flush_lsn reaches at and returns
// the time since from, or -1 two minutes after from.
func waitConfirmed(pgURL string, at pglogrepl.LSN, from time.Time) time.Duration {
	ctx, cancel := context.WithDeadline(context.Background(), from.Add(2*time.Minute))
	defer cancel()
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	for ctx.Err() == nil {
		if conn == nil {
			conn, _ = pgx.Connect(ctx, pgURL)
		}
		if conn != nil {
			var ok bool
			err := conn.QueryRow(ctx, `SELECT coalesce(confirmed_flush_lsn >= $1::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = 'outbox_relay'`, at.String()).Scan(&ok)
			if err == nil && ok {
				return time.Since(from)
			}
			if err != nil {
				conn.Close(context.Background())
				conn = nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return -1
}

// commitOrderBreaks returns the ids of the stream's messages whose position (commit LSN,
// index in the transaction) is not after the one before them in the stream.
func commitOrderBreaks(t *testing.T, recs []record) []string {
	t.Helper()
	var out []string
	var prev sink.Position
	for i, r := range recs {
		lsn, err := pglogrepl.ParseLSN(r.Header.Get(sink.HeaderCommitLSN))
		require.NoError(t, err, "stream sequence %d", r.Seq)
		var idx int
		_, err = fmt.Sscan(r.Header.Get(sink.HeaderTxIndex), &idx)
		require.NoError(t, err, "stream sequence %d", r.Seq)
		pos := sink.Position{CommitLSN: lsn, TxIndex: idx}
		if i > 0 && pos.AtOrBefore(prev) {
			out = append(out, r.Header.Get(sink.HeaderMsgID))
		}
		prev = pos
	}
	return out
}

// loadAverage is the machine's 1, 5 and 15 minute load averages (Linux), or "unknown".
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "unknown"
}

func clusterChaosReport(cc clusterChaosConfig, fs []*clusterFault, v verdict, commitOrder int, rolledBack int64) string {
	var b strings.Builder
	fmt.Fprintf(&b, "### Cluster fault run (%s, %s, %d rounds, frozen at least %s)\n\n", cc.name, time.Now().UTC().Format("2006-01-02"), cc.rounds, cc.frozenAtLeast)
	fmt.Fprintf(&b, "| fault | count | events | recovery p50 | recovery max | lost | duplicated | out of order |\n|---|---|---|---|---|---|---|---|\n")
	for _, f := range fs {
		d := append([]time.Duration(nil), f.recoveries...)
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		p50, maxD := time.Duration(0), time.Duration(0)
		if len(d) > 0 {
			p50, maxD = d[(len(d)-1)/2], d[len(d)-1]
		}
		fmt.Fprintf(&b, "| %s | %d | %d | %s | %s | %d | %d | %d |\n", f.name, f.count, f.events,
			p50.Round(time.Millisecond), maxD.Round(time.Millisecond), f.lost, f.dup, f.outOfOrder)
	}
	fmt.Fprintf(&b, "\nIn all: %d events committed, %d read from the stream, %d lost, %d duplicated, %d out of order per aggregate, "+
		"%d out of the stream's commit order, %d transactions rolled back (none published: %d unexpected).\n",
		v.Committed, v.Read, len(v.Lost), len(v.Dup), len(v.OutOfOrder), commitOrder, rolledBack, len(v.Unexpected))
	return b.String()
}
