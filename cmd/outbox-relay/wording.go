package main

import (
	"errors"
	"io"
	"sort"
	"strings"

	"github.com/outbox-relay/outbox-relay/relay"
)

// configFlags maps the relay.Config (and relay.PruneOptions) fields, as the library's errors and
// logs name them, to the commands' flags.
var configFlags = map[string]string{
	"Config.PGURL":                 "--pg-url",
	"Config.NATSURL":               "--nats-url",
	"Config.Table":                 "--table",
	"Config.Tables":                "--table",
	"Config.Publication":           "--publication",
	"Config.Slot":                  "--slot",
	"Config.CreateSlot":            "--create-slot",
	"Config.AcceptSlotGap":         "--accept-slot-gap",
	"Config.SyncStandbySlot":       "--sync-standby-slot",
	"Config.PositionBucket":        "--position-bucket",
	"Config.TemporarySlot":         "--temporary-slot",
	"Config.Standby":               "--standby",
	"Config.StartLSN":              "--start-lsn",
	"Config.Columns":               "--column-*",
	"Config.Columns.ID":            "--column-id",
	"Config.Columns.AggregateType": "--column-aggregate-type",
	"Config.Columns.AggregateID":   "--column-aggregate-id",
	"Config.Columns.EventType":     "--column-event-type",
	"Config.Columns.Payload":       "--column-payload",
	"Config.Columns.CreatedAt":     "--column-created-at",
	"Config.Columns.Headers":       "--column-headers",
	"Config.SubjectTemplate":       "--subject-template",
	"Config.Source":                "--source",
	"Config.MessagePrefix":         "--message-prefix",
	"Config.OnPoison":              "--on-poison",
	"Config.Sink.Stream":           "--stream",
	"Config.Sink.SubjectPrefix":    "--subject-prefix",
	"Config.Sink.Window":           "--max-in-flight",
	"Config.Sink.MaxInFlightBytes": "--max-in-flight-bytes",
	"Config.Sink.Publish":          "--publish",
	"Config.Sink.Replicas":         "--stream-replicas",
	"Config.HTTPAddr":              "--http-addr",
	"Config.StallTimeout":          "--stall-timeout",
	"Config.DrainTimeout":          "--drain-timeout",
	// slot's
	"SlotOptions.Force":        "--force",
	"SlotOptions.ForceTimeout": "--force-timeout",
	// prune's
	"PruneOptions.OlderThan":       "--older-than",
	"PruneOptions.Batch":           "--batch",
	"PruneOptions.SkipSourceCheck": "--skip-source-check",
}

// flagWording rewrites Config field names to flag names, longest name first (Config.Slot must
// not eat the start of Config.SlotPollInterval).
var flagWording = func() *strings.Replacer {
	names := make([]string, 0, len(configFlags))
	for name := range configFlags {
		names = append(names, name)
	}
	sort.Slice(names, func(i, j int) bool { return len(names[i]) > len(names[j]) })
	pairs := make([]string, 0, 2*len(names))
	for _, name := range names {
		pairs = append(pairs, name, configFlags[name])
	}
	return strings.NewReplacer(pairs...)
}()

// cliError words a library error for the command line: Config fields become flags, and an
// invalid Config is a usage error (exit 2).
func cliError(err error) error {
	if err == nil {
		return nil
	}
	if relay.IsConfigError(err) && !errors.As(err, new(usageError)) {
		err = usageError{err}
	}
	if msg := err.Error(); flagWording.Replace(msg) != msg {
		return wordedError{err}
	}
	return err
}

type wordedError struct{ error }

func (e wordedError) Error() string { return flagWording.Replace(e.error.Error()) }
func (e wordedError) Unwrap() error { return e.error }

// wordedOutput rewrites the Config fields in what the relay logs to w (one log event per
// Write) to flags.
type wordedOutput struct{ w io.Writer }

func (o wordedOutput) Write(p []byte) (int, error) {
	if _, err := io.WriteString(o.w, flagWording.Replace(string(p))); err != nil {
		return 0, err
	}
	return len(p), nil
}
