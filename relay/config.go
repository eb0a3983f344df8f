// Package relay is the outbox relay as a library: it tails Postgres logical replication
// (pgoutput) on an outbox table and publishes each committed insert to NATS JetStream with the
// event id as Nats-Msg-Id, confirming a WAL position to Postgres only after JetStream stored
// every event up to it.
//
// Start from DefaultConfig, set the connection URLs, and call Run:
//
//	cfg := relay.DefaultConfig()
//	cfg.PGURL, cfg.NATSURL = "postgres://...", "nats://..."
//	err := relay.Run(ctx, cfg, relay.WithLogger(log))
//
// Errors name the Config fields they are about (Config.AcceptSlotGap, Config.Slot, ...); the
// outbox-relay command rewrites those names to its flags.
package relay

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
)

// DefaultHTTPPort is the default port of Config.HTTPAddr. Not 9187 (postgres_exporter's, which
// often runs on the same host or pod) nor any other port of 9100-9999, the range Prometheus
// allocates to exporters (fully allocated), nor a port of NATS (4222, 6222, 7422, 8222),
// Postgres (5432) or Kubernetes' components.
const DefaultHTTPPort = "8497"

// Source values: where events come from.
const (
	SourceTable    = "table"    // rows inserted into the outbox table
	SourceMessages = "messages" // transactional pg_logical_emit_message calls (Postgres 14+)
)

// OnPoison values: what to do with an event that cannot be published.
const (
	OnPoisonStop       = "stop"        // halt, confirm nothing after it
	OnPoisonDeadLetter = "dead-letter" // publish it (or its metadata) to <prefix>.dead-letter and go on
)

// Config is everything a relay needs. Start from DefaultConfig: the zero value of most fields
// is not a usable setting.
type Config struct {
	PGURL   string // Postgres connection URL or DSN (required); replication=database is added for the replication connection
	NATSURL string // NATS server URL(s), comma separated
	// NATSOptions apply to every NATS connection (authentication, TLS).
	NATSOptions []nats.Option

	Schema, Table string // the outbox table
	Publication   string // publication of the outbox table's inserts
	Slot          string // logical replication slot (pgoutput)
	CreateSlot    bool   // create the slot if it does not exist
	// AcceptSlotGap starts although the slot is not continuous with the position the relay
	// recorded (dropped and recreated, advanced by someone else, another cluster, a forked WAL
	// history, lost stream messages): events in between are not relayed.
	AcceptSlotGap bool
	// SyncStandbySlot is a physical slot of a standby: publish a transaction only once that
	// standby flushed its commit. "" disables.
	SyncStandbySlot string
	// PositionBucket is the JetStream key-value bucket of the position record, to detect slot
	// gaps; "" turns the detection off.
	PositionBucket string
	TemporarySlot  bool // a slot that lives only while the relay is connected (development)
	// Standby waits while another relay holds the slot and takes over once it is released.
	Standby bool
	// StartLSN starts there instead of the slot's confirmed_flush_lsn (0: the slot's).
	StartLSN pglogrepl.LSN

	// Tables are several outbox tables relayed from the one slot and publication, in commit
	// order across them; empty: the one table Schema.Table. With Tables, Schema and Table are
	// not used, and Columns and SubjectTemplate are the defaults of the tables that do not set
	// their own.
	Tables  []Table
	Columns decoder.Columns // the table's columns mapped to the event
	// SubjectTemplate is the subject of each event; placeholders {prefix}, {aggregate_type},
	// {aggregate_id}, {event_type}. Its leading literal tokens bind the relay to the stream:
	// the stream must cover <them>.>, and the position record is keyed by them.
	SubjectTemplate string
	Source          string // SourceTable or SourceMessages
	MessagePrefix   string // with SourceMessages: the prefix of the messages that are events
	OnPoison        string // OnPoisonStop or OnPoisonDeadLetter

	Sink        sink.Config        // stream, subject prefix, window, ack timeout, headers
	Replication replication.Config // status interval, idle timeout (Slot and Publication are set from the fields above)

	// HTTPAddr serves /metrics, /healthz and /readyz; "" or "off" disables.
	HTTPAddr string
	// StallTimeout: events pending with nothing acknowledged (or no replication session) for
	// this long turns /readyz to 503 and logs what is stuck; 0 disables.
	StallTimeout     time.Duration
	SlotPollInterval time.Duration // how often the slot gauges are polled
	DrainTimeout     time.Duration // on stop, how long to wait for in-flight acks
	StandbyPoll      time.Duration // how often a standby tries to take the slot
	ReconnectMin     time.Duration // first wait before reconnecting after a failed session
	ReconnectMax     time.Duration // longest wait between reconnects

	// Failpoint is a test hook ("name:N"); "" in production.
	Failpoint string

	subject    *decoder.SubjectTemplate // parsed SubjectTemplate, set by resolve
	tables     []table                  // the outbox tables (Tables, or Schema.Table), set by resolve
	feeds      []feed                   // the streams of the tables, set by resolve
	obs        *observer                // metrics, readiness, stall detection; set by Run
	natsHintFn func(error) string       // WithNATSConnectHint
}

