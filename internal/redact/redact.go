// Package redact keeps secrets (passwords, tokens) out of what the relay prints.
//
// Two layers: URL rewrites a Postgres URL or key/value DSN, or a (list of) NATS URL(s), for
// display, structurally; Secrets extracts the secret values of such a string so that Text (and
// a Writer around stdout/stderr) can replace them wherever else they appear, e.g. inside an
// error of a library that echoes the connection string.
package redact

import (
	"encoding/json"
	"net/url"
	"sort"
	"strconv"
	"strings"
)

// Mask replaces every secret.
const Mask = "xxxxx"

// MinLen is the length under which a secret is not searched for in free text (Text, Writer):
// replacing every "a" of a log would ruin it. URL still masks secrets of any length.
const MinLen = 4

// pgKeys are the libpq parameters holding a secret.
var pgKeys = map[string]bool{"password": true, "sslpassword": true}

// URL returns s with its secrets replaced by Mask: the password of user:password@, a NATS
// token (nats://token@host, token@host), password= and sslpassword= in a Postgres URL's query
// or a key/value DSN (spaces around '=' and quoted values included), in every element of a
// comma-separated NATS URL list.
func URL(s string) string {
	if isPostgresURL(s) {
		return pgURL(s)
	}
	if !strings.Contains(s, "://") {
		// A key/value DSN, or NATS URLs without a scheme (a token may hold '='): mask the
		// DSN's secret keys, then, in a string without spaces, the credentials of URLs.
		s = dsn(s, nil)
		if strings.ContainsAny(strings.TrimSpace(s), " \t\n\r") {
			return s
		}
	}
	parts := strings.Split(s, ",")
	for i, p := range parts {
		parts[i] = natsURL(p, nil)
	}
	return strings.Join(parts, ",")
}

// Secrets returns the secret values s holds (see URL), each raw and percent-decoded.
func Secrets(s string) []string {
	var out []string
	add := func(v string) {
		if v == "" {
			return
		}
		out = append(out, v)
		if d, err := url.PathUnescape(v); err == nil && d != v {
			out = append(out, d)
		}
		if d, err := url.QueryUnescape(v); err == nil && d != v {
			out = append(out, d)
		}
	}
	if isPostgresURL(s) {
		pgURLSecrets(s, add)
		return out
	}
	if !strings.Contains(s, "://") {
		dsn(s, add)
		if strings.ContainsAny(strings.TrimSpace(s), " \t\n\r") {
			return out
		}
	}
	for _, p := range strings.Split(s, ",") {
		natsURL(p, add)
	}
	return out
}

func isPostgresURL(s string) bool {
	l := strings.ToLower(strings.TrimSpace(s))
	return strings.HasPrefix(l, "postgres://") || strings.HasPrefix(l, "postgresql://")
}

// userinfoEnd returns the index in rest (a URL after its scheme) of the '@' that ends the
// userinfo, or -1. A password may hold '@', '/', '?' and ',' (unencoded, the way people write
// them): the userinfo ends at the last '@'. An '@' in a query value then over-masks the host,
// which is better than showing part of a password.
func userinfoEnd(rest string) int { return strings.LastIndexByte(rest, '@') }

func splitScheme(s string) (scheme, rest string) {
	if i := strings.Index(s, "://"); i >= 0 {
		return s[:i+3], s[i+3:]
	}
	return "", s
}

// pgURL masks the userinfo password and the password/sslpassword query values.
func pgURL(s string) string {
	scheme, rest := splitScheme(s)
	var b strings.Builder
	b.WriteString(scheme)
	if at := userinfoEnd(rest); at >= 0 {
		user, _, hasPW := strings.Cut(rest[:at], ":")
		b.WriteString(user)
		if hasPW {
			b.WriteString(":" + Mask)
		}
		rest = rest[at:]
	}
	q := strings.IndexByte(rest, '?')
	if q < 0 {
		b.WriteString(rest)
		return b.String()
	}
	b.WriteString(rest[:q+1])
	params := strings.Split(rest[q+1:], "&")
	for i, p := range params {
		k, _, hasV := strings.Cut(p, "=")
		if dk, err := url.QueryUnescape(k); hasV && (err == nil && pgKeys[strings.ToLower(dk)] || pgKeys[strings.ToLower(k)]) {
			params[i] = k + "=" + Mask
		}
	}
	b.WriteString(strings.Join(params, "&"))
	return b.String()
}

