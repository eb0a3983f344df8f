package sink

import (
	"testing"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/decoder"
)

func testEvent() *decoder.Event {
	return &decoder.Event{
		ID:            []byte("0b5a4c1e-0000-4000-8000-000000000001"),
		AggregateType: []byte("order"),
		AggregateID:   []byte("12345"),
		EventType:     []byte("OrderCreated"),
		Subject:       []byte("outbox.order.OrderCreated"),
		Payload:       []byte(`{"total": 10}`),
		CreatedAt:     []byte("2026-11-26T13:50:57.123456Z"),
		Headers:       []decoder.Header{{Key: "traceparent", Value: "00-abc-01"}, {Key: "Nats-Rollup", Value: "all"}, {Key: HeaderCommitLSN, Value: "forged"}},
		CommitLSN:     pglogrepl.LSN(0x16_B374D848),
		TxIndex:       42,
	}
}

func TestBuildMsg_HeadersAndCopies(t *testing.T) {
	j := NewPublisher(nil, Config{Stream: "S"}, nil, zerologNop())
	ev := testEvent()
	e := &entry{}
	size := j.msgs.build(e, ev)
	require.Equal(t, nats.Header{
		HeaderMsgID:         {"0b5a4c1e-0000-4000-8000-000000000001"},
		HeaderAggregateType: {"order"},
		HeaderAggregateID:   {"12345"},
		HeaderEventType:     {"OrderCreated"},
		HeaderCreatedAt:     {"2026-11-26T13:50:57.123456Z"},
		HeaderCommitLSN:     {ev.CommitLSN.String()},
		HeaderTxIndex:       {"42"},
		"traceparent":       {"00-abc-01"},
	}, e.msg.Header)
	require.Equal(t, "16/B374D848", e.msg.Header.Get(HeaderCommitLSN))
	require.Equal(t, "outbox.order.OrderCreated", e.msg.Subject)
	require.Equal(t, `{"total": 10}`, string(e.msg.Data))
	require.Equal(t, "0b5a4c1e-0000-4000-8000-000000000001", e.id)
	want := 12 + len(e.msg.Data) + len(e.msg.Subject)
	for k, vs := range e.msg.Header {
		want += len(k) + len(vs[0]) + 4
	}
	require.Equal(t, want, size)

	// The message owns its bytes: the decoder reuses its buffers for the next event.
	for _, b := range [][]byte{ev.ID, ev.Payload, ev.Subject, ev.AggregateID} {
		for i := range b {
			b[i] = 'X'
		}
	}
	ev.CreatedAt = nil
	e2 := &entry{}
	j.msgs.build(e2, ev)
	require.Equal(t, "0b5a4c1e-0000-4000-8000-000000000001", e.msg.Header.Get(HeaderMsgID))
	require.Equal(t, `{"total": 10}`, string(e.msg.Data))
	require.Equal(t, "outbox.order.OrderCreated", e.msg.Subject)
	require.Equal(t, "12345", e.msg.Header.Get(HeaderAggregateID))
	require.NotContains(t, e2.msg.Header, HeaderCreatedAt, "no created_at, no header")
	require.Equal(t, "XXXXXXXXXXXXXXXXXXXXXXXXX", e2.msg.Subject)
}

// Without headers-column entries build leaves the header map out (send fills a reused one
// from e.vals); header() and send build the same headers as the map path.
func TestBuildMsg_RelayHeadersOnlyHaveNoMapUntilNeeded(t *testing.T) {
	j := NewPublisher(nil, Config{Stream: "S"}, nil, zerologNop())
	ev := testEvent()
	ev.Headers = []decoder.Header{{Key: "Nats-Rollup", Value: "all"}} // reserved: skipped
	e := &entry{}
	size := j.msgs.build(e, ev)
	require.Nil(t, e.msg.Header)
	want := nats.Header{
		HeaderMsgID:         {"0b5a4c1e-0000-4000-8000-000000000001"},
		HeaderAggregateType: {"order"},
		HeaderAggregateID:   {"12345"},
		HeaderEventType:     {"OrderCreated"},
		HeaderCreatedAt:     {"2026-11-26T13:50:57.123456Z"},
		HeaderCommitLSN:     {"16/B374D848"},
		HeaderTxIndex:       {"42"},
	}
	sent := nats.Header{"Stale": {"from the previous message"}}
	clear(sent)
	e.setRelayHeaders(sent)
	require.Equal(t, want, sent, "what send publishes")
	require.Equal(t, want, e.header(), "the map built when one is needed")
	require.Equal(t, msgSize(&e.msg), size)

	ev.CreatedAt = nil
	e2 := &entry{}
	j.msgs.build(e2, ev)
	require.NotContains(t, e2.header(), HeaderCreatedAt)
}

func TestAppendLSN(t *testing.T) {
	for _, lsn := range []pglogrepl.LSN{0, 1, 0xF, 0x16_B374D848, 0xFFFFFFFF_FFFFFFFF, 0x1_00000000} {
		require.Equal(t, lsn.String(), string(appendLSN(nil, lsn)))
	}
}

// BenchmarkBuildMsg reports the sink's allocations per event before the nats.go publish.
func BenchmarkBuildMsg(b *testing.B) {
	j := NewPublisher(nil, Config{Stream: "S"}, nil, zerologNop())
	ev := testEvent()
	ev.Headers = nil
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		j.msgs.build(&entry{}, ev)
	}
}

func zerologNop() zerolog.Logger { return zerolog.Nop() }
