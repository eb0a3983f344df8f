package main

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/sink"
)

// billingStream is the stream of its own billing.outbox gets in streamsConfig.
const billingStream = "BILLING"

// streamsConfig relays orders.outbox to the relay's stream and billing.outbox (billingEntry's
// columns) to a stream of its own, BILLING, under subjects billing.<account>.<event>.
func streamsConfig(t *testing.T) string {
	t.Helper()
	entry := strings.Replace(billingEntry, `subject-template: "{prefix}.billing.{aggregate_id}.{event_type}"`,
		`subject-template: "billing.{aggregate_id}.{event_type}"`+"\n    stream: "+billingStream, 1)
	return writeConfig(t, "publication: tables_pub\ntable:\n  - orders.outbox\n"+entry)
}

// splitSent splits writeBoth's events by stream: the orders for the relay's stream, the
// invoices (with the subjects of streamsConfig) for BILLING.
func splitSent(want []sent) (orders, invoices []sent) {
	for _, s := range want {
		if b, ok := strings.CutPrefix(s.subject, "outbox.billing."); ok {
			invoices = append(invoices, sent{s.id, "billing." + b})
		} else {
			orders = append(orders, s)
		}
	}
	return orders, invoices
}

// requireBothStreams requires each stream to hold exactly its table's events, in commit order.
func requireBothStreams(t *testing.T, e *env, want []sent) {
	t.Helper()
	orders, invoices := splitSent(want)
	requireSent(t, orders, readStream(t, e.nats.URL, sink.DefaultStream))
	requireSent(t, invoices, readStream(t, e.nats.URL, billingStream))
}

// Two tables, one of them with a stream of its own: each stream gets exactly its table's
// events, in commit order; under --publish atomic too, where a transaction writing to both
// tables is one batch per stream, and under --publish fast (a fast batch per stream).
func TestStreams_TableOfItsOwnStream(t *testing.T) {
	for _, mode := range []string{"single", "atomic", "fast"} {
		t.Run(mode, func(t *testing.T) {
			e := newTwoTables(t)
			stop, log := inProcess(t, e.args("--config", streamsConfig(t), "--publish", mode))
			base := httpAddrOf(t, log)
			waitStreaming(t, e.pg, "outbox_relay")
			want := writeBoth(t, e, 12)
			orders, invoices := splitSent(want)
			waitStream(t, e.nats.URL, uint64(len(orders)), 30*time.Second)
			waitStreamOf(t, e.nats.URL, billingStream, uint64(len(invoices)), 30*time.Second)
			waitSlotCaughtUp(t, e.pg, "outbox_relay", "both streams stored everything")
			_, m := testenv.HTTPGet(t, base+"/metrics")
			require.NoError(t, stop())
			requireBothStreams(t, e, want)
			require.Equal(t, float64(len(invoices)), metric(t, m, `outbox_relay_events_published_total{stream="BILLING",table="billing.outbox"}`))
			require.Equal(t, float64(len(orders)), metric(t, m, `outbox_relay_events_published_total{stream="OUTBOX",table="orders.outbox"}`))
			require.Equal(t, 0.0, metric(t, m, `outbox_relay_publish_errors_total{stream="BILLING"}`))

			// Round 0's transaction (invoice, order, invoice): its indexes count across the
			// tables, each stream holds its part.
			recs := readStream(t, e.nats.URL, billingStream)
			require.Equal(t, []string{"0", "0", "2"}, []string{recs[0].Header.Get(sink.HeaderTxIndex), recs[1].Header.Get(sink.HeaderTxIndex), recs[2].Header.Get(sink.HeaderTxIndex)})
			require.Equal(t, recs[1].Header.Get(sink.HeaderCommitLSN), recs[2].Header.Get(sink.HeaderCommitLSN))
			slot := confirmedFlush(t, e.pg, "outbox_relay")
			require.LessOrEqual(t, slot, positionRecordOf(t, e, billingStream, "billing").LSN, "the slot is past BILLING's record")
			require.LessOrEqual(t, slot, positionRecordOf(t, e, sink.DefaultStream, "outbox").LSN, "the slot is past OUTBOX's record")
		})
	}
}

// createBilling creates the BILLING stream before the relay runs; update changes its config.
func createBilling(t *testing.T, e *env, cfg jetstream.StreamConfig) (update func(jetstream.StreamConfig)) {
	t.Helper()
	js, closeNC := connectJS(t, e.nats.URL)
	t.Cleanup(closeNC)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := js.CreateStream(ctx, cfg)
	require.NoError(t, err)
	return func(cfg jetstream.StreamConfig) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := js.UpdateStream(ctx, cfg)
		require.NoError(t, err)
	}
}

