package sink

import (
	"bytes"
	"encoding/json"

	"github.com/nats-io/nats.go/jetstream"
)

// parsePubAck reads JetStream's reply to a publish: {"stream":"S","seq":N} with
// "duplicate":true for a message already stored (and "domain" in a domain), or
// {"error":{"code":..,"err_code":..,"description":".."}} when it was not stored. stream points
// into b. err is a *jetstream.APIError for an error reply, as PublishMsgAsync reports it, or
// jetstream.ErrInvalidJSAck for anything else that is not an ack.
//
// Acks are flat objects of strings, numbers and booleans; those are scanned by hand. Anything
// else (an error reply, an escaped string) goes through encoding/json.
func parsePubAck(b []byte) (stream []byte, dup bool, err error) {
	if stream, dup, ok := scanPubAck(b); ok {
		return stream, dup, nil
	}
	var r struct {
		Error     *jetstream.APIError `json:"error"`
		Stream    string              `json:"stream"`
		Duplicate bool                `json:"duplicate"`
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, false, jetstream.ErrInvalidJSAck
	}
	if r.Error != nil {
		return nil, false, r.Error
	}
	if r.Stream == "" {
		return nil, false, jetstream.ErrInvalidJSAck
	}
	return []byte(r.Stream), r.Duplicate, nil
}

// scanPubAck reads a flat JSON object with a non-empty "stream" string; ok is false for
// anything else (nested values, escapes, malformed input), which parsePubAck hands to
// encoding/json.
func scanPubAck(b []byte) (stream []byte, dup, ok bool) {
	i := skipSpace(b, 0)
	if i == len(b) || b[i] != '{' {
		return nil, false, false
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return nil, false, false // {}: no stream
	}
	for {
		var key []byte
		if key, i, ok = scanString(b, i); !ok {
			return nil, false, false
		}
		if i = skipSpace(b, i); i == len(b) || b[i] != ':' {
			return nil, false, false
		}
		if i = skipSpace(b, i+1); i == len(b) {
			return nil, false, false
		}
		switch c := b[i]; {
		case c == '"':
			var v []byte
			if v, i, ok = scanString(b, i); !ok {
				return nil, false, false
			}
			if bytes.EqualFold(key, []byte("stream")) { // keys match case-insensitively, as in encoding/json
				stream = v
			}
		case c == 't' && hasWord(b[i:], "true"):
			if bytes.EqualFold(key, []byte("duplicate")) {
				dup = true
			}
			i += 4
		case c == 'f' && hasWord(b[i:], "false"):
			if bytes.EqualFold(key, []byte("duplicate")) {
				dup = false
			}
			i += 5
		case c == 'n' && hasWord(b[i:], "null"):
			i += 4
		case c == '-' || c >= '0' && c <= '9':
			for i < len(b) && (b[i] >= '0' && b[i] <= '9' || b[i] == '-' || b[i] == '+' || b[i] == '.' || b[i] == 'e' || b[i] == 'E') {
				i++
			}
		default: // an object or array ("error"), or malformed
			return nil, false, false
		}
		if i = skipSpace(b, i); i == len(b) {
			return nil, false, false
		}
		if b[i] == ',' {
			i = skipSpace(b, i+1)
			continue
		}
		if b[i] != '}' || skipSpace(b, i+1) != len(b) {
			return nil, false, false
		}
		return stream, dup, len(stream) > 0
	}
}

// scanString reads the JSON string starting at b[i] ('"'); strings with escapes are left to
// encoding/json (ok false).
func scanString(b []byte, i int) (s []byte, next int, ok bool) {
	if i >= len(b) || b[i] != '"' {
		return nil, i, false
	}
	for j := i + 1; j < len(b); j++ {
		switch b[j] {
		case '"':
			return b[i+1 : j], j + 1, true
		case '\\':
			return nil, i, false
		}
		if b[j] < 0x20 {
			return nil, i, false
		}
	}
	return nil, i, false
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// hasWord reports whether b starts with the literal w followed by a delimiter.
func hasWord(b []byte, w string) bool {
	if len(b) < len(w) || string(b[:len(w)]) != w {
		return false
	}
	if len(b) == len(w) {
		return true
	}
	switch b[len(w)] {
	case ',', '}', ' ', '\t', '\n', '\r':
		return true
	}
	return false
}

// pubAckSeq returns the "seq" of an ack parsePubAck accepted (the stream sequence of the
// message, or of the stored copy for a duplicate); 0 if it has none.
func pubAckSeq(b []byte) uint64 {
	// "seq": cannot occur inside a string of the ack: a quote there is escaped.
	i := bytes.Index(b, []byte(`"seq"`))
	if i < 0 {
		return 0
	}
	i = skipSpace(b, i+len(`"seq"`))
	if i == len(b) || b[i] != ':' {
		return 0
	}
	i = skipSpace(b, i+1)
	var seq uint64
	for ; i < len(b) && b[i] >= '0' && b[i] <= '9'; i++ {
		seq = seq*10 + uint64(b[i]-'0')
	}
	return seq
}
