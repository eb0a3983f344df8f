package redact

import (
	"io"
	"slices"
	"strings"
	"sync"
)

// Set is a concurrency-safe set of secrets.
type Set struct {
	mu       sync.RWMutex
	secrets  []string
	searched []string // variants(secrets)
}

// Add adds secrets (values shorter than MinLen are kept out of free-text search).
func (s *Set) Add(secrets ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	added := false
	for _, v := range secrets {
		if v != "" && !slices.Contains(s.secrets, v) {
			s.secrets = append(s.secrets, v)
			added = true
		}
	}
	if added {
		s.searched = variants(s.secrets)
	}
}

// AddURL adds the secrets of a URL, DSN or NATS URL list (see Secrets).
func (s *Set) AddURL(u string) { s.Add(Secrets(u)...) }

// Text is Text(text, the set's secrets).
func (s *Set) Text(text string) string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if len(s.searched) == 0 {
		return text
	}
	for _, v := range s.searched {
		text = strings.ReplaceAll(text, v, Mask)
	}
	return text
}

// Writer writes to w with the set's secrets masked. Each Write is masked on its own: the
// relay's loggers write a whole line per call.
type Writer struct {
	W   io.Writer
	Set *Set
}

func (w Writer) Write(p []byte) (int, error) {
	out := w.Set.Text(string(p))
	if _, err := io.WriteString(w.W, out); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Error wraps err so that its message has the set's secrets masked; errors.Is and errors.As
// still see err.
func (s *Set) Error(err error) error {
	if err == nil {
		return nil
	}
	return maskedError{msg: s.Text(err.Error()), err: err}
}

type maskedError struct {
	msg string
	err error
}

func (e maskedError) Error() string { return e.msg }
func (e maskedError) Unwrap() error { return e.err }

// Echoed masks, in err's message, connString (a URL, DSN or NATS URL list) and each element of
// a list, wherever a library echoed it (as it is, %q-quoted or JSON-escaped), by its URL form,
// then every secret it holds. errors.Is and errors.As still see err.
func Echoed(err error, connString string) error {
	if err == nil {
		return nil
	}
	text := err.Error()
	cands := []string{connString}
	if !isPostgresURL(connString) && !strings.ContainsAny(strings.TrimSpace(connString), " \t\n\r") {
		for _, p := range strings.Split(connString, ",") {
			cands = append(cands, strings.TrimSpace(p))
		}
	}
	for _, c := range cands {
		if c == "" {
			continue
		}
		m := URL(c)
		if m == c {
			continue
		}
		for _, form := range []func(string) string{func(s string) string { return s }, quoteInner, jsonInner} {
			text = strings.ReplaceAll(text, form(c), form(m))
		}
	}
	return maskedError{msg: Text(text, Secrets(connString)), err: err}
}
