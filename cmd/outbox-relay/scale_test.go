package main

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
	"github.com/outbox-relay/outbox-relay/sink"
)

// Horizontal scale-out: `migrate --partitions 2` creates two row-filtered publications; two
// relays, each with its own slot, publication and stream, together deliver every event exactly
// once, every aggregate entirely through one of them (so its order holds), in the partition
// the filter's expression assigns it.
func TestRelay_PartitionedRelaysSplitByAggregateAndAddUp(t *testing.T) {
	e := &env{pg: testenv.Postgres(t), nats: natsembed.JetStream(t)}
	migrate := func() string {
		var out bytes.Buffer
		require.NoError(t, dispatch(context.Background(), []string{"migrate", "--pg-url", e.pg.URL, "--partitions", "2", "--log-level", "warn"}, &out, &out, noEnv))
		return out.String()
	}
	out := migrate()
	require.Contains(t, out, "--publication outbox_pub_p1of2")
	migrate() // idempotent
	var filters int
	require.NoError(t, e.pg.QueryRow(t, `SELECT count(*) FROM pg_publication_tables WHERE pubname LIKE 'outbox_pub_p%of2' AND rowfilter IS NOT NULL`).Scan(&filters))
	require.Equal(t, 2, filters)

	streams := []string{"OUTBOX_P0", "OUTBOX_P1"}
	for i, stream := range streams {
		stop, _ := inProcess(t, []string{"run", "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--create-slot", "--log-level", "warn",
			"--publication", fmt.Sprintf("outbox_pub_p%dof2", i), "--slot", fmt.Sprintf("outbox_relay_p%d", i),
			"--stream", stream, "--subject-prefix", fmt.Sprintf("outbox.p%d", i)})
		t.Cleanup(func() { _ = stop() })
		waitStreaming(t, e.pg, fmt.Sprintf("outbox_relay_p%d", i))
	}
	n := workload{Writers: 4, Aggregates: 40, Txs: 40, MaxTx: 20, Seed: 6}.run(t, e.pg)
	require.Eventually(t, func() bool {
		return streamMsgs(t, e.nats.URL, streams[0])+streamMsgs(t, e.nats.URL, streams[1]) >= uint64(n)
	}, 60*time.Second, 50*time.Millisecond)

	// The partition Postgres' own expression assigns each aggregate.
	want := map[string]int{}
	rows, err := e.pg.Conn(t).Query(context.Background(), `SELECT DISTINCT aggregate_id, (hashtext(aggregate_id) & 2147483647) % 2 FROM outbox`)
	require.NoError(t, err)
	for rows.Next() {
		var id string
		var p int
		require.NoError(t, rows.Scan(&id, &p))
		want[id] = p
	}
	require.NoError(t, rows.Err())

	var all []record
	for i, stream := range streams {
		recs := readStream(t, e.nats.URL, stream)
		require.NotEmpty(t, recs, "partition %d got no events: the split is not working", i)
		for _, r := range recs {
			agg := r.Header.Get(sink.HeaderAggregateID)
			require.Equal(t, want[agg], i, "aggregate %s in stream %s", agg, stream)
			require.Contains(t, r.Subject, fmt.Sprintf("outbox.p%d.", i))
		}
		all = append(all, recs...)
	}
	// Each aggregate lives in one stream, so the concatenation keeps every aggregate's order.
	requireClean(t, check(t, outboxRows(t, e.pg), all))
}
