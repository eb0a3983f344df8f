package main

import (
	"bytes"
	"context"
	"encoding/json"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/faultproxy"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/sink"
)

// clusterEnv is one test's Postgres database (migrated) and a 3-node JetStream cluster with
// the relay's stream created (R3 unless newClusterEnvReplicas says otherwise).
type clusterEnv struct {
	pg      *testenv.PG
	cluster *testenv.NATSCluster
}

func newClusterEnv(t *testing.T) *clusterEnv {
	t.Helper()
	return newClusterEnvStream(t, func(*jetstream.StreamConfig) {})
}

// newClusterEnvReplicas is newClusterEnv with the stream created with the given replicas.
func newClusterEnvReplicas(t *testing.T, replicas int) *clusterEnv {
	t.Helper()
	return newClusterEnvStream(t, func(c *jetstream.StreamConfig) { c.Replicas = replicas })
}

// newClusterEnvMode is newClusterEnv with the stream options --publish mode needs.
func newClusterEnvMode(t *testing.T, mode string) *clusterEnv {
	t.Helper()
	return newClusterEnvStream(t, func(c *jetstream.StreamConfig) {
		c.AllowAtomicPublish, c.AllowBatchPublish = mode == "atomic", mode == "fast"
	})
}

// newClusterEnvStream is newClusterEnv with the stream's config changed by edit.
func newClusterEnvStream(t *testing.T, edit func(*jetstream.StreamConfig)) *clusterEnv {
	t.Helper()
	e := &clusterEnv{pg: testenv.Postgres(t), cluster: testenv.StartNATSCluster(t, 3)}
	(&env{pg: e.pg}).migrate(t)
	js, closeNC := connectJS(t, e.cluster.URL)
	defer closeNC()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := jetstream.StreamConfig{
		Name: sink.DefaultStream, Subjects: []string{sink.DefaultSubjectPrefix + ".>"},
		Storage: jetstream.FileStorage, Replicas: 3, Duplicates: sink.DefaultDuplicateWindow,
	}
	edit(&cfg)
	_, err := js.CreateStream(ctx, cfg)
	require.NoError(t, err)
	for _, n := range e.cluster.Nodes {
		dumpOnFailure(t, "nats-server "+n.URL, stringerFunc(n.Log))
	}
	return e
}

// readClusterStream returns every message of the relay's stream in stream order. An ordered
// consumer can be cut off by a leader change right after the faults of a test: it is then
// created again from the next sequence, until the read ends at the stream's last sequence.
func readClusterStream(t *testing.T, url string) []record {
	t.Helper()
	return readClusterStreamOf(t, url, sink.DefaultStream)
}

// readClusterStreamOf is readClusterStream for the named stream.
func readClusterStreamOf(t *testing.T, url, stream string) []record {
	t.Helper()
	js, closeNC := connectJS(t, url)
	defer closeNC()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var s jetstream.Stream
	require.Eventually(t, func() bool {
		var err error
		s, err = js.Stream(ctx, stream)
		return err == nil
	}, 30*time.Second, 100*time.Millisecond)
	st := s.CachedInfo().State
	out := make([]record, 0, st.Msgs)
	next := st.FirstSeq
	for st.Msgs > 0 && next <= st.LastSeq {
		require.NoError(t, ctx.Err(), "stream read stopped at sequence %d of %d", next, st.LastSeq)
		c, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
			DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: next})
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		for next <= st.LastSeq {
			batch, err := c.Fetch(int(min(1000, st.LastSeq-next+1)), jetstream.FetchMaxWait(5*time.Second))
			if err != nil {
				break
			}
			n := 0
			for m := range batch.Messages() {
				md, err := m.Metadata()
				require.NoError(t, err)
				n++
				if md.Sequence.Stream < next {
					continue // redelivered by a reset of the consumer
				}
				out = append(out, record{Seq: md.Sequence.Stream, Subject: m.Subject(), Data: m.Data(), Header: m.Headers()})
				next = md.Sequence.Stream + 1
			}
			if batch.Error() != nil || n == 0 {
				break // a new consumer from next
			}
		}
	}
	require.Len(t, out, int(st.Msgs))
	return out
}

