package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/sink"
)

// A stream at its max_bytes with discard: new refuses publishes: the relay stalls with a clear
// error and metric, confirms nothing past the last stored event (Postgres keeps the rest), and
// once space frees (the limit raised) publishes everything, once and in order.
func TestStreamFullStallsThenResumes(t *testing.T) {
	e := newEnv(t)
	js, closeNC := connectJS(t, e.nats.URL)
	defer closeNC()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cfg := jetstream.StreamConfig{Name: sink.DefaultStream, Subjects: []string{"outbox.>"}, Storage: jetstream.FileStorage,
		Discard: jetstream.DiscardNew, MaxBytes: 64 << 10, Duplicates: 20 * time.Minute}
	_, err := js.CreateStream(ctx, cfg)
	require.NoError(t, err)

	stop, log := inProcess(t, e.args())
	base := httpAddrOf(t, log)
	waitStreaming(t, e.pg, "outbox_relay")
	n := workload{Writers: 2, Aggregates: 10, Txs: 40, MaxTx: 10, Seed: 7}.run(t, e.pg) // about 120 KiB of messages

	require.Eventually(t, func() bool { return strings.Contains(log.String(), "the stream is full") },
		30*time.Second, 20*time.Millisecond, "no error names the full stream")
	stored := streamMsgs(t, e.nats.URL, sink.DefaultStream)
	require.Less(t, stored, uint64(n))
	time.Sleep(time.Second) // status updates go out meanwhile
	confirmed := confirmedFlush(t, e.pg, "outbox_relay")
	require.Equal(t, stored, streamMsgs(t, e.nats.URL, sink.DefaultStream), "the full stream took more")
	_, m := testenv.HTTPGet(t, base+"/metrics")
	require.Greater(t, metric(t, m, `outbox_relay_stream_full_total{stream="OUTBOX"}`), 0.0)

	// Space frees: the relay goes on by itself.
	cfg.MaxBytes = 8 << 20
	_, err = js.UpdateStream(ctx, cfg)
	require.NoError(t, err)
	waitStream(t, e.nats.URL, uint64(n), 60*time.Second)
	waitSlotCaughtUp(t, e.pg, "outbox_relay", "after space freed")
	require.NoError(t, stop())
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	requireClean(t, check(t, outboxRows(t, e.pg), recs))
	// The first event the full stream refused: nothing at or past its commit was confirmed then.
	firstRefused := mustLSN(t, recs[stored].Header.Get(sink.HeaderCommitLSN))
	require.LessOrEqual(t, confirmed, firstRefused, "confirmed %s while the stream lacked the event committed at %s", confirmed, firstRefused)
	t.Logf("stream full after %d of %d events; confirmed %s, first refused event committed at %s", stored, n, confirmed, firstRefused)
}