// positionRecordOf reads the position record of a stream and subject prefix.
func positionRecordOf(t *testing.T, e *env, stream, prefix string) sink.SourcePosition {
	t.Helper()
	js, closeNC := connectJS(t, e.nats.URL)
	defer closeNC()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	p, ok, err := sink.ReadPositionRecord(ctx, js, sink.DefaultPositionBucket, sink.Config{Stream: stream, SubjectPrefix: prefix})
	require.NoError(t, err)
	require.True(t, ok, "no position record of %s", stream)
	return p
}

// Killed after JetStream stored events of both streams and before their position reached
// Postgres, the relay restarted delivers every event exactly once, each to its stream.
func TestStreams_KillMidStreamDeliversExactlyOnce(t *testing.T) {
	e := newTwoTables(t)
	e.createSlot(t)
	want := writeBoth(t, e, 300)
	args := e.args("--config", streamsConfig(t))
	killAfterAcks(t, args, 150)
	a, b := streamMsgs(t, e.nats.URL, sink.DefaultStream), streamMsgs(t, e.nats.URL, billingStream)
	require.GreaterOrEqual(t, a+b, uint64(150))
	require.Less(t, a+b, uint64(len(want)))
	require.NotZero(t, a)
	require.NotZero(t, b)

	orders, invoices := splitSent(want)
	p := startProc(t, args)
	waitStream(t, e.nats.URL, uint64(len(orders)), 60*time.Second)
	waitStreamOf(t, e.nats.URL, billingStream, uint64(len(invoices)), 60*time.Second)
	waitSlotCaughtUp(t, e.pg, "outbox_relay", "after the restart")
	p.stop(t)
	requireBothStreams(t, e, want)
}

// A stream that refuses messages (full, discard: new) holds the slot back, and both position
// records, while the other stream takes its events; once it takes them again everything
// arrives, once and in order, and the slot catches up.
func TestStreams_SlotWaitsForEveryStream(t *testing.T) {
	e := newTwoTables(t)
	cfg := jetstream.StreamConfig{Name: billingStream, Subjects: []string{"billing.>"}, Storage: jetstream.FileStorage,
		Discard: jetstream.DiscardNew, MaxMsgs: 3, Duplicates: 20 * time.Minute}
	update := createBilling(t, e, cfg)

	stop, log := inProcess(t, e.args("--config", streamsConfig(t), "--status-interval", "100ms", "--stall-timeout", "1s"))
	base := httpAddrOf(t, log)
	waitStreaming(t, e.pg, "outbox_relay")
	want := writeBoth(t, e, 8)
	orders, invoices := splitSent(want)
	waitStream(t, e.nats.URL, uint64(len(orders)), 30*time.Second) // the other stream goes on
	require.Eventually(t, func() bool { return strings.Contains(log.String(), "the stream is full") },
		30*time.Second, 20*time.Millisecond, "no error names the full stream")
	time.Sleep(time.Second) // status updates and record writes go out meanwhile
	confirmed := confirmedFlush(t, e.pg, "outbox_relay")
	outboxRec, billingRec := positionRecordOf(t, e, sink.DefaultStream, "outbox"), positionRecordOf(t, e, billingStream, "billing")
	require.Equal(t, uint64(3), streamMsgs(t, e.nats.URL, billingStream))
	_, m := testenv.HTTPGet(t, base+"/metrics")
	require.Greater(t, metric(t, m, `outbox_relay_stream_full_total{stream="BILLING"}`), 0.0)
	require.Equal(t, 0.0, metric(t, m, `outbox_relay_stream_full_total{stream="OUTBOX"}`))
	var body string
	require.Eventually(t, func() bool {
		var code int
		code, body = testenv.HTTPGet(t, base+"/readyz")
		return code == http.StatusServiceUnavailable && strings.Contains(body, "stalled")
	}, 20*time.Second, 50*time.Millisecond, "the stall is not reported")
	require.Contains(t, body, "check the NATS server, the stream BILLING and", "the stall names the stream that holds events")

	cfg.MaxMsgs = -1
	update(cfg)
	waitStreamOf(t, e.nats.URL, billingStream, uint64(len(invoices)), 60*time.Second)
	waitSlotCaughtUp(t, e.pg, "outbox_relay", "after BILLING took messages again")
	require.NoError(t, stop())
	requireBothStreams(t, e, want)

	// The first invoice BILLING refused: nothing at or past its commit was confirmed or recorded.
	firstRefused := mustLSN(t, readStream(t, e.nats.URL, billingStream)[3].Header.Get(sink.HeaderCommitLSN))
	lastOrder := mustLSN(t, readStream(t, e.nats.URL, sink.DefaultStream)[len(orders)-1].Header.Get(sink.HeaderCommitLSN))
	require.Less(t, firstRefused, lastOrder, "orders committed after the refused invoice")
	for what, lsn := range map[string]pglogrepl.LSN{"the slot": confirmed, "OUTBOX's record": outboxRec.LSN, "BILLING's record": billingRec.LSN} {
		require.LessOrEqual(t, lsn, firstRefused, "%s is at %s while BILLING lacked the invoice committed at %s", what, lsn, firstRefused)
	}
	t.Logf("BILLING full after 3 of %d invoices; slot held at %s, first refused invoice committed at %s, OUTBOX stored orders up to %s", len(invoices), confirmed, firstRefused, lastOrder)
}

