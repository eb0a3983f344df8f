// Package tracing records an OpenTelemetry span for every event the relay publishes, as a
// child of the producer's trace context (the traceparent and tracestate entries of the
// event's headers column), from the decoding of the event's WAL message to JetStream's publish
// ack. Spans are exported over OTLP (HTTP or gRPC), configured by the standard OTEL_* environment
// variables, and only when those ask for it (Configured): otherwise no tracer provider exists
// and the sink calls nothing.
package tracing

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/sink"
)

// Span attribute keys besides the messaging.* ones of OpenTelemetry's semantic conventions.
const (
	AttrStream         = "outbox.stream"          // the JetStream stream
	AttrStreamSequence = "outbox.stream.sequence" // the message's stream sequence (from the publish ack)
	AttrDuplicate      = "outbox.duplicate"       // the ack said the stream held the event already
	AttrCommitLSN      = "outbox.commit_lsn"      // the transaction's commit LSN, as Outbox-Commit-Lsn
	AttrTxIndex        = "outbox.tx_index"        // the event's index in its transaction, as Outbox-Tx-Index
)

// Configured reports whether the OTEL_* variables (read through env) ask for traces: not
// OTEL_SDK_DISABLED=true, and OTEL_TRACES_EXPORTER=otlp, or OTEL_TRACES_EXPORTER unset and an
// OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) set. The
// OTel specification's default exporter is otlp; the relay exports nothing unless configured,
// so that a relay without a collector does not retry sends to localhost:4318 forever. protocol
// is the OTLP protocol (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or OTEL_EXPORTER_OTLP_PROTOCOL):
// http/protobuf (the default) or grpc. Values the relay cannot honour (another exporter,
// http/json) are an error.
func Configured(env func(string) (string, bool)) (on bool, protocol string, err error) {
	get := func(k string) string { v, _ := env(k); return strings.TrimSpace(v) }
	if strings.EqualFold(get("OTEL_SDK_DISABLED"), "true") {
		return false, "", nil
	}
	if exp := get("OTEL_TRACES_EXPORTER"); exp == "" {
		on = get("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != ""
	} else {
		for _, x := range strings.Split(exp, ",") {
			switch strings.TrimSpace(x) {
			case "otlp":
				on = true
			case "none":
			default:
				return false, "", fmt.Errorf("OTEL_TRACES_EXPORTER=%s: the relay exports traces over OTLP only: set otlp (or none)", exp)
			}
		}
	}
	if !on {
		return false, "", nil
	}
	protocol = get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
	if protocol == "" {
		protocol = get("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	switch protocol {
	case "", "http/protobuf":
		return true, "http/protobuf", nil
	case "grpc":
		return true, protocol, nil
	}
	return false, "", fmt.Errorf("OTLP protocol %s: the relay exports traces with http/protobuf (the default; the collector's port 4318) or grpc (port 4317)", protocol)
}

// Tracer makes the spans. It implements sink.Tracer; Decoding and Start are called by the
// publishing goroutine, the functions Start returns from the sink's ack loop.
type Tracer struct {
	tracer trace.Tracer
	name   string // span name: "send <stream>"
	stream attribute.KeyValue
	// decodeStart: when the message being handled started decoding (Decoding); zero: none.
	// Shared with the tracers ForStream makes: the relay marks decoding on one of them.
	decodeStart *time.Time
}

// Setup returns the relay's tracer for events published to stream, or nil when the OTEL_*
// variables do not ask for traces (Configured). exporter replaces the OTLP exporter (tests);
// nil: OTLP, configured by the OTEL_EXPORTER_OTLP_* variables. OTEL_SERVICE_NAME and
// OTEL_RESOURCE_ATTRIBUTES describe the relay (service.name defaults to outbox-relay),
// OTEL_TRACES_SAMPLER(_ARG) and OTEL_BSP_* apply as the SDK reads them. shutdown exports what
// is buffered (within ctx) and stops the provider; it is a no-op when tracing is off.
func Setup(ctx context.Context, env func(string) (string, bool), stream string, exporter sdktrace.SpanExporter, log zerolog.Logger) (t *Tracer, shutdown func(context.Context) error, err error) {
	shutdown = func(context.Context) error { return nil }
	on, protocol, err := Configured(env)
	if err != nil || !on {
		return nil, shutdown, err
	}
	if exporter == nil {
		// The exporters read the OTEL_EXPORTER_OTLP_* variables themselves and connect lazily.
		if protocol == "grpc" {
			exporter, err = otlptracegrpc.New(ctx)
		} else {
			exporter, err = otlptracehttp.New(ctx)
		}
		if err != nil {
			return nil, shutdown, fmt.Errorf("OTLP trace exporter (%s): %w", protocol, err)
		}
	}
	res, err := resource.New(ctx,
		resource.WithAttributes(attribute.String("service.name", "outbox-relay")),
		resource.WithFromEnv(), resource.WithTelemetrySDK())
	if err != nil {
		// A malformed OTEL_RESOURCE_ATTRIBUTES: the resource holds what could be read.
		log.Warn().Err(err).Msg("tracing: OTEL_RESOURCE_ATTRIBUTES or OTEL_SERVICE_NAME could not be read entirely")
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exporter), sdktrace.WithResource(res))
	// Export failures (collector unreachable) are the SDK's to report: into the relay's log.
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
		log.Warn().Err(err).Msg("tracing: OpenTelemetry SDK error")
	}))
	log.Info().Str("stream", stream).Str("protocol", protocol).Msg("tracing: recording a span per published event, exported over OTLP")
	return &Tracer{
		tracer:      tp.Tracer("github.com/outbox-relay/outbox-relay"),
		name:        "send " + stream,
		stream:      attribute.String(AttrStream, stream),
		decodeStart: new(time.Time),
	}, tp.Shutdown, nil
}