// Table is one of several outbox tables a relay serves (Config.Tables).
type Table struct {
	Schema string // "": Config.Schema
	Name   string // the table's name (required)
	// Columns maps this table's columns to the event; the zero value: Config.Columns.
	Columns decoder.Columns
	// SubjectTemplate is the subject of this table's events; "": Config.SubjectTemplate. Its
	// leading literal tokens must be those of Config.SubjectTemplate, or start with them
	// ({prefix}.billing.{event_type}): the stream and the position record are bound to those.
	SubjectTemplate string
	// Stream is the stream of this table's events; "": Config.Sink.Stream. A table of its own
	// stream has subjects of their own: the leading literal tokens of its template (say
	// billing.{aggregate_id}.{event_type}) must not overlap another stream's, and that stream
	// and its position record are bound to them (tables sharing the stream start with the first
	// one's). Order: commit order within each stream; Postgres is told of a position only once
	// every stream stored every event up to it.
	Stream string
}

// table is a resolved Table.
type table struct {
	schema, name string
	columns      decoder.Columns
	subject      *decoder.SubjectTemplate
	feed         int // index of its stream in Config.feeds
}

// feed is one stream the relay publishes to: its name and subject prefix (the leading literal
// tokens its tables' templates share), which its position record is keyed by.
type feed struct{ stream, prefix string }

// String is schema.name, the table's label in metrics and logs.
func (t table) String() string { return t.schema + "." + t.name }

// maxTables is the most Config.Tables a relay serves: an event's table travels in the top byte
// of its sink ticket (see tableTicket).
const maxTables = 255

// DefaultConfig returns the defaults of every field; set PGURL (and NATSURL) and run.
func DefaultConfig() Config {
	return Config{
		NATSURL:         nats.DefaultURL,
		Schema:          "public",
		Table:           "outbox",
		Publication:     "outbox_pub",
		Slot:            "outbox_relay",
		PositionBucket:  sink.DefaultPositionBucket,
		Columns:         decoder.DefaultColumns,
		SubjectTemplate: decoder.DefaultSubjectTemplate,
		Source:          SourceTable,
		MessagePrefix:   "outbox",
		OnPoison:        OnPoisonStop,
		Sink: sink.Config{
			Stream:            sink.DefaultStream,
			SubjectPrefix:     sink.DefaultSubjectPrefix,
			DuplicateWindow:   sink.DefaultDuplicateWindow,
			Window:            sink.DefaultWindow,
			MaxInFlightBytes:  sink.DefaultMaxInFlightBytes,
			AckTimeout:        sink.DefaultAckTimeout,
			CloudEventsSource: sink.DefaultCloudEventsSource,
		},
		Replication: replication.Config{
			StatusInterval: replication.DefaultStatusInterval,
			IdleTimeout:    replication.DefaultIdleTimeout,
		},
		HTTPAddr:         ":" + DefaultHTTPPort,
		StallTimeout:     60 * time.Second,
		SlotPollInterval: 10 * time.Second,
		DrainTimeout:     10 * time.Second,
		StandbyPoll:      time.Second,
		ReconnectMin:     200 * time.Millisecond,
		ReconnectMax:     15 * time.Second,
	}
}