// leaderProxyDropping starts a fault proxy in front of the stream leader that drops the
// relay's publishes number k (counted from 1) for each k given.
func (e *clusterEnv) leaderProxyDropping(t *testing.T, ks ...int64) *faultproxy.Proxy {
	t.Helper()
	leader, err := e.cluster.StreamLeader(context.Background(), sink.DefaultStream)
	require.NoError(t, err)
	proxy, err := faultproxy.StartNATS(strings.TrimPrefix(e.cluster.Node(leader).URL, "nats://"))
	require.NoError(t, err)
	t.Cleanup(proxy.Close)
	var n atomic.Int64
	proxy.DropNATSPublish(func(subject string, _ []byte) bool {
		return strings.HasPrefix(subject, "outbox.") && slices.Contains(ks, n.Add(1))
	})
	return proxy
}

type stringerFunc func() string

func (f stringerFunc) String() string { return f() }

// A publish lost on its way to an R3 stream breaks the chain: the later messages of the window
// reach the stream leader and must be refused there, before they are proposed. A chain on
// Nats-Expected-Last-Msg-Id is checked only when the entry is applied: nats-server v2.15.2 logs
// "Error applying stream entries ... last msgid mismatch" and "critical write error" on every
// replica, they step down and turn observers, and the stream has no leader any more (publishes
// time out, stream requests get 10008 "JetStream system temporarily unavailable"). The relay
// must get past the lost publish in about an ack timeout.
func TestRelay_R3LostPublishDoesNotStallTheChain(t *testing.T) {
	// atomic: the lost message is part of a batch, which the server then refuses whole. fast:
	// it is a gap in the fast batch, which the stream leader finds before proposing the next
	// message.
	for _, mode := range []string{"single", "atomic", "fast"} {
		t.Run(mode, func(t *testing.T) {
			e := newClusterEnvMode(t, mode)
			proxy := e.leaderProxyDropping(t, 300, 2000) // a lost publish in the middle of a full window, twice
			args := []string{"run", "--pg-url", e.pg.URL, "--nats-url", "nats://" + proxy.Addr(), "--create-slot",
				"--log-format", "json", "--log-level", "debug", "--ack-timeout", "1s", "--max-in-flight", "256", "--publish", mode}
			stop, log := inProcess(t, args)
			waitStreaming(t, e.pg, "outbox_relay")

			start := time.Now()
			total := workload{Writers: 4, Aggregates: 30, Txs: 60, MaxTx: 30, Seed: 51}.run(t, e.pg)
			// Two lost publishes cost about two ack timeouts plus backoff; a stall lasts 20 minutes.
			waitStream(t, e.cluster.URL, uint64(total), 30*time.Second)
			t.Logf("events %d stored in %s (2 publishes dropped)", total, time.Since(start).Round(time.Millisecond))
			require.NoError(t, stop())
			_, dropped := proxy.Stats()
			require.Equal(t, 2, dropped)
			requireClean(t, check(t, outboxRows(t, e.pg), readClusterStream(t, e.cluster.URL)))
			require.Contains(t, log.String(), "re-publishing from the first event not stored")
			for _, n := range e.cluster.Nodes {
				require.NotContains(t, n.Log(), "critical write error")
			}
		})
	}
}

