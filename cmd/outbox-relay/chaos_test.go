package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/sink"
)

// chaosConfig: OUTBOX_RELAY_CHAOS=long (make chaos) runs the long suite, anything else the
// short one (part of the normal test run, skipped with -short). OUTBOX_RELAY_CHAOS_PUBLISH
// runs the relay with that --publish mode (default single; e.g. fast).
type chaosConfig struct {
	name      string
	publish   string        // --publish
	duration  time.Duration // of fault injection
	natsDown  time.Duration // one long broker outage
	bigTx     int           // rows of one big transaction (0: none)
	minKills  int           // relay SIGKILLs at least
	reportTo  string        // markdown summary file, "" for none
	faultGaps [2]time.Duration
}

func chaosSettings(t *testing.T) chaosConfig {
	cc := chaosSettingsFor(t)
	if cc.publish = os.Getenv("OUTBOX_RELAY_CHAOS_PUBLISH"); cc.publish == "" {
		cc.publish = "single"
	}
	return cc
}

func chaosSettingsFor(t *testing.T) chaosConfig {
	if os.Getenv("OUTBOX_RELAY_CHAOS") == "long" {
		return chaosConfig{name: "long", duration: 6 * time.Minute, natsDown: 60 * time.Second, bigTx: 1_000_000, minKills: 30,
			reportTo: os.Getenv("OUTBOX_RELAY_CHAOS_REPORT"), faultGaps: [2]time.Duration{1 * time.Second, 4 * time.Second}}
	}
	if testing.Short() {
		t.Skip("fault-injection suite skipped with -short")
	}
	return chaosConfig{name: "short", duration: 50 * time.Second, natsDown: 5 * time.Second, minKills: 4,
		faultGaps: [2]time.Duration{500 * time.Millisecond, 2 * time.Second}}
}