// ConfigError is a Config that cannot run; its message names the field (Config.X).
type ConfigError struct{ Err error }

func (e *ConfigError) Error() string { return e.Err.Error() }
func (e *ConfigError) Unwrap() error { return e.Err }

func configErr(format string, args ...any) error {
	return &ConfigError{fmt.Errorf(format, args...)}
}

// Validate reports the first setting that cannot run, as a *ConfigError.
func (c Config) Validate() error {
	_, err := c.resolve()
	return err
}

// resolve validates c and derives the settings of the parts (decoder, sink, replication).
func (c Config) resolve() (Config, error) {
	if c.PGURL == "" {
		return c, configErr("Config.PGURL is required")
	}
	if len(c.Tables) == 0 && (c.Schema == "" || c.Table == "") {
		return c, configErr("Config.Table %q (schema %q): name the outbox table and its schema", c.Table, c.Schema)
	}
	if c.Slot == "" || c.Publication == "" {
		return c, configErr("Config.Slot and Config.Publication must not be empty")
	}
	if !decoder.ValidPrefix(c.Sink.SubjectPrefix) {
		return c, configErr("Config.Sink.SubjectPrefix %q is not a valid NATS subject prefix (tokens separated by dots, no spaces, '*' or '>')", c.Sink.SubjectPrefix)
	}
	prefix := c.Sink.SubjectPrefix
	subject, err := decoder.ParseSubjectTemplate(c.SubjectTemplate, prefix)
	if err != nil {
		return c, &ConfigError{fmt.Errorf("Config.SubjectTemplate: %w", err)}
	}
	// The feed is bound to the template's literal leading tokens: the stream must cover
	// <them>.>, and the position record is keyed by them.
	c.subject, c.Sink.SubjectPrefix = subject, subject.Prefix()
	if err := checkColumns("Config.Columns", c.Columns); err != nil {
		return c, err
	}
	if c.tables, c.feeds, err = c.resolveTables(prefix); err != nil {
		return c, err
	}
	if len(c.feeds) == 1 {
		// One stream (the tables' own, perhaps): what the sink, backfill and prune read.
		c.Sink.Stream, c.Sink.SubjectPrefix = c.feeds[0].stream, c.feeds[0].prefix
	}
	if len(c.tables) == 1 {
		// One table (Config.Tables of one): what backfill, prune and the rest read.
		t := c.tables[0]
		c.Schema, c.Table, c.Columns, c.subject = t.schema, t.name, t.columns, t.subject
	}
	if c.TemporarySlot && c.Standby {
		return c, configErr("Config.TemporarySlot and Config.Standby exclude each other: a temporary slot belongs to one relay's connection and cannot be taken over")
	}
	switch c.OnPoison {
	case OnPoisonStop:
		c.Sink.DeadLetter = false
	case OnPoisonDeadLetter:
		c.Sink.DeadLetter = true
	default:
		return c, configErr("Config.OnPoison must be stop or dead-letter, not %q", c.OnPoison)
	}
	switch c.Sink.Publish {
	case "", sink.PublishSingle, sink.PublishAtomic, sink.PublishFast:
	default:
		return c, configErr("Config.Sink.Publish must be single, atomic or fast, not %q", c.Sink.Publish)
	}
	if c.Sink.Window < 1 {
		return c, configErr("Config.Sink.Window must be at least 1")
	}
	if c.Sink.MaxInFlightBytes < 1 {
		return c, configErr("Config.Sink.MaxInFlightBytes must be at least 1")
	}
	switch c.Source {
	case SourceTable:
		c.MessagePrefix = ""
		c.Replication.Messages = false
	case SourceMessages:
		if c.MessagePrefix == "" {
			return c, configErr("Config.MessagePrefix must not be empty with Config.Source messages")
		}
		c.Replication.Messages = true
	default:
		return c, configErr("Config.Source %q: use table or messages", c.Source)
	}
	if c.ReconnectMin <= 0 || c.ReconnectMax < c.ReconnectMin {
		return c, configErr("Config.ReconnectMin (%s) must be positive and at most Config.ReconnectMax (%s)", c.ReconnectMin, c.ReconnectMax)
	}
	if c.StandbyPoll <= 0 || c.SlotPollInterval <= 0 {
		return c, configErr("Config.StandbyPoll and Config.SlotPollInterval must be positive")
	}
	c.Replication.Slot, c.Replication.Publication = c.Slot, c.Publication
	return c, nil
}