// ForStream is t for the events published to another stream (a table of its own stream): its
// spans are named after that stream and carry it. It shares t's exporter and decoding mark, and
// is used on the same goroutine.
func (t *Tracer) ForStream(stream string) sink.Tracer {
	c := *t
	c.name, c.stream = "send "+stream, attribute.String(AttrStream, stream)
	return &c
}

// Decoding marks the start of the decoding of a WAL message: the span of the event it yields
// (if any) starts here.
func (t *Tracer) Decoding() { *t.decodeStart = time.Now() }

// Start starts ev's span and returns what ends it once the stream stored the event (see
// sink.Tracer); nil when the sampler does not record it. The parent is the trace context of
// ev's headers (traceparent, tracestate); an event without one gets a root span.
func (t *Tracer) Start(ev *decoder.Event) func(seq uint64, duplicate bool) {
	start := *t.decodeStart
	if start.IsZero() {
		start = time.Now()
	}
	*t.decodeStart = time.Time{}
	parent := propagation.TraceContext{}.Extract(context.Background(), headerCarrier(ev.Headers))
	_, span := t.tracer.Start(parent, t.name, trace.WithSpanKind(trace.SpanKindProducer), trace.WithTimestamp(start))
	if !span.IsRecording() {
		return nil
	}
	span.SetAttributes(
		attribute.String("messaging.system", "nats"),
		attribute.String("messaging.operation.type", "send"),
		attribute.String("messaging.destination.name", string(ev.Subject)),
		attribute.String("messaging.message.id", string(ev.ID)),
		t.stream,
		attribute.String(AttrCommitLSN, ev.CommitLSN.String()),
		attribute.Int(AttrTxIndex, ev.TxIndex),
	)
	return func(seq uint64, duplicate bool) {
		if seq != 0 {
			span.SetAttributes(attribute.Int64(AttrStreamSequence, int64(seq)))
		}
		if duplicate {
			span.SetAttributes(attribute.Bool(AttrDuplicate, true))
		}
		span.End()
	}
}

// headerCarrier reads trace context from an event's headers column (keys case-insensitive,
// as HTTP header names are).
type headerCarrier []decoder.Header

func (h headerCarrier) Get(key string) string {
	for _, kv := range h {
		if strings.EqualFold(kv.Key, key) {
			return kv.Value
		}
	}
	return ""
}

func (h headerCarrier) Set(string, string) {}

func (h headerCarrier) Keys() []string {
	keys := make([]string, len(h))
	for i, kv := range h {
		keys[i] = kv.Key
	}
	return keys
}