func pgURLSecrets(s string, add func(string)) {
	_, rest := splitScheme(s)
	if at := userinfoEnd(rest); at >= 0 {
		if _, pw, ok := strings.Cut(rest[:at], ":"); ok {
			add(pw)
		}
		rest = rest[at:]
	}
	if q := strings.IndexByte(rest, '?'); q >= 0 {
		for _, p := range strings.Split(rest[q+1:], "&") {
			k, v, _ := strings.Cut(p, "=")
			if dk, err := url.QueryUnescape(k); err == nil && pgKeys[strings.ToLower(dk)] || pgKeys[strings.ToLower(k)] {
				add(v)
			}
		}
	}
}

// dsn masks (or, with add, collects) the values of the secret keys of a libpq key/value
// string: key = value, with optional spaces around '=', and a value either unquoted (up to
// the next space) or single-quoted with backslash escapes.
func dsn(s string, add func(string)) string {
	var b strings.Builder
	i := 0
	for i < len(s) {
		// Copy spaces.
		j := i
		for j < len(s) && isSpace(s[j]) {
			j++
		}
		b.WriteString(s[i:j])
		i = j
		// Key.
		for j < len(s) && !isSpace(s[j]) && s[j] != '=' {
			j++
		}
		key := s[i:j]
		// Spaces and '='.
		k := j
		for k < len(s) && isSpace(s[k]) {
			k++
		}
		if k >= len(s) || s[k] != '=' {
			// Not key=value: copy the word and go on.
			b.WriteString(s[i:j])
			i = j
			continue
		}
		k++
		for k < len(s) && isSpace(s[k]) {
			k++
		}
		b.WriteString(s[i:k])
		// Value.
		v := k
		var raw string
		if v < len(s) && s[v] == '\'' {
			var un strings.Builder
			for v++; v < len(s) && s[v] != '\''; v++ {
				if s[v] == '\\' && v+1 < len(s) {
					v++
				}
				un.WriteByte(s[v])
			}
			if v < len(s) {
				v++
			}
			raw = un.String()
		} else {
			for v < len(s) && !isSpace(s[v]) {
				v++
			}
			raw = s[k:v]
		}
		if pgKeys[strings.ToLower(key)] {
			b.WriteString(Mask)
			if add != nil {
				add(raw)
				add(s[k:v])
			}
		} else {
			b.WriteString(s[k:v])
		}
		i = v
	}
	return b.String()
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'
}

// natsURL masks (or, with add, collects) the credentials of one NATS URL, with or without a
// scheme: user:password@ or a token@.
func natsURL(s string, add func(string)) string {
	scheme, rest := splitScheme(s)
	at := userinfoEnd(rest)
	if at < 0 {
		return s
	}
	user, pw, hasPW := strings.Cut(rest[:at], ":")
	if add != nil {
		if hasPW {
			add(pw)
		} else {
			add(strings.TrimSpace(user))
		}
		return s
	}
	if hasPW {
		return scheme + user + ":" + Mask + rest[at:]
	}
	// A NATS URL's bare userinfo is a token; keep the leading space of a list element.
	lead := user[:len(user)-len(strings.TrimLeft(user, " \t"))]
	return scheme + lead + Mask + rest[at:]
}

// Text replaces every secret of at least MinLen bytes in text, as it is and as Go's %q and
// JSON encoders print it, by Mask.
func Text(text string, secrets []string) string {
	for _, s := range variants(secrets) {
		text = strings.ReplaceAll(text, s, Mask)
	}
	return text
}

// variants returns the searchable forms of secrets, longest first.
func variants(secrets []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, s := range secrets {
		if len(s) < MinLen {
			continue
		}
		// As it is, as %q or JSON print it, and escaped twice (a quoted error inside a JSON
		// log line), and percent-encoded.
		forms := []string{s, url.QueryEscape(s), url.PathEscape(s)}
		for _, f := range []string{s, quoteInner(s), jsonInner(s)} {
			forms = append(forms, quoteInner(f), jsonInner(f))
		}
		for _, v := range forms {
			if len(v) >= MinLen && !seen[v] {
				seen[v] = true
				out = append(out, v)
			}
		}
	}
	sort.Slice(out, func(a, b int) bool { return len(out[a]) > len(out[b]) })
	return out
}

func quoteInner(s string) string {
	q := strconv.Quote(s)
	return q[1 : len(q)-1]
}

func jsonInner(s string) string {
	j, _ := json.Marshal(s)
	return string(j[1 : len(j)-1])
}
