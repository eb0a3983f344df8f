package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/internal/redact"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
)

type runConfig struct {
	pgURL, natsURL             string
	schema, table              string
	publication, slot          string
	createSlot                 bool
	acceptSlotGap              bool   // --accept-slot-gap
	syncStandbySlot            string // --sync-standby-slot: publish only what this physical standby flushed
	positionBucket             string // --position-bucket; "" disables the position record
	temporarySlot, standby     bool
	startLSN                   pglogrepl.LSN
	columns                    decoder.Columns
	subject                    *decoder.SubjectTemplate
	httpAddr                   string
	stallTimeout               time.Duration
	slotPollInterval           time.Duration
	standbyPoll                time.Duration // how often a standby tries to take the slot
	obs                        *observer     // metrics, readiness, stall detection
	sink                       sink.Config
	repl                       replication.Config
	drainTimeout               time.Duration
	reconnectMin, reconnectMax time.Duration
	failpoint                  string
	embedded                   embeddedNATS
	source                     string // "table" or "messages"
	messagePrefix              string // messages: the pg_logical_emit_message prefix
	onPoison                   string
	// natsOpts: the --nats-* authentication and TLS options, for every NATS connection.
	natsOpts []nats.Option
}

func cmdRun(ctx context.Context, args []string, stderr io.Writer, env func(string) (string, bool)) error {
	fs := newFlagSet("run", "Relay every row inserted into the outbox table to NATS JetStream.", stderr)
	var (
		cfg             runConfig
		lf              logFlags
		table, template string
		startLSN        string
		auth            natsAuth
	)
	fs.StringVar(&cfg.pgURL, "pg-url", "", "Postgres connection URL or DSN (required); the relay adds replication=database for its replication connection")
	fs.StringVar(&cfg.natsURL, "nats-url", nats.DefaultURL, "NATS server URL(s), comma separated")
	auth.register(fs)
	fs.StringVar(&table, "table", "public.outbox", "outbox table, schema.table")
	fs.StringVar(&cfg.publication, "publication", "outbox_pub", "publication of the outbox table's inserts")
	fs.StringVar(&cfg.slot, "slot", "outbox_relay", "logical replication slot (pgoutput)")
	fs.BoolVar(&cfg.createSlot, "create-slot", false, "create the slot if it does not exist")
	fs.BoolVar(&cfg.acceptSlotGap, "accept-slot-gap", false, "start although the slot was dropped and recreated, advanced by someone else, or belongs to another cluster than the position this relay recorded, the database's WAL history forked (restore, point-in-time recovery, failover to a lagging standby), or the stream lost acknowledged messages (events in between are not relayed: republish them with outbox-relay backfill)")
	fs.StringVar(&cfg.syncStandbySlot, "sync-standby-slot", "", "physical replication slot of a standby: publish a transaction only once that standby has flushed its commit, so a failover to it never un-commits an event consumers saw (Postgres 15/16; adds a standby round trip to each transaction's latency; publishing pauses while the standby is away)")
	fs.StringVar(&cfg.positionBucket, "position-bucket", sink.DefaultPositionBucket, "JetStream key-value bucket where the relay records the position it confirms, to detect slot gaps; '' turns the detection off")
	fs.BoolVar(&cfg.temporarySlot, "temporary-slot", false, "use a temporary slot that lives only while the relay is connected (development: events committed while it is not connected are never relayed)")
	fs.BoolVar(&cfg.standby, "standby", false, "when another relay holds the slot, wait and take over once it is released (active/passive HA)")
	fs.StringVar(&startLSN, "start-lsn", "", "start at this WAL position (X/Y) instead of the slot's confirmed_flush_lsn; refused if behind it; events committed before it are skipped")
	fs.StringVar(&cfg.sink.Stream, "stream", sink.DefaultStream, "JetStream stream; created with subjects <subject-prefix>.> if missing")
	fs.StringVar(&cfg.sink.SubjectPrefix, "subject-prefix", sink.DefaultSubjectPrefix, "first token(s) of every subject: <prefix>.<aggregate_type>.<event_type>")
	fs.StringVar(&template, "subject-template", decoder.DefaultSubjectTemplate, "subject of each event; placeholders {prefix}, {aggregate_type}, {aggregate_id}, {event_type} (values sanitized as tokens)")
	registerColumnFlags(fs, &cfg.columns)
	fs.DurationVar(&cfg.sink.DuplicateWindow, "duplicate-window", sink.DefaultDuplicateWindow, "duplicate window of a stream the relay creates")
	fs.IntVar(&cfg.sink.Replicas, "stream-replicas", 0, "replicas of a stream the relay creates (default: 3 on a NATS cluster of 3 or more servers, else 1)")
	fs.IntVar(&cfg.sink.Window, "max-in-flight", sink.DefaultWindow, "events published and not yet acknowledged by JetStream, at most")
	fs.Int64Var(&cfg.sink.MaxInFlightBytes, "max-in-flight-bytes", sink.DefaultMaxInFlightBytes, "bytes of messages (payload, subject, headers) published and not yet acknowledged, at most; an event larger than this is sent alone")
	fs.DurationVar(&cfg.sink.AckTimeout, "ack-timeout", sink.DefaultAckTimeout, "a publish not acknowledged after this long is re-published")
	fs.DurationVar(&cfg.repl.StatusInterval, "status-interval", replication.DefaultStatusInterval, "longest time between two standby status updates to Postgres")
	fs.DurationVar(&cfg.repl.IdleTimeout, "pg-idle-timeout", replication.DefaultIdleTimeout, "no message from Postgres for this long while reading: probe the connection, and reconnect if another period passes silently")
	fs.StringVar(&cfg.onPoison, "on-poison", "stop", "an outbox row that cannot be published (NULL/empty id, bad headers JSON, a header key NATS refuses or a Nats-Schedule header, too big, rejected by the stream): stop (halt, confirm nothing after it) or dead-letter (publish it, or its metadata, to <subject-prefix>.dead-letter and go on)")
	fs.DurationVar(&cfg.drainTimeout, "drain-timeout", 10*time.Second, "on SIGINT/SIGTERM, how long to wait for in-flight acks before the final status update")
	fs.StringVar(&cfg.source, "source", "table", "where events come from: table (rows inserted into --table) or messages (pg_logical_emit_message, table-less)")
	fs.StringVar(&cfg.messagePrefix, "message-prefix", "outbox", "with --source messages: prefix of the transactional logical decoding messages that are events")
	fs.BoolVar(&cfg.embedded.enabled, "embedded-nats", false, "run a NATS JetStream server inside the relay (development, demo) instead of connecting to --nats-url")
	fs.StringVar(&cfg.embedded.dir, "embedded-nats-dir", "", "JetStream store directory of the embedded server (default: a temporary directory deleted at exit)")
	fs.StringVar(&cfg.embedded.listen, "embedded-nats-listen", "127.0.0.1:4222", "host:port the embedded server listens on (port 0: a free port)")
	headers := fs.String("headers", "outbox", "message headers: outbox (Nats-Msg-Id, Outbox-*, the headers column) or cloudevents (the same plus CloudEvents binary-mode ce-* headers)")
	fs.StringVar(&cfg.sink.CloudEventsSource, "cloudevents-source", sink.DefaultCloudEventsSource, "with --headers cloudevents: the ce-source attribute")
	fs.StringVar(&cfg.httpAddr, "http-addr", ":"+defaultHTTPPort, `address serving /metrics, /healthz and /readyz (no authentication: bind it to 127.0.0.1 or the pod IP where you can); "" or "off" disables it`)
	fs.DurationVar(&cfg.stallTimeout, "stall-timeout", 60*time.Second, "events pending with nothing acknowledged (or no replication session) for this long turns /readyz to 503 and logs what is stuck; 0 disables")
	lf.register(fs)
	log, err := parseCommand(fs, args, env, &lf, stderr, &cfg.pgURL)
	if err != nil {
		return err
	}
	if cfg.schema, cfg.table, err = splitTable(table); err != nil {
		return usageError{err}
	}
	if !decoder.ValidPrefix(cfg.sink.SubjectPrefix) {
		return usageError{fmt.Errorf("--subject-prefix %q is not a valid NATS subject prefix (tokens separated by dots, no spaces, '*' or '>')", cfg.sink.SubjectPrefix)}
	}
	if cfg.subject, err = subjectTemplate(template, &cfg.sink); err != nil {
		return err
	}
	if err := checkColumns(cfg.columns); err != nil {
		return usageError{err}
	}
	if cfg.startLSN, err = parseStartLSN(startLSN); err != nil {
		return usageError{err}
	}
	if cfg.temporarySlot && cfg.standby {
		return usageError{fmt.Errorf("--temporary-slot and --standby exclude each other: a temporary slot belongs to one relay's connection and cannot be taken over")}
	}
	switch cfg.onPoison {
	case "stop":
	case "dead-letter":
		cfg.sink.DeadLetter = true
	default:
		return usageError{fmt.Errorf("--on-poison must be stop or dead-letter, not %q", cfg.onPoison)}
	}
	if cfg.sink.Window < 1 {
		return usageError{fmt.Errorf("--max-in-flight must be at least 1")}
	}
	if cfg.sink.MaxInFlightBytes < 1 {
		return usageError{fmt.Errorf("--max-in-flight-bytes must be at least 1")}
	}
	switch *headers {
	case "outbox":
	case "cloudevents":
		cfg.sink.CloudEvents = true
	default:
		return usageError{fmt.Errorf("--headers %q: use outbox or cloudevents", *headers)}
	}
	switch cfg.source {
	case "table":
		cfg.messagePrefix = ""
	case "messages":
		if cfg.messagePrefix == "" {
			return usageError{fmt.Errorf("--message-prefix must not be empty with --source messages")}
		}
		cfg.repl.Messages = true
	default:
		return usageError{fmt.Errorf("--source %q: use table or messages", cfg.source)}
	}
	cfg.repl.Slot, cfg.repl.Publication = cfg.slot, cfg.publication
	cfg.reconnectMin, cfg.reconnectMax = 200*time.Millisecond, 15*time.Second
	cfg.slotPollInterval = 10 * time.Second
	cfg.standbyPoll = time.Second
	cfg.failpoint, _ = env("OUTBOX_RELAY_FAILPOINT")
	if cfg.embedded.enabled && auth.set() {
		return usageError{fmt.Errorf("the --nats-creds/--nats-nkey/--nats-user/--nats-password(-file)/--nats-token(-file)/--nats-tls-* flags apply to a server at --nats-url; --embedded-nats runs without authentication or TLS: drop one or the other")}
	}
	if cfg.natsOpts, err = auth.options(cfg.natsURL); err != nil {
		return usageError{err}
	}
	if cfg.embedded.enabled {
		url, stop, err := cfg.embedded.start(log)
		if err != nil {
			return err
		}
		defer stop()
		cfg.natsURL = url
	}
	return relay(ctx, cfg, log)
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

func checkColumns(c decoder.Columns) error {
	for flag, v := range map[string]string{"column-id": c.ID, "column-aggregate-type": c.AggregateType,
		"column-aggregate-id": c.AggregateID, "column-event-type": c.EventType, "column-payload": c.Payload} {
		if v == "" {
			return fmt.Errorf("--%s must name a column", flag)
		}
	}
	return nil
}

// fatalError marks errors that reconnecting cannot fix.
type fatalError struct{ error }

func (e fatalError) Unwrap() error { return e.error }

func isFatal(err error) bool {
	var f fatalError
	return errors.As(err, &f) ||
		errors.Is(err, replication.ErrSlotInvalidated) ||
		errors.Is(err, replication.ErrPublicationMissing) ||
		errors.Is(err, replication.ErrSlotMissing) ||
		errors.Is(err, decoder.ErrPoison) ||
		errors.Is(err, sink.ErrPoison)
}

// relay runs sessions until ctx ends or a fatal error; each session reconnects to Postgres and
// resumes from the highest position confirmed so far.
func relay(ctx context.Context, cfg runConfig, log zerolog.Logger) error {
	log = log.With().Str("slot", cfg.slot).Logger()
	obs := newObserver(cfg.sink.Stream, log)
	cfg.obs = obs
	var httpLn net.Listener
	if cfg.httpAddr != "" && cfg.httpAddr != "off" {
		// Bound first: a taken port must stop the relay before it creates a slot.
		ln, err := listenHTTP(cfg.httpAddr)
		if err != nil {
			return err
		}
		httpLn = ln
		defer func() {
			if httpLn != nil {
				httpLn.Close()
			}
		}()
	}
	b, err := preflight(ctx, cfg, log,
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn().Err(err).Msg("disconnected from NATS; reconnecting")
			}
		}),
		nats.ReconnectHandler(func(c *nats.Conn) {
			// Not ConnectedUrlRedacted: it shows a token (nats://token@host).
			log.Info().Str("url", redact.URL(c.ConnectedUrl())).Msg("reconnected to NATS")
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			// Asynchronous errors: permission violations, slow consumers (a reply dropped:
			// its publish times out and is re-published).
			ev := log.Warn().Err(err)
			if sub != nil {
				ev = ev.Str("subscription", sub.Subject)
			}
			ev.Msg("NATS reported an error")
		}))
	if err != nil {
		return err
	}
	defer b.nc.Close()
	js := b.js
	obs.nc.Store(b.nc)
	if httpLn != nil {
		stopHTTP := obs.serveHTTP(httpLn)
		httpLn = nil // closed by stopHTTP
		defer stopHTTP()
	}
	wctx, stopWatch := context.WithCancel(ctx)
	watched := make(chan struct{})
	go func() { defer close(watched); obs.watch(wctx, cfg) }()
	defer func() { stopWatch(); <-watched }()

	// An operator-chosen start (--start-lsn, checked by preflight) is where the first session
	// starts unless the slot is already further.
	resume := resumePoint{lsn: cfg.startLSN}
	if resume.lsn != 0 {
		log.Warn().Stringer("lsn", resume).Msg("--start-lsn: events committed between the slot's confirmed position and this one are skipped")
	}
	wait := cfg.reconnectMin
	var standbySince, standbyLogged time.Time
	for {
		started := time.Now()
		err := session(ctx, cfg, js, &resume, log)
		if ctx.Err() != nil {
			if err != nil && !errors.Is(err, context.Canceled) {
				log.Warn().Err(err).Msg("error during shutdown")
			}
			log.Info().Stringer("lsn", resume).Msg("stopped")
			return nil
		}
		if err == nil {
			err = errors.New("replication session ended")
		}
		if isFatal(err) {
			return err
		}
		if cfg.standby && errors.Is(err, replication.ErrSlotInUse) {
			// Another relay holds the slot: poll until it is released, logging once a minute.
			obs.standingBy.Store(true)
			if standbySince.IsZero() {
				standbySince = time.Now()
			}
			if time.Since(standbyLogged) >= time.Minute {
				standbyLogged = time.Now()
				log.Info().Dur("waiting", time.Since(standbySince).Round(time.Second)).
					Msg("standing by: another relay holds the slot; taking over when it is released")
			}
			select {
			case <-time.After(cfg.standbyPoll):
			case <-ctx.Done():
				return nil
			}
			continue
		}
		if !standbySince.IsZero() {
			standbySince, standbyLogged = time.Time{}, time.Time{}
			obs.standingBy.Store(false)
		}
		obs.reconnected()
		if time.Since(started) > time.Minute {
			wait = cfg.reconnectMin
		}
		log.Warn().Err(err).Stringer("lsn", resume).Dur("retry_in", wait).Msg("replication interrupted; reconnecting")
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return nil
		}
		if wait *= 2; wait > cfg.reconnectMax {
			wait = cfg.reconnectMax
		}
	}
}
