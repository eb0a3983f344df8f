package sink_test

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
	"github.com/outbox-relay/outbox-relay/sink"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func event(i int) *decoder.Event {
	return &decoder.Event{
		ID:            []byte(fmt.Sprintf("id-%05d", i)),
		AggregateType: []byte("order"),
		AggregateID:   []byte("1"),
		EventType:     []byte("Created"),
		Subject:       []byte("outbox.order.Created"),
		Payload:       []byte(fmt.Sprintf(`{"n": %d}`, i)),
		CommitLSN:     0x100,
		TxIndex:       i,
	}
}

// newJS connects to a new JetStream server through sink.Connect.
func newJS(t *testing.T) jetstream.JetStream {
	t.Helper()
	nc, err := sink.Connect(natsembed.JetStream(t).URL)
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	return js
}

func setup(t *testing.T, cfg sink.Config) (jetstream.JetStream, *sink.Publisher, *confirms) {
	t.Helper()
	js := newJS(t)
	_, err := sink.EnsureStream(context.Background(), js, cfg, zerolog.Nop())
	require.NoError(t, err)
	c := &confirms{}
	return js, sink.NewPublisher(js, cfg, c.confirm, zerolog.Nop()), c
}

type confirms struct {
	mu      sync.Mutex
	tickets []checkpoint.Ticket
}

func (c *confirms) confirm(t checkpoint.Ticket) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.tickets = append(c.tickets, t)
}

func (c *confirms) n() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.tickets)
}

func streamMsgs(t *testing.T, js jetstream.JetStream) uint64 {
	t.Helper()
	s, err := js.Stream(context.Background(), sink.DefaultStream)
	require.NoError(t, err)
	info, err := s.Info(context.Background())
	require.NoError(t, err)
	return info.State.Msgs
}

// Publishing is pipelined: a whole window goes out before any ack is looked at, and nothing is
// confirmed until the ack loop saw the broker's acks.
func TestJetStream_PipelinesAWindowAndConfirmsOnlyAfterAcks(t *testing.T) {
	js, pub, c := setup(t, sink.Config{Window: 50})
	ctx := context.Background()
	for i := 0; i < 50; i++ {
		require.NoError(t, pub.Publish(ctx, event(i), checkpoint.Ticket(i)))
	}
	require.True(t, pub.Full(), "the window is full: the 51st publish would block")
	require.Equal(t, 50, pub.InFlight())
	require.Eventually(t, func() bool { return streamMsgs(t, js) == 50 }, 5*time.Second, 10*time.Millisecond)
	require.Zero(t, c.n(), "stored, but the ack loop has not run: nothing confirmed yet")

	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- pub.Run(runCtx) }()
	require.Eventually(t, func() bool { return c.n() == 50 }, 5*time.Second, 10*time.Millisecond)
	for i, tk := range c.tickets {
		require.Equal(t, checkpoint.Ticket(i), tk, "confirmed in publish order")
	}
	require.False(t, pub.Full())
	cancel()
	require.NoError(t, <-done)
}

// A re-published event (same Nats-Msg-Id) is acknowledged as a duplicate, counted as stored,
// and not stored twice.
func TestJetStream_DuplicateAckCountsAsStored(t *testing.T) {
	js, pub, c := setup(t, sink.Config{Window: 8})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = pub.Run(ctx) }()
	for i := 0; i < 3; i++ {
		require.NoError(t, pub.Publish(ctx, event(i), checkpoint.Ticket(i)))
	}
	for i := 0; i < 3; i++ {
		require.NoError(t, pub.Publish(ctx, event(i), checkpoint.Ticket(10+i)))
	}
	require.Eventually(t, func() bool { return c.n() == 6 }, 5*time.Second, 10*time.Millisecond)
	require.Equal(t, uint64(3), streamMsgs(t, js))
	require.Equal(t, uint64(3), pub.Stats().Duplicates)
}

func TestEnsureStream_RefusesAStreamThatDoesNotCoverThePrefix(t *testing.T) {
	js := newJS(t)
	_, err := js.CreateStream(context.Background(), jetstream.StreamConfig{Name: "OUTBOX", Subjects: []string{"orders.>"}})
	require.NoError(t, err)
	_, err = sink.EnsureStream(context.Background(), js, sink.Config{}, zerolog.Nop())
	require.ErrorContains(t, err, "do not cover outbox.>")
	require.ErrorContains(t, err, "Config.Sink.SubjectPrefix")
}

