package decoder

import "fmt"

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

// SubjectTemplate is a compiled --subject-template such as
// "{prefix}.{aggregate_type}.{aggregate_id}.{event_type}". It is parsed once into literal parts
// and placeholders, so building a subject appends bytes and allocates nothing. Every
// substituted value is sanitized with AppendToken; {prefix} is replaced by the (validated)
// subject prefix when the template is parsed.
type SubjectTemplate struct {
	parts  []templatePart
	prefix string // leading literal tokens: the stream must cover <prefix>.>
}

type templatePart struct {
	lit   string
	field templateField
}

type templateField uint8

const (
	fieldLiteral templateField = iota
	fieldAggregateType
	fieldAggregateID
	fieldEventType
)

// DefaultSubjectTemplate gives <prefix>.<aggregate_type>.<event_type>.
const DefaultSubjectTemplate = "{prefix}.{aggregate_type}.{event_type}"

// ParseSubjectTemplate compiles tmpl. Placeholders: {prefix}, {aggregate_type},
// {aggregate_id}, {event_type}. The result must be a valid subject whatever the values, and
// must start with at least one literal token (the stream is bound to it).
func ParseSubjectTemplate(tmpl, prefix string) (*SubjectTemplate, error) {
	t := &SubjectTemplate{}
	var lit []byte
	flush := func() {
		if len(lit) > 0 {
			t.parts = append(t.parts, templatePart{lit: string(lit)})
			lit = lit[:0]
		}
	}
	sample := make([]byte, 0, len(tmpl))
	for i := 0; i < len(tmpl); {
		if tmpl[i] != '{' {
			lit = append(lit, tmpl[i])
			sample = append(sample, tmpl[i])
			i++
			continue
		}
		end := -1
		for j := i + 1; j < len(tmpl); j++ {
			if tmpl[j] == '}' {
				end = j
				break
			}
		}
		if end < 0 {
			return nil, fmt.Errorf("subject template %q: unclosed '{'", tmpl)
		}
		var f templateField
		switch name := tmpl[i+1 : end]; name {
		case "prefix":
			lit = append(lit, prefix...)
			sample = append(sample, prefix...)
			i = end + 1
			continue
		case "aggregate_type":
			f = fieldAggregateType
		case "aggregate_id":
			f = fieldAggregateID
		case "event_type":
			f = fieldEventType
		default:
			return nil, fmt.Errorf("subject template %q: unknown placeholder {%s}; use {prefix}, {aggregate_type}, {aggregate_id} or {event_type}", tmpl, name)
		}
		if len(t.parts) == 0 && t.prefix == "" {
			t.prefix = leadingTokens(string(lit))
		}
		flush()
		t.parts = append(t.parts, templatePart{field: f})
		sample = append(sample, 'x')
		i = end + 1
	}
	if t.prefix == "" && len(t.parts) == 0 {
		// No placeholder at all: the stream prefix is everything but the last token.
		t.prefix = leadingTokens(string(lit))
	}
	flush()
	if !ValidPrefix(string(sample)) {
		return nil, fmt.Errorf("subject template %q does not give a valid NATS subject (tokens separated by single dots, no spaces, '*' or '>')", tmpl)
	}
	if t.prefix == "" {
		return nil, fmt.Errorf("subject template %q must start with at least one literal token followed by a dot (e.g. {prefix}.): the stream is bound to it", tmpl)
	}
	return t, nil
}

// leadingTokens returns the complete tokens of a literal (everything before its last dot).
func leadingTokens(lit string) string {
	for i := len(lit) - 1; i >= 0; i-- {
		if lit[i] == '.' {
			return lit[:i]
		}
	}
	return ""
}

// Prefix returns the template's leading literal tokens: every subject it gives matches
// <Prefix>.>.
func (t *SubjectTemplate) Prefix() string { return t.prefix }

// Append appends the subject for ev to dst.
func (t *SubjectTemplate) Append(dst []byte, ev *Event) []byte {
	for i := range t.parts {
		p := &t.parts[i]
		switch p.field {
		case fieldLiteral:
			dst = append(dst, p.lit...)
		case fieldAggregateType:
			dst = AppendToken(dst, ev.AggregateType)
		case fieldAggregateID:
			dst = AppendToken(dst, ev.AggregateID)
		case fieldEventType:
			dst = AppendToken(dst, ev.EventType)
		}
	}
	return dst
}