// backfill next to a live relay on a single-replica stream: every message the backfill stores
// lands between two of the relay's and breaks the relay's chain. The backfill must finish, the
// relay must keep up, and the stream must hold every event once, the live ones in
// per-aggregate order.
func TestBackfill_NextToALiveRelayKeepsOrder(t *testing.T) {
	// single: the relay chains on message ids and the backfill publishes freely. atomic and
	// fast: the relay chains its batches on the stream's sequence, so the backfill publishes
	// through the hand-over even on a single-replica stream (and atomic transactions stay
	// whole).
	for _, mode := range []string{"single", "atomic", "fast"} {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t)
			since := time.Now().Add(-time.Minute).UTC().Format(time.RFC3339Nano)
			const gap = 3000
			insertGapEvents(t, e.pg, "lost", gap) // committed before the relay's slot exists
			time.Sleep(10 * time.Millisecond)
			until := time.Now().UTC().Format(time.RFC3339Nano)

			stop, log := inProcess(t, []string{"run", "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--create-slot",
				"--log-format", "json", "--log-level", "info", "--ack-timeout", "2s", "--max-in-flight", "256", "--publish", mode})
			waitStreaming(t, e.pg, "outbox_relay")
			written := make(chan int, 1)
			go func() {
				written <- workload{Writers: 2, Aggregates: 20, Txs: 150, MaxTx: 20, Seed: 53}.run(t, e.pg)
			}()
			require.Eventually(t, func() bool { return streamMsgs(t, e.nats.URL, sink.DefaultStream) > 200 }, 30*time.Second, 20*time.Millisecond)

			out, took := backfill(t, e.pg.URL, e.nats.URL, since, until)
			require.Contains(t, out, itoa(gap)+" rows read, "+itoa(gap)+" newly stored")
			t.Logf("backfill next to the live relay took %s; %d relay hand-overs", took, strings.Count(log.String(), "hand-over: publishing paused"))

			total := <-written
			waitStream(t, e.nats.URL, uint64(gap+total), 60*time.Second)
			require.NoError(t, stop())
			recs := readStream(t, e.nats.URL, sink.DefaultStream)
			requireClean(t, check(t, outboxRows(t, e.pg), recs))
			if mode != "single" {
				require.GreaterOrEqual(t, strings.Count(log.String(), "hand-over: publishing paused"), 1, "the backfill goes through the hand-over")
			}
		})
	}
}

// backfill runs the backfill command (with extra arguments) and fails the test unless it
// succeeds within 60s.
func backfill(t *testing.T, pgURL, natsURL, since, until string, extra ...string) (string, time.Duration) {
	t.Helper()
	var out testLog
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		done <- dispatch(context.Background(), append([]string{"backfill", "--pg-url", pgURL, "--nats-url", natsURL,
			"--since", since, "--until", until, "--log-level", "warn"}, extra...), &out, &out, noEnv)
	}()
	select {
	case err := <-done:
		require.NoError(t, err, out.String())
	case <-time.After(60 * time.Second):
		t.Fatalf("backfill did not finish within 60s: %s", out.String())
	}
	return out.String(), time.Since(start).Round(time.Millisecond)
}

// backfill next to a live relay on an R3 stream, under load: the relay hands the stream over
// in chunks through its position bucket (sink.Handover). The backfill must finish; the stream
// must hold every backfilled row and every live event once, the live events in commit order
// (an event the relay stored after a gap would come back later, out of it). Without the
// bucket, backfill refuses while the relay streams. Also with --publish fast (the hand-over
// pauses a relay whose newest event may be held back, and its first message after the
// hand-back is a batch of its own).
func TestBackfill_NextToALiveRelayOnAnR3Stream(t *testing.T) {
	for _, mode := range []string{"single", "fast"} {
		t.Run(mode, func(t *testing.T) { backfillNextToR3Relay(t, mode) })
	}
}

