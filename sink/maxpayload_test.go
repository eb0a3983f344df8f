package sink

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
)

// An event that fits max_payload with its own headers but not with the Nats-Expected-* headers
// send adds is poison, not a publish that nats.go refuses again on every retry.
func TestJetStream_ControlHeadersCountAgainstMaxPayload(t *testing.T) {
	const max = 4096
	srv := natsembed.JetStream(t, natsembed.WithMaxPayload(max))
	nc, err := Connect(srv.URL)
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	cfg := Config{Stream: "S", SubjectPrefix: "outbox"}
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	_, err = EnsureStream(context.Background(), js, cfg, zerologNop())
	require.NoError(t, err)
	j := NewJetStream(js, cfg, func(checkpoint.Ticket) {}, zerologNop())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go func() { _ = j.Run(ctx) }()

	ev := testEvent()
	ev.Headers = nil
	ev.Payload = nil
	base := j.buildMsg(&entry{}, ev)
	// Fits without the control headers, by 10 bytes.
	ev.Payload = make([]byte, max-base-10)
	require.LessOrEqual(t, base+len(ev.Payload), max)
	err = j.Publish(ctx, ev, 1)
	require.True(t, errors.Is(err, ErrPoison), "got %v", err)
	require.ErrorContains(t, err, "over the server's max_payload of 4096")

	// One that fits with them goes out.
	ev.Payload = make([]byte, max-base-controlHeadersSize(cfg.Stream, len(ev.ID)))
	require.NoError(t, j.Publish(ctx, ev, 2))
	require.Eventually(t, func() bool { return j.Stats().Published == 1 }, 5*time.Second, 10*time.Millisecond)
}
