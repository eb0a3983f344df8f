package sink

import (
	"encoding/json"
	"errors"
	"testing"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"
)

func TestParsePubAck(t *testing.T) {
	for _, c := range []struct {
		in      string
		stream  string
		dup     bool
		errCode jetstream.ErrorCode // an *APIError with this code
		invalid bool                // jetstream.ErrInvalidJSAck
	}{
		{in: `{"stream":"OUTBOX","seq":1}`, stream: "OUTBOX"},
		{in: `{"stream":"OUTBOX","seq":18446744073709551615,"duplicate":true}`, stream: "OUTBOX", dup: true},
		{in: `{"stream":"OUTBOX","domain":"hub","seq":7,"duplicate":false}`, stream: "OUTBOX"},
		{in: ` { "seq" : 7 , "stream" : "S" , "duplicate" : true } `, stream: "S", dup: true},
		{in: `{"stream":"S","seq":3,"batch":"b1","count":2,"val":null}`, stream: "S"},
		{in: `{"stream":"A","Stream":"B","DUPLICATE":true}`, stream: "B", dup: true},
		{in: `{"stream":"S\u0031","seq":1}`, stream: "S1"}, // escaped: encoding/json
		{in: `{"error":{"code":400,"err_code":10070,"description":"wrong last msg ID: x"},"stream":"S","seq":0}`, errCode: 10070},
		{in: `{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"}}`, errCode: jetstream.JSErrCodeStreamMessageExceedsMaximum},
		{in: `{"error":{"code":503,"err_code":10077,"description":"resource limits exceeded for account"}}`, errCode: 10077},
		{in: `{"seq":1}`, invalid: true},
		{in: `{"stream":"","seq":1}`, invalid: true},
		{in: `{}`, invalid: true},
		{in: ``, invalid: true},
		{in: `{"stream":"S"`, invalid: true},
		{in: `{"stream":"S",}`, invalid: true},
		{in: `{"stream":"S"} x`, invalid: true},
		{in: `{"stream":"S","duplicate":trueish}`, invalid: true},
		{in: `["stream","S"]`, invalid: true},
	} {
		stream, dup, err := parsePubAck([]byte(c.in))
		switch {
		case c.invalid:
			require.ErrorIs(t, err, jetstream.ErrInvalidJSAck, c.in)
		case c.errCode != 0:
			var apiErr *jetstream.APIError
			require.True(t, errors.As(err, &apiErr), "%s: %v", c.in, err)
			require.Equal(t, c.errCode, apiErr.ErrorCode, c.in)
		default:
			require.NoError(t, err, c.in)
			require.Equal(t, c.stream, string(stream), c.in)
			require.Equal(t, c.dup, dup, c.in)
		}
	}
}

// The hand-written scanner agrees with encoding/json (the reference nats.go uses) on every
// input it accepts.
func FuzzScanPubAck(f *testing.F) {
	for _, s := range []string{`{"stream":"OUTBOX","seq":1}`, `{"stream":"S","seq":2,"duplicate":true}`, `{"error":{"code":1}}`, ` {"domain":"d","stream":"x","seq":-1e3} `} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		stream, dup, ok := scanPubAck(b)
		if !ok {
			return
		}
		var r struct {
			Stream    string `json:"stream"`
			Duplicate bool   `json:"duplicate"`
		}
		require.NoError(t, json.Unmarshal(b, &r), "%q", b)
		require.Equal(t, r.Stream, string(stream), "%q", b)
		require.Equal(t, r.Duplicate, dup, "%q", b)
	})
}

func BenchmarkParsePubAck(b *testing.B) {
	ack := []byte(`{"stream":"OUTBOX","seq":123456,"duplicate":true}`)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if _, _, err := parsePubAck(ack); err != nil {
			b.Fatal(err)
		}
	}
}

func TestPubAckSeq(t *testing.T) {
	for in, seq := range map[string]uint64{
		`{"stream":"OUTBOX","seq":1}`:                                     1,
		`{"stream":"OUTBOX","seq":18446744073709551615,"duplicate":true}`: 18446744073709551615,
		` { "seq" : 7 , "stream" : "S" } `:                                7,
		`{"stream":"S\"seq\":9","seq":3}`:                                 3, // an escaped quote in a string
		`{"stream":"S"}`:                                                  0,
	} {
		require.Equal(t, seq, pubAckSeq([]byte(in)), in)
	}
}