// backfillNextToR3Relay runs TestBackfill_NextToALiveRelayOnAnR3Stream with --publish mode.
func backfillNextToR3Relay(t *testing.T, mode string) {
	e := newClusterEnvMode(t, mode)
	since := time.Now().Add(-time.Minute).UTC().Format(time.RFC3339Nano)
	const gap = 3000
	insertGapEvents(t, e.pg, "lost", gap) // committed before the relay's slot exists
	time.Sleep(10 * time.Millisecond)
	until := time.Now().UTC().Format(time.RFC3339Nano)
	stop, log := inProcess(t, []string{"run", "--pg-url", e.pg.URL, "--nats-url", e.cluster.URL, "--create-slot",
		"--log-format", "json", "--log-level", "info", "--ack-timeout", "2s", "--max-in-flight", "256", "--publish", mode})
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "first", 1) // the relay streams once it published it (the slot is active while it is created, too)
	waitStream(t, e.cluster.URL, 1, 30*time.Second)

	var out bytes.Buffer
	err := dispatch(context.Background(), []string{"backfill", "--pg-url", e.pg.URL, "--nats-url", e.cluster.URL,
		"--since", since, "--until", until, "--position-bucket", "", "--log-level", "warn"}, &out, &out, noEnv)
	require.ErrorContains(t, err, "stream OUTBOX is replicated (R3) and slot(s) [outbox_relay] are streaming, but there is no position bucket")

	written := make(chan int, 1)
	go func() {
		written <- workload{Writers: 3, Aggregates: 30, Txs: 200, MaxTx: 20, Seed: 54}.run(t, e.pg)
	}()
	require.Eventually(t, func() bool { return streamMsgs(t, e.cluster.URL, sink.DefaultStream) > 200 }, 30*time.Second, 20*time.Millisecond)
	got, took := backfill(t, e.pg.URL, e.cluster.URL, since, until)
	require.Contains(t, got, itoa(gap)+" rows read, "+itoa(gap)+" newly stored")
	live := streamMsgs(t, e.cluster.URL, sink.DefaultStream)
	t.Logf("backfill of %d rows next to the live relay took %s; %d relay hand-overs", gap, took, strings.Count(log.String(), "hand-over: publishing paused"))

	total := <-written
	require.Less(t, live, uint64(1+gap+total), "the workload must still run after the backfill")
	waitStream(t, e.cluster.URL, uint64(1+gap+total), 60*time.Second)
	require.NoError(t, stop())
	recs := readClusterStream(t, e.cluster.URL)
	requireClean(t, check(t, outboxRows(t, e.pg), recs))
	requireCommitOrder(t, recs)
	require.GreaterOrEqual(t, strings.Count(log.String(), "hand-over: publishing paused"), 2, "the backfill takes several chunks")
	for _, n := range e.cluster.Nodes {
		require.NotContains(t, n.Log(), "critical write error")
	}
}

// A backfill that dies holding the stream does not stall the relay: the grant lasts
// sink.LeaseTTL, then the relay takes the stream back (deletes the key) and publishes what was
// committed meanwhile, in order.
func TestBackfill_DeadHolderDoesNotStallTheRelay(t *testing.T) {
	e := newClusterEnv(t)
	stop, log := inProcess(t, []string{"run", "--pg-url", e.pg.URL, "--nats-url", e.cluster.URL, "--create-slot",
		"--log-format", "json", "--log-level", "info"})
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "live", 10)
	waitStream(t, e.cluster.URL, 10, 30*time.Second)

	// A backfill's request, and nothing after it.
	js, closeNC := connectJS(t, e.cluster.URL)
	defer closeNC()
	ctx, cancel := context.WithTimeout(context.Background(), 2*sink.LeaseTTL)
	defer cancel()
	kv, key, lease, _ := requestHandover(ctx, t, js, "a backfill that died")
	granted := time.Now()
	require.Equal(t, uint64(10), lease.Seq, "granted at the stream's last sequence")
	require.Equal(t, "relay", lease.GrantedBy)

	insertGapEvents(t, e.pg, "held", 20)
	time.Sleep(2 * time.Second)
	require.Equal(t, uint64(10), streamMsgs(t, e.cluster.URL, sink.DefaultStream), "the relay published while the stream was granted")
	waitStream(t, e.cluster.URL, 30, sink.LeaseTTL+30*time.Second)
	t.Logf("the relay took the stream back %s after the grant", time.Since(granted).Round(time.Millisecond))
	require.GreaterOrEqual(t, time.Since(granted), sink.LeaseTTL-time.Second)
	_, err := kv.Get(ctx, key)
	require.ErrorIs(t, err, jetstream.ErrKeyNotFound)
	require.Contains(t, log.String(), "did not hand it back within the lease")
	require.NoError(t, stop())
	recs := readClusterStream(t, e.cluster.URL)
	requireClean(t, check(t, outboxRows(t, e.pg), recs))
	requireCommitOrder(t, recs)
}

