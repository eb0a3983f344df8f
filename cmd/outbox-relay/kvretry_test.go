package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/sink"
)

// The position record's bucket unavailable at a session start (its only replica down while the
// R3 event stream stays up) is retried, not fatal: once the node is back the relay goes on.
// (Opening the bucket answers from the cluster's metadata; reading the record fails, and that
// failure ends the session like any other broker error.)
func TestSlotGap_BucketUnavailableAtSessionStartIsRetried(t *testing.T) {
	e := newClusterEnv(t)
	js, closeNC := connectJS(t, e.cluster.URL)
	defer closeNC()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var err error
	require.Eventually(t, func() bool {
		_, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: sink.DefaultPositionBucket, Replicas: 1, History: 1, Storage: jetstream.FileStorage})
		return err == nil
	}, 30*time.Second, 200*time.Millisecond, "create an R1 bucket: %v", err)
	holder, err := e.cluster.StreamLeader(ctx, "KV_"+sink.DefaultPositionBucket)
	require.NoError(t, err)

	args := []string{"run", "--pg-url", e.pg.URL, "--nats-url", e.cluster.URL, "--create-slot", "--log-format", "json", "--log-level", "debug", "--http-addr", "127.0.0.1:0"}
	done, log := runRelay(t, args)
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "before", 5)
	waitStream(t, e.cluster.URL, 5, 30*time.Second)

	// The bucket's node goes down and the replication session restarts.
	require.NoError(t, e.cluster.Node(holder).Kill())
	e.pg.Exec(t, `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'outbox_relay'`)
	require.Eventually(t, func() bool {
		return strings.Count(log.String(), "replication interrupted; reconnecting") >= 2 && strings.Contains(log.String(), "position record")
	}, 60*time.Second, 50*time.Millisecond, "the session never retried")
	select {
	case err := <-done:
		t.Fatalf("the relay stopped on an unavailable bucket: %v", err)
	default:
	}

	require.NoError(t, e.cluster.Node(holder).Start())
	insertGapEvents(t, e.pg, "after", 5)
	waitStream(t, e.cluster.URL, 10, 60*time.Second)
	requireClean(t, check(t, outboxRows(t, e.pg), readClusterStream(t, e.cluster.URL)))
}