// The fault-injection suite: the relay binary against a nats-server process and a Postgres
// cluster, a producer writing continuously (committed and rolled-back transactions, many
// aggregates with their own sequence numbers), and faults at random moments: relay SIGKILL and
// SIGTERM, nats-server kill -9 (short and long outage), Postgres immediate shutdown, the
// walsender terminated, and in the long run one 1,000,000-row transaction. The verifier reads
// the whole stream: every committed event present, none from rolled-back transactions, no
// duplicate, per-aggregate order intact.
func TestChaos_RelayUnderFaultsLosesNothingDuplicatesNothingKeepsOrder(t *testing.T) {
	cc := chaosSettings(t)
	seed := uint64(time.Now().UnixNano())
	t.Logf("chaos %s run, --publish %s, seed %d", cc.name, cc.publish, seed)
	rng := rand.New(rand.NewPCG(seed, 7))

	cluster := testenv.NewCluster(t)
	pg := cluster.NewDatabase(t)
	e := &env{pg: pg}
	e.migrate(t)
	np := testenv.StartNATSProcess(t, 0, "")
	args := []string{"run", "--pg-url", pg.URL, "--nats-url", np.URL, "--create-slot", "--log-format", "json",
		"--log-level", "info", "--ack-timeout", "2s", "--max-in-flight", "512", "--publish", cc.publish}

	var (
		relay   *proc
		peakRSS int64
		procs   int
	)
	startRelay := func() {
		relay = startProc(t, args)
		procs++
	}
	reap := func() {
		if ru, ok := relay.cmd.ProcessState.SysUsage().(*syscall.Rusage); ok && ru.Maxrss > peakRSS {
			peakRSS = ru.Maxrss
		}
	}
	startRelay()
	// Not waitStreaming: the slot also shows active while preflight creates it, before the
	// relay connected to NATS (a relay that cannot reach NATS at start exits).
	require.Eventually(t, func() bool { return strings.Contains(relay.log.String(), "replication started") },
		60*time.Second, 20*time.Millisecond, "the relay never started replicating")

	// Producer.
	var stopProducer atomic.Bool
	var rolledBack, txErrors atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			chaosProduce(pg.URL, w, seed, 10*time.Millisecond, &stopProducer, &rolledBack, &txErrors)
		}(w)
	}

	counts := map[string]int{}
	var maxRecovery time.Duration
	var recoveries []string
	fault := func(name string, do func()) {
		counts[name]++
		do()
		d := probe(t, pg, np.URL, relay) // from the end of the fault
		recoveries = append(recoveries, fmt.Sprintf("%s: %s", name, d.Round(time.Millisecond)))
		if d > maxRecovery {
			maxRecovery = d
		}
	}
	killRelay := func() {
		relay.kill()
		reap()
		time.Sleep(time.Duration(rng.IntN(500)) * time.Millisecond)
		startRelay()
	}
	faults := []struct {
		name   string
		weight int
		do     func()
	}{
		{"relay SIGKILL", 10, killRelay},
		{"relay SIGTERM", 1, func() {
			require.NoError(t, relay.cmd.Process.Signal(syscall.SIGTERM))
			require.Equal(t, 0, relay.wait(t, 60*time.Second), "SIGTERM exits 0")
			reap()
			startRelay()
		}},
		{"nats-server kill -9 and restart", 2, func() {
			require.NoError(t, np.Kill())
			time.Sleep(time.Duration(200+rng.IntN(1500)) * time.Millisecond)
			require.NoError(t, np.Start())
		}},
		{"postgres immediate shutdown and restart", 2, func() {
			require.NoError(t, cluster.Stop("immediate"))
			time.Sleep(time.Duration(rng.IntN(1000)) * time.Millisecond)
			require.NoError(t, cluster.Start())
		}},
		{"walsender terminated (pg_terminate_backend)", 2, func() {
			pg.Exec(t, `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'outbox_relay' AND active_pid IS NOT NULL`)
		}},
	}
	total := 0
	for _, f := range faults {
		total += f.weight
	}
	deadline := time.Now().Add(cc.duration)
	fault(fmt.Sprintf("nats down %s", cc.natsDown), func() {
		require.NoError(t, np.Kill())
		time.Sleep(cc.natsDown)
		require.NoError(t, np.Start())
	})
	if cc.bigTx > 0 {
		fault(fmt.Sprintf("one transaction of %d rows", cc.bigTx), func() {
			pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
				SELECT 'big', 'big', 'Imported', jsonb_build_object('seq', g) FROM generate_series(1, $1::int) g`, cc.bigTx)
		})
	}
	for time.Now().Before(deadline) || counts["relay SIGKILL"] < cc.minKills {
		time.Sleep(cc.faultGaps[0] + time.Duration(rng.Int64N(int64(cc.faultGaps[1]-cc.faultGaps[0]))))
		r := rng.IntN(total)
		for _, f := range faults {
			if r < f.weight {
				t.Logf("fault: %s", f.name)
				fault(f.name, f.do)
				break
			}
			r -= f.weight
		}
		require.False(t, relay.exited(), "the relay exited on its own")
	}
	stopProducer.Store(true)
	wg.Wait()

	var committed int
	require.NoError(t, pg.QueryRow(t, `SELECT count(*) FROM outbox`).Scan(&committed))
	awaitStream(t, np.URL, pg, "outbox_relay", uint64(committed), 5*time.Minute)
	require.NoError(t, relay.cmd.Process.Signal(syscall.SIGTERM))
	require.Equal(t, 0, relay.wait(t, 60*time.Second))
	reap()

	v := check(t, outboxRows(t, pg), readStream(t, np.URL, sink.DefaultStream))
	var kinds []string
	nfaults := 0
	for k, n := range counts {
		kinds = append(kinds, fmt.Sprintf("%s × %d", k, n))
		nfaults += n
	}
	sort.Strings(kinds)
	report := chaosReport(cc, seed, kinds, nfaults, v, rolledBack.Load(), maxRecovery, peakRSS, procs)
	t.Log("\n" + report)
	t.Logf("recovery per fault: %s", strings.Join(recoveries, "; "))
	if cc.reportTo != "" {
		section := "## Single node\n\nWritten by `make chaos` (`TestChaos_RelayUnderFaultsLosesNothingDuplicatesNothingKeepsOrder` in\n" +
			"`cmd/outbox-relay/chaos_test.go`): the relay binary against a nats-server process (`sync_interval: always`) and a\n" +
			"Postgres 15 cluster, two producers writing continuously (1-20 rows per transaction, one in ten rolled back, 80\n" +
			"aggregates with their own sequence numbers), faults at random moments, then a verifier reading the whole stream.\n" +
			"Recovery time: from the end of a fault until a probe event committed after it is in the stream.\n\n" + report +
			"\nRecovery per fault: " + strings.Join(recoveries, "; ") + "\n"
		require.NoError(t, writeReportSection(cc.reportTo, "single-node", section))
	}
	requireClean(t, v)
}

func chaosReport(cc chaosConfig, seed uint64, kinds []string, nfaults int, v verdict, rolledBack int64, maxRecovery time.Duration, peakRSS int64, procs int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "### Fault-injection run (%s, %s, seed %d)\n\n", cc.name, time.Now().UTC().Format("2006-01-02"), seed)
	fmt.Fprintf(&b, "| metric | value |\n|---|---|\n")
	fmt.Fprintf(&b, "| faults injected | %d (%s) |\n", nfaults, strings.Join(kinds, ", "))
	fmt.Fprintf(&b, "| events written (committed rows) | %d |\n", v.Committed)
	fmt.Fprintf(&b, "| transactions rolled back (must publish nothing) | %d |\n", rolledBack)
	fmt.Fprintf(&b, "| events read from the stream | %d |\n", v.Read)
	fmt.Fprintf(&b, "| lost | %d |\n| duplicated | %d |\n| from rolled-back transactions | %d |\n| out of order (per aggregate) | %d |\n",
		len(v.Lost), len(v.Dup), len(v.Unexpected), len(v.OutOfOrder))
	fmt.Fprintf(&b, "| max recovery time (fault healed → new event in the stream) | %s |\n", maxRecovery.Round(time.Millisecond))
	fmt.Fprintf(&b, "| relay processes started | %d |\n| peak relay RSS | %.1f MiB |\n", procs, float64(peakRSS)/1024)
	return b.String()
}

// chaosProduce writes transactions, pause apart, until stop: 1-20 rows over 40 aggregates, one
// in ten rolled back. Errors (Postgres restarting) are counted and retried on a new connection.
func chaosProduce(url string, w int, seed uint64, pause time.Duration, stop *atomic.Bool, rolledBack, txErrors *atomic.Int64) {
	r := rand.New(rand.NewPCG(seed, uint64(w)+100))
	ctx := context.Background()
	seq := make([]int, 40)
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(ctx)
		}
	}()
	for !stop.Load() {
		if conn == nil {
			c, err := pgx.Connect(ctx, url)
			if err != nil {
				time.Sleep(200 * time.Millisecond)
				continue
			}
			conn = c
		}
		n := 1 + r.IntN(20)
		rollback := r.IntN(10) == 0
		tx, err := conn.Begin(ctx)
		if err == nil {
			b := &pgx.Batch{}
			for j := 0; j < n; j++ {
				a := r.IntN(len(seq))
				seq[a]++
				agg := fmt.Sprintf("w%d-a%d", w, a)
				b.Queue(`INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', $1, 'Order.Updated', $2)`,
					agg, fmt.Sprintf(`{"agg": %q, "seq": %d}`, agg, seq[a]))
			}
			err = tx.SendBatch(ctx, b).Close()
			if err == nil && rollback {
				err = tx.Rollback(ctx)
				rolledBack.Add(1)
			} else if err == nil {
				err = tx.Commit(ctx)
			} else {
				_ = tx.Rollback(ctx)
			}
		}
		if err != nil {
			txErrors.Add(1)
			conn.Close(ctx)
			conn = nil
		}
		time.Sleep(pause)
	}
}

