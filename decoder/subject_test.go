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