// The relay's first message after a hand-back goes alone: a message of a backfill still on its
// way when the relay resumes can take the sequence that message expects, and the rest of a
// window sent with it would then be stored after a gap. Here the relay's first publish after
// the hand-back is dropped and a backfilled copy chained on the grant's sequence is stored in
// its place; the relay must re-send from the dropped one, and the stream must hold every event
// once, the live ones in commit order.
func TestBackfill_LateBackfillMessageAtHandBackLeavesNoGap(t *testing.T) {
	e := newClusterEnv(t)
	insertGapEvents(t, e.pg, "late", 1) // before the slot: only a backfill publishes it
	var lateID string
	require.NoError(t, e.pg.QueryRow(t, `SELECT id::text FROM outbox`).Scan(&lateID))
	leader, err := e.cluster.StreamLeader(context.Background(), sink.DefaultStream)
	require.NoError(t, err)
	proxy, err := faultproxy.StartNATS(strings.TrimPrefix(e.cluster.Node(leader).URL, "nats://"))
	require.NoError(t, err)
	t.Cleanup(proxy.Close)
	stop, _ := inProcess(t, []string{"run", "--pg-url", e.pg.URL, "--nats-url", "nats://" + proxy.Addr(), "--create-slot",
		"--log-format", "json", "--log-level", "info", "--ack-timeout", "1s", "--max-in-flight", "256"})
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "live", 10)
	waitStream(t, e.cluster.URL, 10, 30*time.Second)

	js, closeNC := connectJS(t, e.cluster.URL)
	defer closeNC()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	kv, key, lease, rev := requestHandover(ctx, t, js, "test")
	n := workload{Writers: 2, Aggregates: 10, Txs: 20, MaxTx: 20, Seed: 56}.run(t, e.pg) // queued while paused

	// The late backfill message: stored right where the relay's first publish after the
	// hand-back was to go, before anything else of the relay reaches the stream.
	late := nats.NewMsg("outbox.gap.Gap_Happened")
	late.Data = []byte(`{}`)
	late.Header.Set(sink.HeaderMsgID, lateID)
	late.Header.Set(sink.HeaderCommitLSN, "0/0")
	late.Header.Set(sink.HeaderTxIndex, "0")
	late.Header.Set(sink.HeaderBackfill, "true")
	var armed atomic.Bool
	var lateErr error
	proxy.DropNATSPublish(func(subject string, _ []byte) bool {
		if !strings.HasPrefix(subject, "outbox.") || !armed.CompareAndSwap(true, false) {
			return false
		}
		pctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, lateErr = js.PublishMsg(pctx, late, jetstream.WithExpectLastSequence(lease.Seq))
		return true
	})
	armed.Store(true)
	require.NoError(t, kv.Delete(ctx, key, jetstream.LastRevision(rev))) // hand back
	waitStream(t, e.cluster.URL, uint64(10+1+n), 30*time.Second)
	require.NoError(t, lateErr)
	require.NoError(t, stop())
	_, dropped := proxy.Stats()
	require.Equal(t, 1, dropped)
	recs := readClusterStream(t, e.cluster.URL)
	require.Equal(t, lateID, recs[10].Header.Get(sink.HeaderMsgID), "the late message took the relay's place")
	requireClean(t, check(t, outboxRows(t, e.pg), recs))
	requireCommitOrder(t, recs)
}

// requireCommitOrder fails unless the live (not backfilled) events of recs are in commit order.
func requireCommitOrder(t *testing.T, recs []record) {
	t.Helper()
	var prev sink.Position
	for _, r := range recs {
		if r.Header.Get(sink.HeaderBackfill) != "" {
			continue
		}
		lsn, err := pglogrepl.ParseLSN(r.Header.Get(sink.HeaderCommitLSN))
		require.NoError(t, err)
		idx, err := strconv.Atoi(r.Header.Get(sink.HeaderTxIndex))
		require.NoError(t, err)
		pos := sink.Position{CommitLSN: lsn, TxIndex: idx}
		require.False(t, pos.AtOrBefore(prev), "stream sequence %d: event %s at %s after %s", r.Seq, r.Header.Get(sink.HeaderMsgID), pos, prev)
		prev = pos
	}
}