// probe inserts a marker event and returns how long until the stream holds it.
func probe(t *testing.T, pg *testenv.PG, natsURL string, relay *proc) time.Duration {
	t.Helper()
	start := time.Now()
	id := fmt.Sprintf("00000000-0000-4000-8000-%012d", start.UnixNano()%1e12)
	require.Eventually(t, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, pg.URL)
		if err != nil {
			return false
		}
		defer c.Close(ctx)
		_, err = c.Exec(ctx, `INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) VALUES ($1, 'probe', 'probe', 'Probe', '{}')`, id)
		return err == nil
	}, 60*time.Second, 100*time.Millisecond, "Postgres did not take the probe")
	nc, err := nats.Connect(natsURL, nats.MaxReconnects(-1))
	require.NoError(t, err)
	defer nc.Close()
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		if relay.exited() {
			return true // reported below; no require inside a condition (it runs in another goroutine)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		s, err := js.Stream(ctx, sink.DefaultStream)
		if err != nil {
			return false
		}
		m, err := s.GetLastMsgForSubject(ctx, "outbox.probe.Probe")
		return err == nil && m.Header.Get(sink.HeaderMsgID) == id
	}, 10*time.Minute, 50*time.Millisecond, "the probe event never reached the stream")
	require.False(t, relay.exited(), "the relay exited on its own: %v", relay.err)
	return time.Since(start)
}

// writeReportSection replaces the section named key of the markdown file at path (the text
// between "<!-- begin key -->" and "<!-- end key -->") with text, or appends it when the file
// has none, so that each chaos test rewrites its own figures and keeps the rest of the file.
func writeReportSection(path, key, text string) error {
	begin, end := "<!-- begin "+key+" -->\n", "<!-- end "+key+" -->\n"
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	doc := string(old)
	section := begin + text + end
	i, j := strings.Index(doc, begin), strings.Index(doc, end)
	switch {
	case i >= 0 && j > i:
		doc = doc[:i] + section + doc[j+len(end):]
	default:
		if doc != "" && !strings.HasSuffix(doc, "\n\n") {
			doc = strings.TrimRight(doc, "\n") + "\n\n"
		}
		doc += section
	}
	return os.WriteFile(path, []byte(doc), 0o644)
}
