package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/internal/tracing"
	"github.com/outbox-relay/outbox-relay/relay"
)

// runFlags are the run command's flags that are not Config fields as they are.
type runFlags struct {
	tables                      *tableFlag
	template, startLSN, headers string
	auth                        natsAuth
	embedded                    embeddedNATS
}

// spanExporter replaces the OTLP exporter of the relay's spans (tests); nil: OTLP.
var spanExporter sdktrace.SpanExporter

func cmdRun(ctx context.Context, args []string, stderr io.Writer, env func(string) (string, bool)) error {
	fs := newFlagSet("run", "Relay every row inserted into the outbox table to NATS JetStream.", stderr)
	d := relay.DefaultConfig()
	cfg := d
	var (
		lf logFlags
		f  runFlags
	)
	fs.StringVar(&cfg.PGURL, "pg-url", d.PGURL, "Postgres connection URL or DSN (required); the relay adds replication=database for its replication connection")
	fs.StringVar(&cfg.NATSURL, "nats-url", d.NATSURL, "NATS server URL(s), comma separated")
	f.auth.register(fs)
	f.tables = newTableFlag(d.Schema + "." + d.Table)
	fs.Var(f.tables, "table", "outbox table, schema.table; give it once per table to relay several from the one slot and publication, in commit order (the config file's table list may give each its own columns, subject template: see docs/cli.md)")
	fs.StringVar(&cfg.Publication, "publication", d.Publication, "publication of the outbox table's inserts")
	fs.StringVar(&cfg.Slot, "slot", d.Slot, "logical replication slot (pgoutput)")
	fs.BoolVar(&cfg.CreateSlot, "create-slot", false, "create the slot if it does not exist")
	fs.BoolVar(&cfg.AcceptSlotGap, "accept-slot-gap", false, "start although the slot was dropped and recreated, advanced by someone else, or belongs to another cluster than the position this relay recorded, the database's WAL history forked (restore, point-in-time recovery, failover to a lagging standby), or the stream lost acknowledged messages (events in between are not relayed: republish them with outbox-relay backfill)")
	fs.StringVar(&cfg.SyncStandbySlot, "sync-standby-slot", "", "physical replication slot of a standby: publish a transaction only once that standby has flushed its commit, so a failover to it never un-commits an event consumers saw (Postgres 15/16; adds a standby round trip to each transaction's latency; publishing pauses while the standby is away)")
	fs.StringVar(&cfg.PositionBucket, "position-bucket", d.PositionBucket, "JetStream key-value bucket where the relay records the position it confirms, to detect slot gaps; '' turns the detection off")
	fs.BoolVar(&cfg.TemporarySlot, "temporary-slot", false, "use a temporary slot that lives only while the relay is connected (development: events committed while it is not connected are never relayed)")
	fs.BoolVar(&cfg.Standby, "standby", false, "when another relay holds the slot, wait and take over once it is released (active/passive HA)")
	fs.StringVar(&f.startLSN, "start-lsn", "", "start at this WAL position (X/Y) instead of the slot's confirmed_flush_lsn; refused if behind it; events committed before it are skipped")
	fs.StringVar(&cfg.Sink.Stream, "stream", d.Sink.Stream, "JetStream stream; created with subjects <subject-prefix>.> if missing")
	fs.StringVar(&cfg.Sink.SubjectPrefix, "subject-prefix", d.Sink.SubjectPrefix, "first token(s) of every subject: <prefix>.<aggregate_type>.<event_type>")
	fs.StringVar(&f.template, "subject-template", d.SubjectTemplate, "subject of each event; placeholders {prefix}, {aggregate_type}, {aggregate_id}, {event_type} (values sanitized as tokens)")
	registerColumnFlags(fs, &cfg.Columns)
	fs.DurationVar(&cfg.Sink.DuplicateWindow, "duplicate-window", d.Sink.DuplicateWindow, "duplicate window of a stream the relay creates")
	fs.IntVar(&cfg.Sink.Replicas, "stream-replicas", d.Sink.Replicas, "replicas of a stream the relay creates (default: 3 on a NATS cluster of 3 or more servers, else 1)")
	fs.IntVar(&cfg.Sink.Window, "max-in-flight", d.Sink.Window, "events published and not yet acknowledged by JetStream, at most")
	fs.Int64Var(&cfg.Sink.MaxInFlightBytes, "max-in-flight-bytes", d.Sink.MaxInFlightBytes, "bytes of messages (payload, subject, headers) published and not yet acknowledged, at most; an event larger than this is sent alone")
	fs.DurationVar(&cfg.Sink.AckTimeout, "ack-timeout", d.Sink.AckTimeout, "a publish not acknowledged after this long is re-published")
	fs.DurationVar(&cfg.Replication.StatusInterval, "status-interval", d.Replication.StatusInterval, "longest time between two standby status updates to Postgres")
	fs.DurationVar(&cfg.Replication.IdleTimeout, "pg-idle-timeout", d.Replication.IdleTimeout, "no message from Postgres for this long while reading: probe the connection, and reconnect if another period passes silently")
	fs.StringVar((*string)(&cfg.Sink.Publish), "publish", "single", "how events are published: single (each event its own publish and ack), atomic (each Postgres transaction one JetStream atomic batch, stored whole or not at all; the stream needs allow_atomic, nats-server 2.12+; transactions over 1,000 events or --max-in-flight are split into consecutive batches) or fast (one long-lived JetStream fast-ingest batch, confirmed by its flow acks; the stream needs allow_batched, nats-server 2.14+)")
	fs.StringVar(&cfg.OnPoison, "on-poison", d.OnPoison, "an outbox row that cannot be published (NULL/empty id, bad headers JSON, a header key NATS refuses or a Nats-Schedule header, too big, rejected by the stream): stop (halt, confirm nothing after it) or dead-letter (publish it, or its metadata, to <subject-prefix>.dead-letter and go on)")
	fs.DurationVar(&cfg.DrainTimeout, "drain-timeout", d.DrainTimeout, "on SIGINT/SIGTERM, how long to wait for in-flight acks before the final status update")
	fs.StringVar(&cfg.Source, "source", d.Source, "where events come from: table (rows inserted into --table) or messages (pg_logical_emit_message, table-less)")
	fs.StringVar(&cfg.MessagePrefix, "message-prefix", d.MessagePrefix, "with --source messages: prefix of the transactional logical decoding messages that are events")
	fs.BoolVar(&f.embedded.enabled, "embedded-nats", false, "run a NATS JetStream server inside the relay (development, demo) instead of connecting to --nats-url")
	fs.StringVar(&f.embedded.dir, "embedded-nats-dir", "", "JetStream store directory of the embedded server (default: a temporary directory deleted at exit)")
	fs.StringVar(&f.embedded.listen, "embedded-nats-listen", "127.0.0.1:4222", "host:port the embedded server listens on (port 0: a free port)")
	fs.StringVar(&f.headers, "headers", "outbox", "message headers: outbox (Nats-Msg-Id, Outbox-*, the headers column) or cloudevents (the same plus CloudEvents binary-mode ce-* headers)")
	fs.StringVar(&cfg.Sink.CloudEventsSource, "cloudevents-source", d.Sink.CloudEventsSource, "with --headers cloudevents: the ce-source attribute")
	fs.StringVar(&cfg.HTTPAddr, "http-addr", d.HTTPAddr, `address serving /metrics, /healthz and /readyz (no authentication: bind it to 127.0.0.1 or the pod IP where you can); "" or "off" disables it`)
	fs.DurationVar(&cfg.StallTimeout, "stall-timeout", d.StallTimeout, "events pending with nothing acknowledged (or no replication session) for this long turns /readyz to 503 and logs what is stuck; 0 disables")
	lf.register(fs)
	log, err := parseCommand(fs, args, env, &lf, stderr, &cfg.PGURL)
	if err != nil {
		return err
	}
	cfg.SubjectTemplate = f.template
	if err := f.tables.apply(&cfg, "run"); err != nil {
		return usageError{err}
	}
	if cfg.StartLSN, err = parseStartLSN(f.startLSN); err != nil {
		return usageError{err}
	}
	switch f.headers {
	case "outbox":
	case "cloudevents":
		cfg.Sink.CloudEvents = true
	default:
		return usageError{fmt.Errorf("--headers %q: use outbox or cloudevents", f.headers)}
	}
	cfg.Failpoint, _ = env("OUTBOX_RELAY_FAILPOINT")
	if err := cfg.Validate(); err != nil {
		return err
	}
	if f.embedded.enabled && f.auth.set() {
		return usageError{fmt.Errorf("the --nats-creds/--nats-nkey/--nats-user/--nats-password(-file)/--nats-token(-file)/--nats-tls-* flags apply to a server at --nats-url; --embedded-nats runs without authentication or TLS: drop one or the other")}
	}
	if cfg.NATSOptions, err = f.auth.options(cfg.NATSURL); err != nil {
		return usageError{err}
	}
	tracer, stopTracing, err := tracing.Setup(ctx, env, cfg.Sink.Stream, spanExporter, log)
	if err != nil {
		return usageError{err}
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := stopTracing(sctx); err != nil {
			log.Warn().Err(err).Msg("tracing: spans not exported at exit")
		}
	}()
	if tracer != nil {
		cfg.Sink.Tracer = tracer
	}
	if f.embedded.enabled {
		url, stop, err := f.embedded.start(log)
		if err != nil {
			return err
		}
		defer stop()
		cfg.NATSURL = url
	}
	return relay.Run(ctx, cfg, relay.WithLogger(log), relay.WithNATSConnectHint(natsConnectHint))
}

// registerColumnFlags adds the --column-* flags mapping the table's columns to the event.
func registerColumnFlags(fs *flag.FlagSet, c *decoder.Columns) {
	d := decoder.DefaultColumns
	fs.StringVar(&c.ID, "column-id", d.ID, "column holding the event id (Nats-Msg-Id)")
	fs.StringVar(&c.AggregateType, "column-aggregate-type", d.AggregateType, "column holding the aggregate type")
	fs.StringVar(&c.AggregateID, "column-aggregate-id", d.AggregateID, "column holding the aggregate id")
	fs.StringVar(&c.EventType, "column-event-type", d.EventType, "column holding the event type")
	fs.StringVar(&c.Payload, "column-payload", d.Payload, "column holding the message body: text, json, jsonb or bytea")
	fs.StringVar(&c.Headers, "column-headers", d.Headers, "JSON object column whose string entries become message headers; empty: none")
	fs.StringVar(&c.CreatedAt, "column-created-at", d.CreatedAt, "timestamp column sent as Outbox-Created-At; empty: none")
}