// The position bucket is unavailable when the relay starts and its session opens it (the node
// holding it is down; stream info requests for it go unanswered): both are retried, as any
// broker outage is, and once the node is back the relay relays every event. The stream and
// the bucket are R1 on different nodes, so that only the bucket is unavailable.
//
// (Two of three nodes of an R3 bucket down is no steady trigger: once its group knows it has no
// leader, a surviving member answers stream info requests, and only record reads fail.)
func TestRelay_PositionBucketUnavailableAtStartIsRetried(t *testing.T) {
	e := newClusterEnvReplicas(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	streamNode, err := e.cluster.StreamLeader(ctx, sink.DefaultStream)
	require.NoError(t, err)
	alive := e.cluster.Node(streamNode)
	js, closeNC := connectJS(t, alive.URL)
	defer closeNC()
	var kvNode string
	for _, name := range e.cluster.Names {
		if name != streamNode {
			kvNode = name
			break
		}
	}
	_, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: sink.DefaultPositionBucket, History: 1,
		Storage: jetstream.FileStorage, Placement: &jetstream.Placement{Tags: []string{"node:" + kvNode}}})
	require.NoError(t, err)
	got, err := e.cluster.StreamLeader(ctx, "KV_"+sink.DefaultPositionBucket)
	require.NoError(t, err)
	require.Equal(t, kvNode, got)
	down := e.cluster.Node(kvNode)
	require.NoError(t, down.Kill())
	// The slot exists: with --create-slot, preflight must read the record (a missing slot
	// after the first start is a gap) and refuses without it.
	(&env{pg: e.pg}).createSlot(t)
	insertGapEvents(t, e.pg, "before", 50)

	done, log := runRelay(t, []string{"run", "--pg-url", e.pg.URL, "--nats-url", alive.URL,
		"--log-format", "json", "--log-level", "info"})
	running := func() {
		t.Helper()
		select {
		case err := <-done:
			t.Fatalf("the relay stopped: %v", err)
		default:
		}
	}
	require.Eventually(t, func() bool {
		running()
		return strings.Contains(log.String(), "replication interrupted; reconnecting") &&
			strings.Contains(log.String(), "open the position record bucket")
	}, 60*time.Second, 100*time.Millisecond, "the session did not fail opening the bucket")
	require.Zero(t, streamMsgs(t, alive.URL, sink.DefaultStream), "nothing is published without the record")
	require.NoError(t, down.Start())
	waitStream(t, alive.URL, 50, 90*time.Second)
	insertGapEvents(t, e.pg, "after", 20)
	waitStream(t, alive.URL, 70, 30*time.Second)
	running()
	requireClean(t, check(t, outboxRows(t, e.pg), readClusterStream(t, alive.URL)))
}

// On a 3-node cluster a stream the relay creates gets 3 replicas unless --stream-replicas says
// otherwise, and discard policy new.
func TestEnsureStream_CreatesAnR3StreamOnACluster(t *testing.T) {
	c := testenv.StartNATSCluster(t, 3)
	nc, err := sink.Connect(c.URL)
	require.NoError(t, err)
	defer nc.Close()
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	info, err := sink.EnsureStream(ctx, js, sink.Config{}, zerolog.Nop())
	require.NoError(t, err)
	require.Equal(t, 3, info.Config.Replicas)
	require.Equal(t, jetstream.DiscardNew, info.Config.Discard)
	info, err = sink.EnsureStream(ctx, js, sink.Config{Stream: "ONE", SubjectPrefix: "one", Replicas: 1}, zerolog.Nop())
	require.NoError(t, err)
	require.Equal(t, 1, info.Config.Replicas)
}

// requestHandover asks the relay for the stream as a backfill does (a request in the hand-over
// key of the default stream and prefix) and waits until the relay grants it: the grant and its
// revision.
func requestHandover(ctx context.Context, t *testing.T, js jetstream.JetStream, holder string) (jetstream.KeyValue, string, sink.Lease, uint64) {
	t.Helper()
	kv, err := js.KeyValue(ctx, sink.DefaultPositionBucket)
	require.NoError(t, err)
	key := sink.HandoverKey(sink.DefaultStream, sink.DefaultSubjectPrefix)
	b, err := json.Marshal(sink.Lease{State: sink.LeaseRequested, Holder: holder, At: time.Now()})
	require.NoError(t, err)
	_, err = kv.Create(ctx, key, b)
	require.NoError(t, err)
	var lease sink.Lease
	var rev uint64
	require.Eventually(t, func() bool {
		e, err := kv.Get(ctx, key)
		if err != nil || json.Unmarshal(e.Value(), &lease) != nil {
			return false
		}
		rev = e.Revision()
		return lease.State == sink.LeaseGranted
	}, 10*time.Second, 20*time.Millisecond, "the relay did not grant the request")
	return kv, key, lease, rev
}
