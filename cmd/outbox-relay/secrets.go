package main

import (
	"flag"
	"io"
	"os"

	"github.com/outbox-relay/outbox-relay/internal/redact"
)

// printedSecrets holds every secret the command was given (passwords and tokens in --pg-url
// and --nats-url, --nats-password, --nats-token, the secret files, PGPASSWORD). Whatever the
// relay writes to stdout and stderr, and the error it exits with, has them masked: the second
// line of defence behind printing URLs with redact.URL, for errors of client libraries that
// echo a connection string.
var printedSecrets redact.Set

// secretURLFlags and secretFlags are the flags whose values hold secrets.
var (
	secretURLFlags = []string{"pg-url", "nats-url"}
	secretFlags    = []string{"nats-password", "nats-token"}
)

// registerSecrets adds the secrets of fs's flags (as parsed so far) to printedSecrets.
func registerSecrets(fs *flag.FlagSet) {
	for _, name := range secretURLFlags {
		if f := fs.Lookup(name); f != nil {
			printedSecrets.AddURL(f.Value.String())
		}
	}
	for _, name := range secretFlags {
		if f := fs.Lookup(name); f != nil && f.Value.String() != "" {
			printedSecrets.Add(f.Value.String())
		}
	}
	if pw := os.Getenv("PGPASSWORD"); pw != "" {
		printedSecrets.Add(pw)
	}
}

// maskedOutput wraps w so that the registered secrets never reach it.
func maskedOutput(w io.Writer) io.Writer {
	if _, ok := w.(redact.Writer); ok {
		return w
	}
	return redact.Writer{W: w, Set: &printedSecrets}
}