// A position record behind the slot, or missing, for one of the streams is a slot gap, as
// with one stream: the relay refuses to start and names the stream's record; accepted once, it
// goes on.
func TestStreams_RecordBehindOrMissingForOneStreamIsASlotGap(t *testing.T) {
	e := newTwoTables(t)
	args := e.args("--config", streamsConfig(t))
	run := func(rounds int, extra ...string) []sent {
		stop, _ := inProcess(t, append(args, extra...))
		waitStreaming(t, e.pg, "outbox_relay")
		before := streamMsgs(t, e.nats.URL, billingStream)
		want := writeBoth(t, e, rounds)
		_, invoices := splitSent(want)
		waitStreamOf(t, e.nats.URL, billingStream, before+uint64(len(invoices)), 30*time.Second)
		waitSlotCaughtUp(t, e.pg, "outbox_relay", "the relay stored everything")
		require.NoError(t, stop())
		return want
	}
	want := run(2)
	old := positionRecordOf(t, e, billingStream, "billing")
	want = append(want, run(2)...)

	js, closeNC := connectJS(t, e.nats.URL)
	defer closeNC()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rec, err := sink.OpenPositionRecord(ctx, js, sink.DefaultPositionBucket, sink.Config{Stream: billingStream, SubjectPrefix: "billing"})
	require.NoError(t, err)
	require.NoError(t, rec.Put(ctx, old)) // BILLING's record behind the slot
	err = runToStop(t, args)
	require.ErrorIs(t, err, relay.ErrSlotGap)
	require.ErrorContains(t, err, `replication slot "outbox_relay" is at`)
	require.ErrorContains(t, err, sink.DefaultPositionBucket+"/BILLING.billing")

	kv, err := js.KeyValue(ctx, sink.DefaultPositionBucket)
	require.NoError(t, err)
	require.NoError(t, kv.Delete(ctx, rec.Key())) // BILLING's record gone, OUTBOX's there
	err = runToStop(t, args)
	require.ErrorIs(t, err, relay.ErrSlotGap)
	require.ErrorContains(t, err, "stream BILLING holds the relay's events up to")
	require.ErrorContains(t, err, "the stream's position record is missing while another stream of the relay has one")

	// Accepted once: the record is written again, and the relay goes on.
	want = append(want, run(1, "--accept-slot-gap")...)
	require.Greater(t, positionRecordOf(t, e, billingStream, "billing").LSN, old.LSN)
	want = append(want, run(1)...)
	requireBothStreams(t, e, want)
}

// Preflight checks each stream and names the one that is wrong, with its table.
func TestStreams_PreflightNamesTheStream(t *testing.T) {
	e := newTwoTables(t)
	cfg := jetstream.StreamConfig{Name: billingStream, Subjects: []string{"invoices.>"}, Storage: jetstream.FileStorage}
	update := createBilling(t, e, cfg)
	args := []string{"--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--create-slot", "--config", streamsConfig(t)}
	msg, _ := runPreflight(t, args...)
	require.Contains(t, msg, "preflight check failed")
	require.Contains(t, msg, "stream BILLING takes subjects [invoices.>], which do not cover billing.>")
	require.Contains(t, msg, "(the stream of billing.outbox)")

	cfg.Subjects = []string{"billing.>"}
	update(cfg)
	msg, _ = runPreflight(t, append(args, "--publish", "atomic")...)
	require.Contains(t, msg, "stream BILLING does not allow atomic batch publishing")
	require.Contains(t, msg, "preflight found 2 problems")
	require.Contains(t, msg, "or set --publish to single (the stream of billing.outbox)")
	require.Contains(t, msg, "stream OUTBOX does not allow atomic batch publishing", "created by the first run, for single publishing")
	require.Contains(t, msg, "or set --publish to single (the stream of orders.outbox)")
}

