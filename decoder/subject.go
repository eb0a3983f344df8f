package decoder

// NATS subject tokens may not contain '.', '*', '>', whitespace or control characters, and may
// not be empty (https://docs.nats.io/nats-concepts/subjects#characters-allowed-and-recommended-for-subject-names).
// Column values are made into valid tokens deterministically:
//
//   - each forbidden byte (space, tab and every other ASCII control character, DEL, '.', '*',
//     '>') becomes '_';
//   - an empty value becomes a single '_'.
//
// Everything else, UTF-8 included, is kept as is. Two values that differ only in forbidden
// characters map to the same token; the original values travel unchanged in the
// Outbox-Aggregate-Type and Outbox-Event-Type headers.

// tokenByte reports whether b may appear in a subject token.
func tokenByte(b byte) bool {
	return b > ' ' && b != 0x7f && b != '.' && b != '*' && b != '>'
}

// AppendToken appends the sanitized form of v to dst.
func AppendToken(dst, v []byte) []byte {
	if len(v) == 0 {
		return append(dst, '_')
	}
	for _, b := range v {
		if !tokenByte(b) {
			b = '_'
		}
		dst = append(dst, b)
	}
	return dst
}

// SanitizeToken returns v as a valid subject token.
func SanitizeToken(v string) string { return string(AppendToken(nil, []byte(v))) }

// AppendSubject appends <prefix>.<aggregateType>.<eventType> to dst. The prefix is used as
// given (it may hold several tokens, e.g. "acme.outbox"); it is validated at start-up.
func AppendSubject(dst []byte, prefix string, aggregateType, eventType []byte) []byte {
	dst = append(dst, prefix...)
	dst = append(dst, '.')
	dst = AppendToken(dst, aggregateType)
	dst = append(dst, '.')
	return AppendToken(dst, eventType)
}

// ValidPrefix reports whether p is a usable subject prefix: one or more valid, non-wildcard
// tokens separated by single dots.
func ValidPrefix(p string) bool {
	if p == "" {
		return false
	}
	start := 0
	for i := 0; i <= len(p); i++ {
		if i == len(p) || p[i] == '.' {
			if i == start {
				return false
			}
			start = i + 1
			continue
		}
		if !tokenByte(p[i]) {
			return false
		}
	}
	return true
}
