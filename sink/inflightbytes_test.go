package sink

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
)

// The window is bounded in bytes as well as in events: with room for 1,024 events of 100 KiB
// the bytes in flight never exceed MaxInFlightBytes, and an event larger than the bound alone
// still goes out (alone) instead of waiting forever.
func TestJetStream_InFlightBytesNeverExceedTheBound(t *testing.T) {
	const bound = 512 << 10
	srv := natsembed.JetStream(t, natsembed.WithMaxPayload(2<<20))
	nc, err := Connect(srv.URL)
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	cfg := Config{Stream: "S", SubjectPrefix: "outbox", MaxInFlightBytes: bound}
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	_, err = EnsureStream(context.Background(), js, cfg, zerologNop())
	require.NoError(t, err)
	var confirmed atomic.Int64
	j := NewJetStream(js, cfg, func(checkpoint.Ticket) { confirmed.Add(1) }, zerologNop())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go func() { _ = j.Run(ctx) }()

	// Watch the bytes in flight from here while publishing.
	var seen atomic.Int64
	stop := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for {
			if b := j.InFlightBytes(); b > seen.Load() {
				seen.Store(b)
			}
			select {
			case <-stop:
				return
			default:
			}
		}
	}()
	ev := testEvent()
	ev.Headers = nil
	ev.Payload = make([]byte, 100<<10)
	const n = 300
	for i := range n {
		ev.ID = []byte(fmt.Sprintf("small-%04d", i))
		require.NoError(t, j.Publish(ctx, ev, checkpoint.Ticket(i+1)))
	}
	require.Eventually(t, func() bool { return confirmed.Load() == n }, 20*time.Second, 10*time.Millisecond)
	close(stop)
	<-watched
	peak := j.Stats().PeakInFlightBytes
	t.Logf("peak in flight: %d bytes (watched: %d), bound %d", peak, seen.Load(), bound)
	require.LessOrEqual(t, peak, int64(bound))
	require.LessOrEqual(t, seen.Load(), int64(bound))
	require.Greater(t, peak, int64(bound/2), "the window never filled: the test shows nothing")
	require.Zero(t, j.InFlightBytes())

	// Larger than the bound: sent alone, then the window goes on.
	ev.ID = []byte("large")
	ev.Payload = make([]byte, 3*bound/2)
	require.NoError(t, j.Publish(ctx, ev, n+1))
	ev.ID = []byte("after-large")
	ev.Payload = make([]byte, 100<<10)
	require.NoError(t, j.Publish(ctx, ev, n+2))
	require.Eventually(t, func() bool { return confirmed.Load() == n+2 }, 10*time.Second, 10*time.Millisecond)
	require.Zero(t, j.InFlightBytes())
}