// backfill --table of the table with its own stream goes to that stream, next to the live
// relay under --publish atomic (which chains on the stream's sequence): through the hand-over
// the relay serves for that stream. Every invoice once, the live ones in commit order.
func TestStreams_BackfillIntoTheTablesOwnStream(t *testing.T) {
	e := newTwoTables(t)
	since := time.Now().Add(-time.Minute).UTC().Format(time.RFC3339Nano)
	const lost = 200 // committed before the relay's slot exists
	e.pg.Exec(t, `INSERT INTO billing.outbox (kind, account, name, body) SELECT 'invoice', 'lost-' || g, 'Invoiced', '{}' FROM generate_series(1, `+itoa(lost)+`) g`)
	time.Sleep(10 * time.Millisecond)
	until := time.Now().UTC().Format(time.RFC3339Nano)

	cfg := streamsConfig(t)
	stop, log := inProcess(t, e.args("--config", cfg, "--publish", "atomic"))
	waitStreaming(t, e.pg, "outbox_relay")
	written := make(chan []sent, 1)
	go func() { written <- writeBoth(t, e, 60) }()
	waitStreamOf(t, e.nats.URL, billingStream, 10, 30*time.Second)
	out, took := backfill(t, e.pg.URL, e.nats.URL, since, until, "--config", cfg, "--table", "billing.outbox")
	require.Contains(t, out, itoa(lost)+" newly stored")
	want := <-written
	orders, invoices := splitSent(want)
	waitStream(t, e.nats.URL, uint64(len(orders)), 30*time.Second)
	waitStreamOf(t, e.nats.URL, billingStream, uint64(lost+len(invoices)), 30*time.Second)
	require.NoError(t, stop())
	t.Logf("backfill of %d rows next to the live relay took %s", lost, took)
	require.Contains(t, log.String(), `"key":"BILLING.billing.handover"`, "the relay served BILLING's hand-over")

	requireSent(t, orders, readStream(t, e.nats.URL, sink.DefaultStream))
	var live []record
	backfilled := 0
	for _, r := range readStream(t, e.nats.URL, billingStream) {
		if r.Header.Get(sink.HeaderBackfill) != "" {
			backfilled++
			require.True(t, strings.HasPrefix(r.Subject, "billing.lost-"), r.Subject)
			continue
		}
		live = append(live, r)
	}
	require.Equal(t, lost, backfilled)
	requireSent(t, invoices, live)
}

// Two tables, one of them with a stream of its own, on a 3-node cluster: the relay creates
// BILLING with 3 replicas next to the R3 OUTBOX. While the events flow, BILLING's leader steps
// down, then OUTBOX's leader is killed with SIGKILL and restarted. Each stream ends with
// exactly its table's events, in commit order, and no node logs a critical write error.
func TestStreams_R3TwoStreamsThroughLeaderFaults(t *testing.T) {
	e := newClusterEnv(t)
	addBillingTable(t, e.pg)
	w := &env{pg: e.pg}
	stop, _ := inProcess(t, []string{"run", "--pg-url", e.pg.URL, "--nats-url", e.cluster.URL, "--create-slot",
		"--log-format", "json", "--config", streamsConfig(t)})
	waitStreaming(t, e.pg, "outbox_relay")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	js, closeNC := connectJS(t, e.cluster.URL)
	defer closeNC()
	s, err := js.Stream(ctx, billingStream)
	require.NoError(t, err)
	require.Equal(t, 3, s.CachedInfo().Config.Replicas, "the relay creates a table's own stream with 3 replicas on a cluster of 3")

	want := writeBoth(t, w, 40)
	_, err = e.cluster.StepDown(ctx, billingStream)
	require.NoError(t, err)
	want = append(want, writeBoth(t, w, 40)...)
	leader, err := e.cluster.StreamLeader(ctx, sink.DefaultStream)
	require.NoError(t, err)
	require.NoError(t, e.cluster.Node(leader).Kill())
	want = append(want, writeBoth(t, w, 40)...)
	require.NoError(t, e.cluster.Node(leader).Start())
	want = append(want, writeBoth(t, w, 40)...)

	orders, invoices := splitSent(want)
	waitStreamOf(t, e.cluster.URL, sink.DefaultStream, uint64(len(orders)), 90*time.Second)
	waitStreamOf(t, e.cluster.URL, billingStream, uint64(len(invoices)), 90*time.Second)
	waitSlotCaughtUp(t, e.pg, "outbox_relay", "both streams stored everything")
	require.NoError(t, stop())
	requireSent(t, orders, readClusterStreamOf(t, e.cluster.URL, sink.DefaultStream))
	requireSent(t, invoices, readClusterStreamOf(t, e.cluster.URL, billingStream))
	for _, n := range e.cluster.Nodes {
		require.NotContains(t, n.Log(), "critical write error")
	}
}
