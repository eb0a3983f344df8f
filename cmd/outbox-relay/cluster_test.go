package main

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
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
	leader, err := e.cluster.StreamLeader(context.Background(), sink.DefaultStream)
	require.NoError(t, err)
	proxy, err := faultproxy.StartNATS(strings.TrimPrefix(e.cluster.Node(leader).URL, "nats://"))
	require.NoError(t, err)
	t.Cleanup(proxy.Close)
	var n atomic.Int64
	proxy.DropNATSPublish(func(subject string, _ []byte) bool {
		if !strings.HasPrefix(subject, "outbox.") {
			return false
		}
		k := n.Add(1)
		return k == 300 || k == 2000 // a lost publish in the middle of a full window, twice
	})
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
	requireClean(t, check(t, outboxRows(t, e.pg), readStream(t, e.cluster.URL, sink.DefaultStream)))
	require.Contains(t, log.String(), "re-publishing from the first event not stored")
	for _, n := range e.cluster.Nodes {
		require.NotContains(t, n.Log(), "critical write error")
	}
}
