package decoder_test

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/decoder"
)

// message builds a pgoutput Message (protocol 1): flags, lsn, prefix, length, content.
func message(transactional bool, prefix, content string) []byte {
	var flags byte
	if transactional {
		flags = 1
	}
	return append(msg{'M'}.u8(flags).u64(0x1000).str(prefix).u32(uint32(len(content))), content...)
}

const emitted = `{"id": "01a21836-b13e-7549-ab20-95e21f09e7d5", "headers": {"n": 1, "traceparent": "00-aa-bb-01"}, "payload": {"total": 10}, "event_type": "OrderCreated", "created_at": "2026-11-26T14:16:15.123456+01:00", "aggregate_id": "42", "aggregate_type": "order"}`

func TestDecode_TransactionalMessageWithPrefixIsAnEvent(t *testing.T) {
	d := decoder.New(decoder.Config{MessagePrefix: "outbox"})
	_, err := d.Decode(begin(0x500))
	require.NoError(t, err)
	ch, err := d.Decode(message(true, "outbox", emitted))
	require.NoError(t, err)
	require.Equal(t, decoder.Insert, ch.Kind)
	ev := ch.Event
	require.Equal(t, "01a21836-b13e-7549-ab20-95e21f09e7d5", string(ev.ID))
	require.Equal(t, "outbox.order.OrderCreated", string(ev.Subject))
	require.Equal(t, "42", string(ev.AggregateID))
	require.Equal(t, `{"total": 10}`, string(ev.Payload), "payload bytes exactly as in the message")
	require.Equal(t, "2026-11-26T13:16:15.123456Z", string(ev.CreatedAt))
	require.Equal(t, []decoder.Header{{Key: "traceparent", Value: "00-aa-bb-01"}}, ev.Headers)
	require.EqualValues(t, 0x500, ev.CommitLSN)
	require.Equal(t, 0, ev.TxIndex)

	// Other prefixes are not events; the next event of the transaction has index 1.
	ch, err = d.Decode(message(true, "audit", emitted))
	require.NoError(t, err)
	require.Equal(t, decoder.Skip, ch.Kind)
	ch, err = d.Decode(message(true, "outbox", emitted))
	require.NoError(t, err)
	require.Equal(t, 1, ch.Event.TxIndex)
	ch, err = d.Decode(commit(0x500, 0x600))
	require.NoError(t, err)
	require.Equal(t, decoder.Commit, ch.Kind)
}

func TestDecode_NonTransactionalMessageIsNotAnEvent(t *testing.T) {
	d := decoder.New(decoder.Config{MessagePrefix: "outbox"})
	ch, err := d.Decode(message(false, "outbox", emitted))
	require.NoError(t, err)
	require.Equal(t, decoder.NonTransactional, ch.Kind)
	require.Nil(t, ch.Event)
}

func TestDecode_MessagesAreIgnoredWithoutPrefix(t *testing.T) {
	d := decoder.New(decoder.Config{})
	decodeAll(t, d, begin(0x500))
	ch, err := d.Decode(message(true, "outbox", emitted))
	require.NoError(t, err)
	require.Equal(t, decoder.Skip, ch.Kind)
	require.Equal(t, 1, d.Messages)
}

func TestDecode_MalformedMessageContentIsPoison(t *testing.T) {
	for name, content := range map[string]string{
		"not json":        `hello`,
		"no id":           `{"aggregate_type": "o", "aggregate_id": "1", "event_type": "E", "payload": {}}`,
		"no payload":      `{"id": "x", "aggregate_type": "o", "aggregate_id": "1", "event_type": "E"}`,
		"headers array":   `{"id": "x", "aggregate_type": "o", "aggregate_id": "1", "event_type": "E", "payload": {}, "headers": [1]}`,
		"bad created_at":  `{"id": "x", "aggregate_type": "o", "aggregate_id": "1", "event_type": "E", "payload": {}, "created_at": "yesterday"}`,
		"empty eventtype": `{"id": "x", "aggregate_type": "o", "aggregate_id": "1", "event_type": "", "payload": {}}`,
	} {
		d := decoder.New(decoder.Config{MessagePrefix: "outbox"})
		decodeAll(t, d, begin(0x500))
		_, err := d.Decode(message(true, "outbox", content))
		require.True(t, errors.As(err, new(*decoder.PoisonError)), "%s: %v", name, err)
	}
	// A truncated message is a protocol error, not poison.
	d := decoder.New(decoder.Config{MessagePrefix: "outbox"})
	decodeAll(t, d, begin(0x500))
	m := message(true, "outbox", emitted)
	_, err := d.Decode(m[:len(m)-3])
	require.Error(t, err)
	require.False(t, errors.As(err, new(*decoder.PoisonError)))
}

// A malformed message is a Poison change carrying what could be salvaged, for a dead-letter
// policy to publish.
func TestDecode_MalformedMessageIsAPoisonEventWithWhatCanBeSalvaged(t *testing.T) {
	for _, c := range []struct {
		name, content        string
		id, aggType, payload string
	}{
		{"not json", `hello`, "", "", `hello`},
		{"no payload", `{"id": "x", "aggregate_type": "o", "aggregate_id": "1", "event_type": "E"}`, "x", "o", `{"id": "x", "aggregate_type": "o", "aggregate_id": "1", "event_type": "E"}`},
		{"wrong type", `{"id": "x", "aggregate_type": 7, "aggregate_id": "1", "event_type": "E", "payload": {"a": 1}}`, "x", "", `{"a": 1}`},
		{"headers array", `{"id": "x", "aggregate_type": "o", "aggregate_id": "1", "event_type": "E", "payload": {"a": 1}, "headers": [1]}`, "x", "o", `{"a": 1}`},
		{"bad created_at", `{"id": "x", "aggregate_type": "o", "aggregate_id": "1", "event_type": "E", "payload": {"a": 1}, "created_at": "yesterday"}`, "x", "o", `{"a": 1}`},
	} {
		d := decoder.New(decoder.Config{MessagePrefix: "outbox"})
		decodeAll(t, d, begin(0x500))
		_, err := d.Decode(message(true, "outbox", emitted))
		require.NoError(t, err)
		ch, err := d.Decode(message(true, "outbox", c.content))
		var poison *decoder.PoisonError
		require.True(t, errors.As(err, &poison), "%s: %v", c.name, err)
		require.Equal(t, c.id, poison.ID, c.name)
		require.Equal(t, decoder.Poison, ch.Kind, c.name)
		require.NotNil(t, ch.Event, c.name)
		require.Equal(t, c.id, string(ch.Event.ID), c.name)
		require.Equal(t, c.aggType, string(ch.Event.AggregateType), c.name)
		require.Equal(t, c.payload, string(ch.Event.Payload), c.name)
		require.EqualValues(t, 0x500, ch.Event.CommitLSN, c.name)
		require.Equal(t, 1, ch.Event.TxIndex, c.name)
		// The decoder stays in step: the next message is event 2 of the transaction.
		ch, err = d.Decode(message(true, "outbox", emitted))
		require.NoError(t, err, c.name)
		require.Equal(t, 2, ch.Event.TxIndex, c.name)
	}
}
