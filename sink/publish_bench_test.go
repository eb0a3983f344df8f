package sink_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/tracing"
	"github.com/outbox-relay/outbox-relay/sink"
)

// BenchmarkJetStream_PublishConfirm publishes b.N events of the drain scenario's shape (400-byte
// payload, the relay's headers) through the sink to a nats-server process (file storage) and
// waits until every one is confirmed. The server is a separate process (default sync interval), so allocs/op and
// cpu-ns/op (this process's user+system CPU) are the sink's and nats.go's cost per event.
//
// Tracing is off (Config.Tracer nil), as without OTEL_* configuration: allocs/op is what the
// relay pays with tracing off. BenchmarkJetStream_PublishConfirmTraced is the same with a span
// per event.
func BenchmarkJetStream_PublishConfirm(b *testing.B) { benchPublishConfirm(b, sink.Config{}) }

// BenchmarkJetStream_PublishConfirmFast is BenchmarkJetStream_PublishConfirm in fast mode (one
// fast batch, confirmed by flow acks).
func BenchmarkJetStream_PublishConfirmFast(b *testing.B) {
	benchPublishConfirm(b, sink.Config{Publish: sink.PublishFast})
}

// BenchmarkJetStream_PublishConfirmTraced is BenchmarkJetStream_PublishConfirm with tracing on
// (every span sampled, exported in batches to a discarding exporter).
func BenchmarkJetStream_PublishConfirmTraced(b *testing.B) {
	env := func(k string) (string, bool) {
		if k == "OTEL_TRACES_EXPORTER" {
			return "otlp", true
		}
		return "", false
	}
	tr, shutdown, err := tracing.Setup(context.Background(), env, "BENCH", discardSpans{}, zerolog.Nop())
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = shutdown(context.Background()) }()
	benchPublishConfirm(b, sink.Config{Tracer: tr})
}

type discardSpans struct{}

func (discardSpans) ExportSpans(context.Context, []sdktrace.ReadOnlySpan) error { return nil }
func (discardSpans) Shutdown(context.Context) error                             { return nil }

func benchPublishConfirm(b *testing.B, cfg sink.Config) {
	// Default sync interval, as in the bench: CPU, not fsync, is what is measured.
	srv, err := testenv.StartNATSServer(b.TempDir(), false)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = srv.Kill() }()
	nc, err := sink.Connect(srv.URL)
	if err != nil {
		b.Fatal(err)
	}
	defer nc.Close()
	cfg.Stream = fmt.Sprintf("BENCH%d", b.N)
	js, err := jetstream.New(nc)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := sink.EnsureStream(context.Background(), js, cfg, zerolog.Nop()); err != nil {
		b.Fatal(err)
	}
	var confirmed atomic.Int64
	pub := sink.NewPublisher(js, cfg, func(checkpoint.Ticket) { confirmed.Add(1) }, zerolog.Nop())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- pub.Run(ctx) }()

	payload := make([]byte, 400)
	for i := range payload {
		payload[i] = 'a' + byte(i%26)
	}
	ev := &decoder.Event{
		AggregateType: []byte("order"),
		AggregateID:   []byte("12345"),
		EventType:     []byte("OrderCreated"),
		Subject:       []byte("outbox.order.OrderCreated"),
		Payload:       payload,
		CreatedAt:     []byte("2026-11-26T13:50:57.123456Z"),
		CommitLSN:     0x16_B374D848,
	}
	id := []byte("0b5a4c1e-0000-4000-8000-000000000000")
	ev.ID = id
	cpu0 := cpuTime()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		copy(id[len(id)-8:], fmt.Appendf(nil, "%08d", i))
		ev.TxIndex = i
		if err := pub.Wait(ctx); err != nil {
			b.Fatal(err)
		}
		if err := pub.Publish(ctx, ev, checkpoint.Ticket(i)); err != nil {
			b.Fatal(err)
		}
	}
	for confirmed.Load() < int64(b.N) {
		time.Sleep(100 * time.Microsecond)
	}
	b.StopTimer()
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
	cancel()
	if err := <-done; err != nil {
		b.Fatal(err)
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
