package decoder_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/decoder"
)

func TestSanitizeToken(t *testing.T) {
	for in, want := range map[string]string{
		"Order":         "Order",
		"order.created": "order_created",
		"a b\tc":        "a_b_c",
		"*":             "_",
		">":             "_",
		"":              "_",
		"x\x00y\x7fz":   "x_y_z",
		"été-ü":         "été-ü",
		"a/b:c$d":       "a/b:c$d",
	} {
		require.Equal(t, want, decoder.SanitizeToken(in), "input %q", in)
	}
}

func TestValidPrefix(t *testing.T) {
	for p, ok := range map[string]bool{"outbox": true, "acme.outbox": true, "": false, ".a": false, "a.": false, "a..b": false, "a.*": false, "a.>": false, "a b": false} {
		require.Equal(t, ok, decoder.ValidPrefix(p), p)
	}
}

func TestSubjectTemplate(t *testing.T) {
	ev := &decoder.Event{AggregateType: []byte("Order Line"), AggregateID: []byte("42.7"), EventType: []byte("Shipped")}
	for _, c := range []struct{ tmpl, subject, prefix string }{
		{decoder.DefaultSubjectTemplate, "acme.outbox.Order_Line.Shipped", "acme.outbox"},
		{"{prefix}.{aggregate_type}.{aggregate_id}.{event_type}", "acme.outbox.Order_Line.42_7.Shipped", "acme.outbox"},
		{"events.{event_type}-v1.{aggregate_id}", "events.Shipped-v1.42_7", "events"},
		{"ev.orders-{event_type}", "ev.orders-Shipped", "ev"},
		{"ev.static.subject", "ev.static.subject", "ev.static"},
	} {
		tmpl, err := decoder.ParseSubjectTemplate(c.tmpl, "acme.outbox")
		require.NoError(t, err, c.tmpl)
		require.Equal(t, c.subject, string(tmpl.Append(nil, ev)), c.tmpl)
		require.Equal(t, c.prefix, tmpl.Prefix(), c.tmpl)
	}
	for tmpl, msg := range map[string]string{
		"{prefix}.{nope}":         "unknown placeholder {nope}",
		"{prefix}.{event_type":    "unclosed",
		"{aggregate_type}.x":      "must start with at least one literal token",
		"{prefix}..{event_type}":  "valid NATS subject",
		"{prefix}.*.{event_type}": "valid NATS subject",
		"{prefix}.a b":            "valid NATS subject",
		"{prefix}.{event_type}.":  "valid NATS subject",
	} {
		_, err := decoder.ParseSubjectTemplate(tmpl, "outbox")
		require.ErrorContains(t, err, msg, tmpl)
	}
}

func TestSubjectTemplateAppendDoesNotAllocate(t *testing.T) {
	tmpl, err := decoder.ParseSubjectTemplate("{prefix}.{aggregate_type}.{aggregate_id}.{event_type}", "outbox")
	require.NoError(t, err)
	ev := &decoder.Event{AggregateType: []byte("order"), AggregateID: []byte("42"), EventType: []byte("Created")}
	buf := make([]byte, 0, 128)
	allocs := testing.AllocsPerRun(1000, func() { buf = tmpl.Append(buf[:0], ev) })
	require.Zero(t, allocs)
	require.Equal(t, "outbox.order.42.Created", string(buf))
}