// checkColumns checks that the required columns of cols are named; field names cols in errors.
func checkColumns(field string, cols decoder.Columns) error {
	for _, col := range []struct{ field, v string }{{"ID", cols.ID}, {"AggregateType", cols.AggregateType},
		{"AggregateID", cols.AggregateID}, {"EventType", cols.EventType}, {"Payload", cols.Payload}} {
		if col.v == "" {
			return configErr("%s.%s must name a column", field, col.field)
		}
	}
	return nil
}

// resolveTables resolves Config.Tables (or the one table Schema.Table) and their streams;
// prefix is Config.Sink.SubjectPrefix as given, the {prefix} of every template.
func (c Config) resolveTables(prefix string) ([]table, []feed, error) {
	main := feed{stream: c.Sink.Stream, prefix: c.subject.Prefix()}
	if len(c.Tables) == 0 {
		return []table{{schema: c.Schema, name: c.Table, columns: c.Columns, subject: c.subject}}, []feed{main}, nil
	}
	if c.Source == SourceMessages {
		return nil, nil, configErr("Config.Tables name outbox tables; Config.Source messages reads no table: leave one of them out")
	}
	if len(c.Tables) > maxTables {
		return nil, nil, configErr("Config.Tables: %d tables, at most %d", len(c.Tables), maxTables)
	}
	out := make([]table, 0, len(c.Tables))
	var feeds []feed
	firstOf := map[string]string{} // stream: the first table naming it
	seen := map[string]bool{}
	for i, t := range c.Tables {
		r := table{schema: t.Schema, name: t.Name, columns: t.Columns, subject: c.subject}
		if r.schema == "" {
			r.schema = c.Schema
		}
		if r.name == "" || r.schema == "" {
			return nil, nil, configErr("Config.Tables: table %d has no name", i+1)
		}
		if seen[r.String()] {
			return nil, nil, configErr("Config.Tables: %s is named twice", r)
		}
		seen[r.String()] = true
		if r.columns == (decoder.Columns{}) {
			r.columns = c.Columns
		} else if err := checkColumns(fmt.Sprintf("Config.Tables %s: Columns", r), r.columns); err != nil {
			return nil, nil, err
		}
		if t.SubjectTemplate != "" {
			s, err := decoder.ParseSubjectTemplate(t.SubjectTemplate, prefix)
			if err != nil {
				return nil, nil, &ConfigError{fmt.Errorf("Config.Tables %s: subject template: %w", r, err)}
			}
			r.subject = s
		}
		stream := t.Stream
		if stream == "" {
			stream = c.Sink.Stream
		}
		r.feed = -1
		for j, f := range feeds {
			if f.stream == stream {
				r.feed = j
			}
		}
		if r.feed < 0 {
			f := feed{stream: stream, prefix: r.subject.Prefix()}
			if stream == c.Sink.Stream {
				f = main
			}
			r.feed, feeds = len(feeds), append(feeds, f)
			firstOf[stream] = r.String()
		}
		f := feeds[r.feed]
		if p := r.subject.Prefix(); !underPrefix(p, f.prefix) {
			if stream == c.Sink.Stream {
				return nil, nil, configErr("Config.Tables %s: subject template %q puts events under %s, outside %s.>: the stream and the position record are bound to the leading literal tokens of Config.SubjectTemplate (%s), and every table's subjects must start with them (e.g. {prefix}.billing.{event_type}), or give the table a stream of its own",
					r, t.SubjectTemplate, p, f.prefix, f.prefix)
			}
			return nil, nil, configErr("Config.Tables %s: subject template puts events under %s, outside %s.>: stream %s and its position record are bound to the leading literal tokens of the first table of that stream (%s), and every table of the stream must start with them",
				r, p, f.prefix, f.stream, firstOf[stream])
		}
		out = append(out, r)
	}
	// Streams must not share subjects: JetStream refuses overlapping streams, and each
	// stream's position record and replay check read its subjects alone.
	for i, a := range feeds {
		for _, b := range feeds[i+1:] {
			if underPrefix(a.prefix, b.prefix) || underPrefix(b.prefix, a.prefix) {
				return nil, nil, configErr("Config.Tables: stream %s (table %s) and stream %s (table %s) would both take subjects under %s.>: a table of its own stream needs subjects of its own, a template whose leading literal tokens are not under another stream's (e.g. billing.{aggregate_id}.{event_type} next to {prefix}.{aggregate_type}.{aggregate_id})",
					a.stream, firstOf[a.stream], b.stream, firstOf[b.stream], min(a.prefix, b.prefix))
			}
		}
	}
	return out, feeds, nil
}

