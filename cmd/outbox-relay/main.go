// Command outbox-relay publishes the rows inserted into a Postgres outbox table to NATS
// JetStream, reading them from logical replication (pgoutput) and confirming the WAL position
// to Postgres only after JetStream stored every event up to it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/rs/zerolog"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() { os.Exit(realMain()) }

func realMain() int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	zerolog.ErrorFieldName = "err"
	if _, set := os.LookupEnv("GOGC"); !set {
		// The live heap is small and bounded by --max-in-flight (a few MB), while the
		// garbage per event is not: collecting at 4x the live heap instead of 2x cuts the
		// relay's CPU per event by about a fifth (bench/README.md) for a few MB of RSS.
		// GOGC in the environment still wins.
		debug.SetGCPercent(400)
	}
	stopProfiles := startProfiles(os.Getenv("OUTBOX_RELAY_CPUPROFILE"), os.Getenv("OUTBOX_RELAY_MEMPROFILE"))
	err := dispatch(ctx, os.Args[1:], os.Stdout, os.Stderr, os.LookupEnv)
	stopProfiles()
	stderr := maskedOutput(os.Stderr)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, new(usageError)):
		fmt.Fprintln(stderr, "outbox-relay:", err)
		return 2
	default:
		fmt.Fprintln(stderr, "outbox-relay:", err)
		return 1
	}
}

type usageError struct{ error }

const commands = `commands:
  run          relay outbox inserts to JetStream
  migrate      create the outbox table and its publication (idempotent)
  backfill     republish outbox rows created in a time range (after a slot gap)
  prune        delete published outbox rows older than --older-than, in batches
  slot         create, drop or list replication slots
  publication  create, drop or show the publication of a table's inserts
  version      print the version`

func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) (string, bool)) (err error) {
	// No secret reaches the output or the error (see secrets.go); the relay's errors and log
	// name flags, not Config fields (see wording.go).
	stdout, stderr = maskedOutput(stdout), wordedOutput{maskedOutput(stderr)}
	defer func() { err = printedSecrets.Error(cliError(err)) }()
	if len(args) == 0 {
		return usageError{fmt.Errorf("no command\n%s", commands)}
	}
	switch args[0] {
	case "run":
		return cmdRun(ctx, args[1:], stderr, env)
	case "migrate":
		return cmdMigrate(ctx, args[1:], stdout, stderr, env)
	case "backfill":
		return cmdBackfill(ctx, args[1:], stdout, stderr, env)
	case "prune":
		return cmdPrune(ctx, args[1:], stdout, stderr, env)
	case "publication":
		return cmdPublication(ctx, args[1:], stdout, stderr, env)
	case "slot":
		return cmdSlot(ctx, args[1:], stdout, stderr, env)
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, "outbox-relay", version)
		return nil
	case "help", "-h", "--help":
		fmt.Fprintln(stdout, commands)
		return nil
	}
	return usageError{fmt.Errorf("unknown command %q\n%s", args[0], commands)}
}
