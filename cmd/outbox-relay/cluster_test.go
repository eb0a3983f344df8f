package main

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/faultproxy"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/sink"
)

// clusterEnv is one test's Postgres database (migrated) and a 3-node JetStream cluster with
// the relay's stream created as R3.
type clusterEnv struct {
	pg      *testenv.PG
	cluster *testenv.NATSCluster
}

func newClusterEnv(t *testing.T) *clusterEnv {
	t.Helper()
	e := &clusterEnv{pg: testenv.Postgres(t), cluster: testenv.StartNATSCluster(t, 3)}
	(&env{pg: e.pg}).migrate(t)
	js, closeNC := connectJS(t, e.cluster.URL)
	defer closeNC()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name: sink.DefaultStream, Subjects: []string{sink.DefaultSubjectPrefix + ".>"},
		Storage: jetstream.FileStorage, Replicas: 3, Duplicates: sink.DefaultDuplicateWindow,
	})
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
	js, closeNC := connectJS(t, url)
	defer closeNC()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var s jetstream.Stream
	require.Eventually(t, func() bool {
		var err error
		s, err = js.Stream(ctx, sink.DefaultStream)
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
	e := newClusterEnv(t)
	proxy := e.leaderProxyDropping(t, 300, 2000) // a lost publish in the middle of a full window, twice
	args := []string{"run", "--pg-url", e.pg.URL, "--nats-url", "nats://" + proxy.Addr(), "--create-slot",
		"--log-format", "json", "--log-level", "info", "--ack-timeout", "1s", "--max-in-flight", "256"}
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
}

// backfill next to a live relay on a single-replica stream: every message the backfill stores
// lands between two of the relay's and breaks the relay's chain. The backfill must finish, the
// relay must keep up, and the stream must hold every event once, the live ones in
// per-aggregate order.
func TestBackfill_NextToALiveRelayKeepsOrder(t *testing.T) {
	e := newEnv(t)
	since := time.Now().Add(-time.Minute).UTC().Format(time.RFC3339Nano)
	const gap = 3000
	insertGapEvents(t, e.pg, "lost", gap) // committed before the relay's slot exists
	time.Sleep(10 * time.Millisecond)
	until := time.Now().UTC().Format(time.RFC3339Nano)

	stop, _ := inProcess(t, []string{"run", "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--create-slot",
		"--log-format", "json", "--log-level", "info", "--ack-timeout", "2s", "--max-in-flight", "256"})
	waitStreaming(t, e.pg, "outbox_relay")
	written := make(chan int, 1)
	go func() {
		written <- workload{Writers: 2, Aggregates: 20, Txs: 150, MaxTx: 20, Seed: 53}.run(t, e.pg)
	}()
	require.Eventually(t, func() bool { return streamMsgs(t, e.nats.URL, sink.DefaultStream) > 200 }, 30*time.Second, 20*time.Millisecond)

	out, took := backfill(t, e.pg.URL, e.nats.URL, since, until)
	require.Contains(t, out, itoa(gap)+" rows read, "+itoa(gap)+" newly stored")
	t.Logf("backfill next to the live relay took %s", took)

	total := <-written
	waitStream(t, e.nats.URL, uint64(gap+total), 60*time.Second)
	require.NoError(t, stop())
	requireClean(t, check(t, outboxRows(t, e.pg), readStream(t, e.nats.URL, sink.DefaultStream)))
}

// backfill runs the backfill command and fails the test unless it succeeds within 60s.
func backfill(t *testing.T, pgURL, natsURL, since, until string) (string, time.Duration) {
	t.Helper()
	var out testLog
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		done <- dispatch(context.Background(), []string{"backfill", "--pg-url", pgURL, "--nats-url", natsURL,
			"--since", since, "--until", until, "--log-level", "warn"}, &out, &out, noEnv)
	}()
	select {
	case err := <-done:
		require.NoError(t, err, out.String())
	case <-time.After(60 * time.Second):
		t.Fatalf("backfill did not finish within 60s: %s", out.String())
	}
	return out.String(), time.Since(start).Round(time.Millisecond)
}

// On a replicated stream the relay chains on the stream's last sequence, which a backfill
// publishing next to it could take over: backfill refuses while a relay streams, naming the
// stream, and runs once the relay is stopped; the relay then goes on.
func TestBackfill_RefusesAReplicatedStreamWhileARelayStreams(t *testing.T) {
	e := newClusterEnv(t)
	since := time.Now().Add(-time.Minute).UTC().Format(time.RFC3339Nano)
	insertGapEvents(t, e.pg, "lost", 500)
	time.Sleep(10 * time.Millisecond)
	until := time.Now().UTC().Format(time.RFC3339Nano)
	args := []string{"run", "--pg-url", e.pg.URL, "--nats-url", e.cluster.URL, "--create-slot", "--log-format", "json", "--log-level", "info"}
	stop, _ := inProcess(t, args)
	waitStreaming(t, e.pg, "outbox_relay")
	n := workload{Writers: 2, Aggregates: 10, Txs: 20, MaxTx: 10, Seed: 54}.run(t, e.pg)

	var out bytes.Buffer
	err := dispatch(context.Background(), []string{"backfill", "--pg-url", e.pg.URL, "--nats-url", e.cluster.URL,
		"--since", since, "--until", until, "--log-level", "warn"}, &out, &out, noEnv)
	require.ErrorContains(t, err, "stream OUTBOX is replicated (R3) and slot(s) [outbox_relay] are streaming")

	waitStream(t, e.cluster.URL, uint64(n), 30*time.Second)
	require.NoError(t, stop())
	require.Eventually(t, func() bool {
		var active bool
		return e.pg.QueryRow(t, `SELECT active FROM pg_replication_slots WHERE slot_name = 'outbox_relay'`).Scan(&active) == nil && !active
	}, 10*time.Second, 20*time.Millisecond)
	got, _ := backfill(t, e.pg.URL, e.cluster.URL, since, until)
	require.Contains(t, got, "500 rows read, 500 newly stored")

	stop, _ = inProcess(t, args)
	waitStreaming(t, e.pg, "outbox_relay")
	m := workload{Writers: 2, Aggregates: 10, Txs: 20, MaxTx: 10, Seed: 55}.run(t, e.pg)
	waitStream(t, e.cluster.URL, uint64(n+500+m), 30*time.Second)
	require.NoError(t, stop())
	requireClean(t, check(t, outboxRows(t, e.pg), readClusterStream(t, e.cluster.URL)))
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