// underPrefix reports whether subjects under p (p.>) are all under prefix.>.
func underPrefix(p, prefix string) bool { return p == prefix || strings.HasPrefix(p, prefix+".") }

// feedSink is the sink configuration of feed i: Config.Sink with its stream and prefix, and
// its Tracer's for that stream when the tracer tells streams apart (StreamTracer).
func (c Config) feedSink(i int) sink.Config {
	s := c.Sink
	s.Stream, s.SubjectPrefix = c.feeds[i].stream, c.feeds[i].prefix
	if t, ok := s.Tracer.(StreamTracer); ok {
		s.Tracer = t.ForStream(s.Stream)
	}
	return s
}

// StreamTracer is a sink.Tracer that makes the tracer of one stream's events: each stream's
// publisher gets its own (Config.Tables of their own streams; one table's own stream in place
// of Config.Sink.Stream).
type StreamTracer interface {
	sink.Tracer
	ForStream(stream string) sink.Tracer
}

// forFeed is c with Sink set to feed i's (what the per-stream checks read).
func (c Config) forFeed(i int) Config {
	c.Sink = c.feedSink(i)
	return c
}

// tableFeeds maps each table (index of Config.tables) to its feed.
func (c Config) tableFeeds() []int {
	out := make([]int, len(c.tables))
	for i, t := range c.tables {
		out[i] = t.feed
	}
	return out
}

// feedTables names the tables of feed i.
func (c Config) feedTables(i int) []string {
	var out []string
	for _, t := range c.tables {
		if t.feed == i {
			out = append(out, t.String())
		}
	}
	return out
}

// streamNames are the feeds' streams.
func (c Config) streamNames() []string {
	out := make([]string, len(c.feeds))
	for i, f := range c.feeds {
		out[i] = f.stream
	}
	return out
}

// oneTable refuses several tables to what works on one table at a time (backfill, prune).
func (c Config) oneTable(what string) error {
	if len(c.tables) > 1 {
		return configErr("%s works on one outbox table at a time, Config.Tables names %d: run it once per table, with that table alone", what, len(c.tables))
	}
	return nil
}

// tableNames are the tables' schema.name.
func (c Config) tableNames() []string {
	names := make([]string, len(c.tables))
	for i, t := range c.tables {
		names[i] = t.String()
	}
	return names
}

// IsConfigError reports whether err is (or wraps) a *ConfigError.
func IsConfigError(err error) bool {
	var ce *ConfigError
	return errors.As(err, &ce)
}
