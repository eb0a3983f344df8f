package main

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/internal/tracing"
	"github.com/outbox-relay/outbox-relay/sink"
)

// keptSpans is the SDK's in-memory exporter without the reset its Shutdown does: the relay
// shuts its tracer provider down when it stops, before the test reads the spans.
type keptSpans struct{ *tracetest.InMemoryExporter }

func (keptSpans) Shutdown(context.Context) error { return nil }

// recordSpans makes the relays of this test export their spans into memory (the OTEL_*
// variables still decide whether there are any).
func recordSpans(t *testing.T) *tracetest.InMemoryExporter {
	exp := tracetest.NewInMemoryExporter()
	spanExporter = keptSpans{exp}
	t.Cleanup(func() { spanExporter = nil })
	return exp
}

// envOf returns an environment holding only kv (key, value, key, value, ...).
func envOf(kv ...string) func(string) (string, bool) {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

// insertTraced commits, in one transaction, an event carrying the producer's trace context and
// one without; it returns the producer's trace and span ids.
func insertTraced(t *testing.T, e *env) (trace.TraceID, trace.SpanID) {
	t.Helper()
	tid, err := trace.TraceIDFromHex("4bf92f3577b34da6a3ce929d0e0e4736")
	require.NoError(t, err)
	sid, err := trace.SpanIDFromHex("00f067aa0ba902b7")
	require.NoError(t, err)
	e.pg.Exec(t, `BEGIN;
		INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers)
		VALUES ('00000000-0000-4000-8000-0000000000a1', 'order', '1', 'OrderCreated', '{}',
			'{"traceparent": "00-`+tid.String()+`-`+sid.String()+`-01", "tracestate": "vendor=x"}');
		INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
		VALUES ('00000000-0000-4000-8000-0000000000a2', 'order', '1', 'OrderPaid', '{}');
		COMMIT;`)
	return tid, sid
}

func TestTracing_SpanPerEventChildOfProducerTrace(t *testing.T) {
	e := newEnv(t)
	exp := recordSpans(t)
	stop, _ := inProcessEnv(t, e.args(), envOf("OTEL_TRACES_EXPORTER", "otlp"))
	waitStreaming(t, e.pg, "outbox_relay")
	before := time.Now()
	tid, sid := insertTraced(t, e)
	waitStream(t, e.nats.URL, 2, 30*time.Second)
	require.NoError(t, stop()) // exports the spans
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	require.Len(t, recs, 2)

	spans := exp.GetSpans()
	require.Len(t, spans, 2, "one span per published event")
	byID := map[string]tracetest.SpanStub{}
	for _, s := range spans {
		byID[attr(s, "messaging.message.id").AsString()] = s
	}
	for _, r := range recs {
		id := r.Header.Get(sink.HeaderMsgID)
		s, ok := byID[id]
		require.True(t, ok, "no span for event %s", id)
		require.Equal(t, "send "+sink.DefaultStream, s.Name)
		require.Equal(t, trace.SpanKindProducer, s.SpanKind)
		require.Equal(t, int64(r.Seq), attr(s, tracing.AttrStreamSequence).AsInt64(), "the message's stream sequence")
		require.Equal(t, r.Subject, attr(s, "messaging.destination.name").AsString())
		require.Equal(t, r.Header.Get(sink.HeaderCommitLSN), attr(s, tracing.AttrCommitLSN).AsString())
		require.Equal(t, sink.DefaultStream, attr(s, tracing.AttrStream).AsString())
		require.True(t, before.Before(s.StartTime), "starts at decoding, after the insert began")
		require.True(t, s.StartTime.Before(s.EndTime))
		require.False(t, s.EndTime.Before(r.Time), "ends (%s) after the stream stored the message (%s)", s.EndTime, r.Time)
		require.Equal(t, "outbox-relay", resourceAttr(s, "service.name"))
	}
	traced, root := byID["00000000-0000-4000-8000-0000000000a1"], byID["00000000-0000-4000-8000-0000000000a2"]
	require.Equal(t, tid, traced.SpanContext.TraceID(), "in the producer's trace")
	require.Equal(t, tid, traced.Parent.TraceID())
	require.Equal(t, sid, traced.Parent.SpanID(), "child of the producer's span")
	require.True(t, traced.Parent.IsRemote())
	require.Equal(t, "vendor=x", traced.SpanContext.TraceState().String())
	require.False(t, root.Parent.IsValid(), "an event without traceparent gets a root span")
	require.NotEqual(t, tid, root.SpanContext.TraceID())
}

func TestTracing_OffWithoutOTELConfiguration(t *testing.T) {
	// The table of OTEL_* settings: TestConfigured in internal/tracing.
	e := newEnv(t)
	exp := recordSpans(t)
	stop, _ := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertTraced(t, e)
	waitStream(t, e.nats.URL, 2, 30*time.Second)
	require.NoError(t, stop())
	require.Len(t, readStream(t, e.nats.URL, sink.DefaultStream), 2)
	require.Empty(t, exp.GetSpans(), "no spans without OTEL_* configuration")
}

func attr(s tracetest.SpanStub, key string) attribute.Value {
	for _, kv := range s.Attributes {
		if string(kv.Key) == key {
			return kv.Value
		}
	}
	return attribute.Value{}
}

func resourceAttr(s tracetest.SpanStub, key string) string {
	v, _ := s.Resource.Set().Value(attribute.Key(key))
	return v.AsString()
}

// A table of its own stream: its events' spans name that stream, the others' the relay's.
func TestTracing_SpanNamesTheEventsStream(t *testing.T) {
	e := newTwoTables(t)
	exp := recordSpans(t)
	stop, _ := inProcessEnv(t, e.args("--config", streamsConfig(t)), envOf("OTEL_TRACES_EXPORTER", "otlp"))
	waitStreaming(t, e.pg, "outbox_relay")
	want := writeBoth(t, e, 3)
	orders, invoices := splitSent(want)
	waitStream(t, e.nats.URL, uint64(len(orders)), 30*time.Second)
	waitStreamOf(t, e.nats.URL, billingStream, uint64(len(invoices)), 30*time.Second)
	require.NoError(t, stop()) // exports the spans

	streamOf := map[string]string{}
	for _, s := range orders {
		streamOf[s.id] = sink.DefaultStream
	}
	for _, s := range invoices {
		streamOf[s.id] = billingStream
	}
	spans := exp.GetSpans()
	require.Len(t, spans, len(want), "one span per published event")
	for _, s := range spans {
		id := attr(s, "messaging.message.id").AsString()
		stream, ok := streamOf[id]
		require.True(t, ok, "a span for event %s, which was not written", id)
		require.Equal(t, "send "+stream, s.Name, "event %s", id)
		require.Equal(t, stream, attr(s, tracing.AttrStream).AsString(), "event %s", id)
		require.NotZero(t, attr(s, tracing.AttrStreamSequence).AsInt64(), "event %s", id)
	}
}