// Another relay (another prefix) or another publisher on the relay's stream would break the
// stream-wide chain on nearly every message: a stream with subjects outside the prefix, or
// sourcing from other streams, is refused, naming the stream.
func TestEnsureStream_RefusesAStreamWiderThanThePrefix(t *testing.T) {
	js := newJS(t)
	ctx := context.Background()
	// Each case has subjects of its own: streams may not overlap.
	create := func(name string, subjects []string, sources ...string) {
		t.Helper()
		cfg := jetstream.StreamConfig{Name: name, Subjects: subjects, Storage: jetstream.MemoryStorage}
		for _, src := range sources {
			cfg.Sources = append(cfg.Sources, &jetstream.StreamSource{Name: src})
		}
		_, err := js.CreateStream(ctx, cfg)
		require.NoError(t, err)
	}
	ensure := func(name, prefix string) error {
		_, err := sink.EnsureStream(ctx, js, sink.Config{Stream: name, SubjectPrefix: prefix}, zerolog.Nop())
		return err
	}
	for i, subjects := range [][]string{{"w0.outbox.>", "w0.billing.>"}, {"w1.>"}} {
		name := fmt.Sprintf("WIDE%d", i)
		create(name, subjects)
		err := ensure(name, fmt.Sprintf("w%d.outbox", i))
		require.ErrorContains(t, err, "stream "+name+" also takes subjects")
		require.ErrorContains(t, err, "only publisher")
	}
	create("NARROW", []string{"n.outbox.a.>", "n.outbox.b.>"})
	require.ErrorContains(t, ensure("NARROW", "n.outbox"), "do not cover", "narrower than the prefix: refused as before")
	create("OWN", []string{"o.outbox.>"})
	require.NoError(t, ensure("OWN", "o.outbox"))
	create("OTHER", []string{"other.>"})
	create("SOURCING", []string{"s.outbox.>"}, "OTHER")
	require.ErrorContains(t, ensure("SOURCING", "s.outbox"), "stream SOURCING sources messages")
}

func TestEnsureStream_WarnsAboutAShortDuplicateWindow(t *testing.T) {
	js := newJS(t)
	_, err := js.CreateStream(context.Background(), jetstream.StreamConfig{Name: "OUTBOX", Subjects: []string{"outbox.>"}, Duplicates: 30 * time.Second})
	require.NoError(t, err)
	var log bytes.Buffer
	_, err = sink.EnsureStream(context.Background(), js, sink.Config{}, zerolog.New(&log))
	require.NoError(t, err)
	require.Contains(t, log.String(), "duplicate window is under 2 minutes")
}

func TestEnsureStream_CreatesAFileStreamWithTheConfiguredWindow(t *testing.T) {
	js := newJS(t)
	info, err := sink.EnsureStream(context.Background(), js, sink.Config{SubjectPrefix: "acme.outbox", DuplicateWindow: time.Hour}, zerolog.Nop())
	require.NoError(t, err)
	require.Equal(t, []string{"acme.outbox.>"}, info.Config.Subjects)
	require.Equal(t, jetstream.FileStorage, info.Config.Storage)
	require.Equal(t, time.Hour, info.Config.Duplicates)
	require.Equal(t, 1, info.Config.Replicas, "one server: one replica")
	require.Equal(t, jetstream.DiscardNew, info.Config.Discard)
}

// spans is a sink.Tracer recording, per event id, what the sink told it at the ack.
type spans struct {
	mu     sync.Mutex
	stored []string // "id seq duplicate", in the order told
}

func (s *spans) Start(ev *decoder.Event) func(uint64, bool) {
	id := string(ev.ID)
	return func(seq uint64, dup bool) {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.stored = append(s.stored, fmt.Sprintf("%s %d %t", id, seq, dup))
	}
}

func (s *spans) told() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.stored...)
}

// The tracer hears of each event once, at its ack, with the stream sequence the message has
// (for a duplicate: the stored copy's) and whether the ack was a duplicate.
func TestJetStream_TracerToldTheAckedSequence(t *testing.T) {
	tr := &spans{}
	js, pub, c := setup(t, sink.Config{Window: 8, Tracer: tr})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = pub.Run(ctx) }()
	for i := 0; i < 3; i++ {
		require.NoError(t, pub.Publish(ctx, event(i), checkpoint.Ticket(i)))
	}
	require.Eventually(t, func() bool { return c.n() == 3 }, 5*time.Second, 10*time.Millisecond)
	for i := 0; i < 3; i++ {
		require.NoError(t, pub.Publish(ctx, event(i), checkpoint.Ticket(10+i)))
	}
	require.Eventually(t, func() bool { return c.n() == 6 }, 5*time.Second, 10*time.Millisecond)

	s, err := js.Stream(ctx, sink.DefaultStream)
	require.NoError(t, err)
	var want []string
	for _, dup := range []bool{false, true} {
		for seq := uint64(1); seq <= 3; seq++ {
			m, err := s.GetMsg(ctx, seq)
			require.NoError(t, err)
			want = append(want, fmt.Sprintf("%s %d %t", m.Header.Get(sink.HeaderMsgID), seq, dup))
		}
	}
	require.Equal(t, want, tr.told())
}
