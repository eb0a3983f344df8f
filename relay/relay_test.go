package relay

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/decoder"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/sink"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// testEnv is one test's Postgres database (migrated) and JetStream server.
type testEnv struct {
	pg   *testenv.PG
	nats *natsembed.NATS
}

func newTestEnv(t *testing.T) *testEnv {
	t.Helper()
	e := &testEnv{pg: testenv.Postgres(t), nats: natsembed.JetStream(t)}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := ConnectPG(ctx, e.pg.URL)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	_, err = migrations.Apply(ctx, conn, migrations.Options{})
	require.NoError(t, err)
	return e
}

// config is DefaultConfig pointed at the test's servers, creating its slot, serving HTTP on a
// free port.
func (e *testEnv) config() Config {
	cfg := DefaultConfig()
	cfg.PGURL, cfg.NATSURL = e.pg.URL, e.nats.URL
	cfg.CreateSlot = true
	cfg.HTTPAddr = "127.0.0.1:0"
	return cfg
}

func (e *testEnv) insert(t *testing.T, tag string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('test', $1, 'Test.Happened', '{}')`, tag)
	}
}

// js is a JetStream client of the test's server (its connection closed in t.Cleanup).
func (e *testEnv) js(t *testing.T) jetstream.JetStream {
	t.Helper()
	js, err := jetstream.New(e.nats.Connect(t))
	require.NoError(t, err)
	return js
}

// streamIDs returns the Nats-Msg-Id of every message of the stream, in stream order.
func (e *testEnv) streamIDs(t *testing.T) []string {
	t.Helper()
	js := e.js(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, sink.DefaultStream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil
	}
	require.NoError(t, err)
	info, err := s.Info(ctx)
	require.NoError(t, err)
	ids := make([]string, 0, info.State.Msgs)
	if info.State.Msgs == 0 {
		return ids
	}
	// An ordered consumer, not a GetMsg per message: tens of thousands of those under -race
	// outlast the deadline.
	c, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	require.NoError(t, err)
	for uint64(len(ids)) < info.State.Msgs {
		batch, err := c.Fetch(1000, jetstream.FetchMaxWait(5*time.Second))
		require.NoError(t, err)
		n := 0
		for m := range batch.Messages() {
			ids = append(ids, m.Headers().Get(nats.MsgIdHdr))
			n++
		}
		require.NoError(t, batch.Error())
		require.NotZero(t, n, "the stream read stopped at %d of %d messages", len(ids), info.State.Msgs)
	}
	return ids
}

// waitStream waits until the stream holds at least n messages.
func (e *testEnv) waitStream(t *testing.T, n int) {
	t.Helper()
	js := e.js(t)
	require.Eventually(t, func() bool {
		s, err := js.Stream(context.Background(), sink.DefaultStream)
		if err != nil {
			return false
		}
		info, err := s.Info(context.Background())
		return err == nil && info.State.Msgs >= uint64(n)
	}, 30*time.Second, 5*time.Millisecond, "the stream never reached %d messages", n)
}

// running is a relay.Run in the background.
type running struct {
	log      *testenv.SyncBuffer
	sessions chan *Session
	stop     func() error
}

// start runs Run with cfg until stop; each session is sent on sessions.
func start(t *testing.T, cfg Config, opts ...Option) *running {
	t.Helper()
	r := &running{log: &testenv.SyncBuffer{}, sessions: make(chan *Session, 16)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	opts = append([]Option{WithLogger(zerolog.New(r.log).Level(zerolog.DebugLevel)),
		OnSession(func(s *Session) { r.sessions <- s })}, opts...)
	go func() { done <- Run(ctx, cfg, opts...) }()
	var once sync.Once
	var err error
	r.stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case err = <-done:
			case <-time.After(60 * time.Second):
				err = errors.New("the relay did not stop within 60 s")
			}
		})
		return err
	}
	t.Cleanup(func() {
		_ = r.stop()
		if t.Failed() {
			t.Logf("relay log:\n%s", r.log.String())
		}
	})
	return r
}

// session waits for the next session to start streaming.
func (r *running) streaming(t *testing.T) *Session {
	t.Helper()
	select {
	case s := <-r.sessions:
		select {
		case <-s.Streaming():
			return s
		case <-s.Done():
			t.Fatalf("the session ended before streaming: %v", s.Err())
		case <-time.After(30 * time.Second):
			t.Fatal("the session did not start streaming within 30 s")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no session started within 30 s")
	}
	return nil
}

// httpAddr is the address the relay serves /metrics, /healthz and /readyz on.
func (r *running) httpAddr(t *testing.T) string {
	t.Helper()
	var addr string
	require.Eventually(t, func() bool {
		for _, line := range strings.Split(r.log.String(), "\n") {
			var v struct{ Addr, Message string }
			if json.Unmarshal([]byte(line), &v) == nil && strings.Contains(v.Message, "serving /metrics") && v.Addr != "" {
				addr = "http://" + v.Addr
				return true
			}
		}
		return false
	}, 30*time.Second, 20*time.Millisecond, "the relay never logged its HTTP address")
	return addr
}

// Run, embedded: a session goes from starting to streaming, relays the outbox's inserts with
// their ids as Nats-Msg-Id, and on ctx's end drains, confirms its position to the slot and
// ends without an error.
func TestRun_SessionLifecycle(t *testing.T) {
	e := newTestEnv(t)
	r := start(t, e.config())
	s := r.streaming(t)
	require.Equal(t, SessionStreaming, s.State())
	require.NoError(t, s.Err(), "no error while streaming")

	e.insert(t, "a", 3)
	e.waitStream(t, 3)
	var want []string
	require.NoError(t, e.pg.QueryRow(t, `SELECT array_agg(id::text ORDER BY id) FROM outbox`).Scan(&want))
	got := e.streamIDs(t)
	require.ElementsMatch(t, want, got)

	require.NoError(t, r.stop())
	<-s.Done()
	require.Equal(t, SessionDone, s.State())
	require.NoError(t, s.Err())
	require.NotZero(t, s.Resume())
	require.Eventually(t, func() bool {
		var lsn string
		require.NoError(t, e.pg.QueryRow(t, `SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1`, "outbox_relay").Scan(&lsn))
		confirmed, err := pglogrepl.ParseLSN(lsn)
		require.NoError(t, err)
		return confirmed == s.Resume()
	}, 10*time.Second, 20*time.Millisecond, "the slot never confirmed the session's final position %s", s.Resume())
}

// An invalid Config is refused before anything is touched, with a *ConfigError naming the
// field.
func TestConfig_Validate(t *testing.T) {
	ok := DefaultConfig()
	ok.PGURL = "postgres://localhost/db"
	require.NoError(t, ok.Validate())
	for _, tc := range []struct {
		field  string
		modify func(*Config)
	}{
		{"Config.PGURL", func(c *Config) { c.PGURL = "" }},
		{"Config.OnPoison", func(c *Config) { c.OnPoison = "ignore" }},
		{"Config.Source", func(c *Config) { c.Source = "view" }},
		{"Config.MessagePrefix", func(c *Config) { c.Source, c.MessagePrefix = SourceMessages, "" }},
		{"Config.Sink.Window", func(c *Config) { c.Sink.Window = 0 }},
		{"Config.Sink.MaxInFlightBytes", func(c *Config) { c.Sink.MaxInFlightBytes = 0 }},
		{"Config.Sink.SubjectPrefix", func(c *Config) { c.Sink.SubjectPrefix = "a b" }},
		{"Config.SubjectTemplate", func(c *Config) { c.SubjectTemplate = "{nope}" }},
		{"Config.Columns.Payload", func(c *Config) { c.Columns.Payload = "" }},
		{"Config.TemporarySlot", func(c *Config) { c.TemporarySlot, c.Standby = true, true }},
		{"Config.ReconnectMin", func(c *Config) { c.ReconnectMin = 0 }},
		{"Config.Tables", func(c *Config) { c.Tables = []Table{{Name: "a"}, {Schema: "public", Name: "a"}} }},
		{"Config.Tables", func(c *Config) { c.Tables = []Table{{Name: "a"}, {Name: "b", Stream: "B"}} }}, // both under outbox.>
		{"Config.Tables", func(c *Config) {
			c.Tables = []Table{{Name: "a"}, {Name: "b", SubjectTemplate: "outbox.b.{event_type}", Stream: "B"}}
		}},
		{"Config.Tables", func(c *Config) {
			c.Tables = []Table{{Name: "b", SubjectTemplate: "b.{event_type}", Stream: "B"}, {Name: "c", SubjectTemplate: "c.{event_type}", Stream: "B"}}
		}},
		{"Config.Tables", func(c *Config) { c.Tables = []Table{{Name: "a"}, {Name: "b", SubjectTemplate: "b.{event_type}"}} }},
		{"Config.Tables", func(c *Config) { c.Tables = []Table{{Name: "a"}, {Name: "b", Columns: decoder.Columns{ID: "id"}}} }},
		{"Config.Tables", func(c *Config) { c.Tables = []Table{{Name: "a"}, {Schema: "b"}} }},
		{"Config.Tables", func(c *Config) { c.Source, c.Tables = SourceMessages, []Table{{Name: "a"}} }},
	} {
		c := ok
		tc.modify(&c)
		err := c.Validate()
		require.Error(t, err, tc.field)
		require.True(t, IsConfigError(err), tc.field)
		require.Contains(t, err.Error(), tc.field)
		require.NotContains(t, err.Error(), "--", "a library error names no command-line flag")
		require.ErrorContains(t, Run(context.Background(), c), tc.field, "Run validates too")
	}
}

// Config.Tables: a table's own subject template under the feed's tokens, its own columns, the
// relay's stream named; one table of Tables is what backfill and prune read, several they refuse.
func TestConfig_Tables(t *testing.T) {
	c := DefaultConfig()
	c.PGURL = "postgres://localhost/db"
	c.Tables = []Table{{Schema: "orders", Name: "outbox"}, {Schema: "billing", Name: "outbox", SubjectTemplate: "{prefix}.billing.{event_type}",
		Columns: decoder.Columns{ID: "event_id", AggregateType: "kind", AggregateID: "account", EventType: "name", Payload: "body"}, Stream: c.Sink.Stream}}
	r, err := c.resolve()
	require.NoError(t, err)
	require.Equal(t, []string{"orders.outbox", "billing.outbox"}, r.tableNames())
	require.Equal(t, "outbox", r.Sink.SubjectPrefix, "the feed stays bound to Config.SubjectTemplate's tokens")
	require.Equal(t, decoder.DefaultColumns, r.tables[0].columns)
	require.Equal(t, "event_id", r.tables[1].columns.ID)
	require.Equal(t, "outbox.billing", r.tables[1].subject.Prefix())
	require.ErrorContains(t, r.oneTable("backfill"), "backfill works on one outbox table at a time, Config.Tables names 2")

	c.Tables = c.Tables[1:]
	r, err = c.resolve()
	require.NoError(t, err)
	require.NoError(t, r.oneTable("backfill"))
	require.Equal(t, "billing", r.Schema)
	require.Equal(t, "event_id", r.Columns.ID)
	require.Equal(t, "outbox", r.Sink.SubjectPrefix)

	// A table of its own stream: subjects of its own, its stream's prefix; one such table
	// alone is what backfill and prune read.
	c.Tables = []Table{{Schema: "orders", Name: "outbox"}, {Schema: "billing", Name: "outbox", SubjectTemplate: "billing.{aggregate_id}.{event_type}", Stream: "BILLING"},
		{Schema: "billing", Name: "refunds", SubjectTemplate: "billing.refund.{event_type}", Stream: "BILLING"}}
	r, err = c.resolve()
	require.NoError(t, err)
	require.Equal(t, []feed{{sink.DefaultStream, "outbox"}, {"BILLING", "billing"}}, r.feeds)
	require.Equal(t, []int{0, 1, 1}, r.tableFeeds())
	require.Equal(t, sink.DefaultStream, r.Sink.Stream)
	require.Equal(t, "BILLING", r.feedSink(1).Stream)
	require.Equal(t, "billing", r.feedSink(1).SubjectPrefix)
	c.Tables = c.Tables[1:2]
	c.Sink.Tracer = streamTracer("")
	r, err = c.resolve()
	require.NoError(t, err)
	require.Equal(t, "BILLING", r.Sink.Stream)
	require.Equal(t, "billing", r.Sink.SubjectPrefix)
	require.Equal(t, streamTracer("BILLING"), r.feedSink(0).Tracer, "the one feed's tracer names its stream, not Config.Sink.Stream as given")
}

// Preflight, on its own: a missing slot is a *PreflightError whose fix names the Config field
// (no command-line flag); with CreateSlot it creates the slot and reports nothing.
func TestPreflight_NamesConfigFieldsAndCreatesTheSlot(t *testing.T) {
	e := newTestEnv(t)
	cfg := e.config()
	cfg.CreateSlot = false
	err := Preflight(context.Background(), cfg)
	var pe *PreflightError
	require.ErrorAs(t, err, &pe)
	require.True(t, IsFatal(err))
	require.Contains(t, err.Error(), `replication slot "outbox_relay" does not exist`)
	require.Contains(t, err.Error(), "Config.CreateSlot")
	require.NotContains(t, err.Error(), "--create-slot")

	cfg.CreateSlot = true
	require.NoError(t, Preflight(context.Background(), cfg))
	var n int
	require.NoError(t, e.pg.QueryRow(t, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outbox_relay'`).Scan(&n))
	require.Equal(t, 1, n)
}

// streamTracer is a StreamTracer that only remembers the stream it was made for.
type streamTracer string

func (streamTracer) Start(*decoder.Event) func(uint64, bool) { return nil }

func (streamTracer) ForStream(stream string) sink.Tracer { return streamTracer(stream) }
