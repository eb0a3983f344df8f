package testenv_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// must fails the test if err is not nil.
func must(t *testing.T, err error, doing string) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", doing, err)
	}
}

// equal reports an error if got != want.
func equal[T comparable](t *testing.T, got, want T, what string) {
	t.Helper()
	if got != want {
		t.Errorf("%s = %v, want %v", what, got, want)
	}
}

func queryString(t *testing.T, pg *testenv.PG, sql string, args ...any) string {
	t.Helper()
	var s string
	must(t, pg.QueryRow(t, sql, args...).Scan(&s), "query")
	return s
}

func TestPostgresGivesFreshLogicalDatabases(t *testing.T) {
	t.Parallel()
	a := testenv.Postgres(t)
	b := testenv.Postgres(t)

	if a.DBName == b.DBName {
		t.Errorf("two Postgres(t) calls returned the same database %q", a.DBName)
	}
	if a.Cluster != b.Cluster {
		t.Error("Postgres(t) databases should live in the shared cluster")
	}
	equal(t, a.URL, fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", a.Port, a.DBName), "URL")
	equal(t, queryString(t, a, "SELECT current_database()"), a.DBName, "current_database()")
	equal(t, queryString(t, a, "SHOW wal_level"), "logical", "wal_level")
	equal(t, queryString(t, a, "SHOW max_prepared_transactions"), "10", "max_prepared_transactions")
	equal(t, queryString(t, a, "SHOW wal_segment_size"), "1MB", "wal_segment_size")
	equal(t, queryString(t, a, "SHOW fsync"), "off", "fsync")

	a.Exec(t, "CREATE TABLE outbox (id bigserial PRIMARY KEY, payload text); INSERT INTO outbox (payload) VALUES ('x')")
	tag := a.Exec(t, "INSERT INTO outbox (payload) VALUES ($1), ($2)", "y", "z")
	equal(t, tag.RowsAffected(), 2, "rows inserted")
	var n int
	must(t, a.QueryRow(t, "SELECT count(*) FROM outbox").Scan(&n), "count rows")
	equal(t, n, 3, "row count")

	var reg *string
	must(t, b.QueryRow(t, "SELECT to_regclass('outbox')::text").Scan(&reg), "look up table in other database")
	if reg != nil {
		t.Error("a table created in one database must not exist in the other")
	}

	err := a.QueryRow(t, "SELECT payload FROM outbox WHERE id = -1").Scan(new(string))
	if !errors.Is(err, pgx.ErrNoRows) || !strings.Contains(err.Error(), "WHERE id = -1") {
		t.Errorf("QueryRow error should wrap pgx.ErrNoRows and name the query, got %v", err)
	}
	if !strings.Contains(a.Cluster.Log(), "database system is ready to accept connections") {
		t.Errorf("server log lacks the ready line:\n%s", a.Cluster.Log())
	}
}

// The cleanup of Postgres(t) must drop the database although it has an
// inactive slot, an active slot held by a walsender and a prepared
// transaction, each of which blocks DROP DATABASE.
func TestPostgresCleanupDropsSlotsAndPreparedTransactions(t *testing.T) {
	t.Parallel()
	other := testenv.Postgres(t)
	ctx := context.Background()

	var dbName string
	var repl *pgconn.PgConn
	t.Run("inner", func(t *testing.T) {
		pg := testenv.Postgres(t)
		dbName = pg.DBName
		pg.Exec(t, "CREATE TABLE items (id int PRIMARY KEY); CREATE PUBLICATION pub FOR ALL TABLES")
		pg.Exec(t, "SELECT pg_create_logical_replication_slot('idle_slot', 'pgoutput')")
		pg.Exec(t, "SELECT pg_create_logical_replication_slot('busy_slot', 'pgoutput')")

		// Hold busy_slot with a streaming walsender that outlives this subtest.
		var err error
		repl, err = pgconn.Connect(ctx, pg.ReplicationURL())
		must(t, err, "open replication connection")
		repl.Frontend().Send(&pgproto3.Query{String: "START_REPLICATION SLOT busy_slot LOGICAL 0/0 (proto_version '1', publication_names 'pub')"})
		must(t, repl.Frontend().Flush(), "send START_REPLICATION")
		msg, err := repl.ReceiveMessage(ctx)
		must(t, err, "receive START_REPLICATION response")
		if _, ok := msg.(*pgproto3.CopyBothResponse); !ok {
			t.Fatalf("START_REPLICATION answered %T, want CopyBothResponse", msg)
		}

		conn := pg.Conn(t)
		for _, sql := range []string{"BEGIN", "INSERT INTO items VALUES (1)", "PREPARE TRANSACTION 'gid-1'"} {
			_, err := conn.Exec(ctx, sql)
			must(t, err, sql)
		}
		equal(t, queryString(t, pg, "SELECT count(*)::text FROM pg_prepared_xacts"), "1", "prepared transactions")
		equal(t, queryString(t, pg, "SELECT active::text FROM pg_replication_slots WHERE slot_name = 'busy_slot'"), "true", "busy_slot active")
	})
	if repl != nil {
		defer repl.Close(ctx)
	}

	for what, sql := range map[string]string{
		"databases":              "SELECT count(*) FROM pg_database WHERE datname = $1",
		"replication slots":      "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
		"prepared transactions ": "SELECT count(*) FROM pg_prepared_xacts WHERE database = $1",
	} {
		var n int
		must(t, other.QueryRow(t, sql, dbName).Scan(&n), "count "+what)
		equal(t, n, 0, what+" left after cleanup")
	}
}

func TestClusterSurvivesImmediateStopKillAndRestart(t *testing.T) {
	t.Parallel()
	var dataDir string
	t.Cleanup(func() { // registered first, so runs after the cluster's cleanup
		if _, err := os.Stat(dataDir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("data directory %s not removed: %v", dataDir, err)
		}
	})
	c := testenv.NewCluster(t)
	dataDir = c.DataDir
	pg := c.NewDatabase(t)
	pg.Exec(t, "CREATE TABLE kv (k text PRIMARY KEY, v int)")
	pg.Exec(t, "INSERT INTO kv VALUES ('a', 1)")
	firstPID := c.PID()
	if firstPID == 0 {
		t.Fatal("running cluster reports PID 0")
	}

	must(t, c.Stop(testenv.StopImmediate), "stop immediate")
	if c.Running() {
		t.Error("Running() after Stop")
	}
	if err := pg.QueryRow(t, "SELECT 1").Scan(new(int)); err == nil {
		t.Error("stopped cluster accepted a query")
	}
	if err := c.Stop(testenv.StopImmediate); err == nil {
		t.Error("stopping a stopped cluster should fail")
	}

	must(t, c.Start(), "start after immediate stop")
	if c.PID() == firstPID || c.PID() == 0 {
		t.Errorf("PID after restart = %d, first PID %d", c.PID(), firstPID)
	}
	if !strings.Contains(c.Log(), "database system was interrupted") {
		t.Error("log should show crash recovery after an immediate stop")
	}
	pg.Exec(t, "INSERT INTO kv VALUES ('b', 2)")

	must(t, c.Kill(), "kill")
	if err := pg.QueryRow(t, "SELECT 1").Scan(new(int)); err == nil {
		t.Error("killed cluster accepted a query")
	}
	must(t, c.Start(), "start after kill")
	must(t, c.Restart(), "restart")

	var sum int
	must(t, pg.QueryRow(t, "SELECT sum(v) FROM kv").Scan(&sum), "sum rows")
	equal(t, sum, 3, "sum of committed rows after immediate stop, kill and restart")
	equal(t, queryString(t, pg, "SHOW wal_level"), "logical", "wal_level")
}

func TestClusterWithConfigOverridesDefaults(t *testing.T) {
	t.Parallel()
	c := testenv.NewCluster(t, testenv.WithConfig("wal_level = replica", "max_replication_slots = 3"))
	pg := c.NewDatabase(t)
	equal(t, queryString(t, pg, "SHOW wal_level"), "replica", "wal_level")
	equal(t, queryString(t, pg, "SHOW max_replication_slots"), "3", "max_replication_slots")

	err := pg.QueryRow(t, "SELECT pg_create_logical_replication_slot('s', 'pgoutput')::text").Scan(new(string))
	if err == nil || !strings.Contains(err.Error(), "wal_level") {
		t.Errorf("creating a logical slot with wal_level=replica: got %v, want an error about wal_level", err)
	}
}

func TestSharedClusterRefusesStopAndUnknownModes(t *testing.T) {
	t.Parallel()
	c := testenv.Postgres(t).Cluster
	if err := c.Stop("graceful"); err == nil || !strings.Contains(err.Error(), "unknown mode") {
		t.Errorf(`Stop("graceful") = %v, want unknown mode error`, err)
	}
	if err := c.Stop(testenv.StopImmediate); err == nil || !strings.Contains(err.Error(), "use NewCluster") {
		t.Errorf("stopping the shared cluster = %v, want a refusal", err)
	}
	if err := c.Kill(); err == nil {
		t.Error("killing the shared cluster should be refused")
	}
	if !c.Running() {
		t.Error("shared cluster stopped")
	}
}

// streamMsgs reports how many messages stream holds.
func streamMsgs(t *testing.T, url, stream string) uint64 {
	t.Helper()
	nc, err := nats.Connect(url)
	must(t, err, "connect to "+url)
	defer nc.Close()
	js, err := jetstream.New(nc)
	must(t, err, "jetstream.New")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, stream)
	must(t, err, "look up stream "+stream)
	info, err := s.Info(ctx)
	must(t, err, "stream info")
	return info.State.Msgs
}

// publish creates file-backed stream EVENTS (idempotently) and publishes n
// acknowledged messages to it.
func publish(t *testing.T, url string, n int) {
	t.Helper()
	nc, err := nats.Connect(url)
	must(t, err, "connect to "+url)
	defer nc.Close()
	js, err := jetstream.New(nc)
	must(t, err, "jetstream.New")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: "EVENTS", Subjects: []string{"events.>"}, Storage: jetstream.FileStorage})
	must(t, err, "create stream")
	for i := range n {
		ack, err := js.Publish(ctx, "events.created", fmt.Appendf(nil, "msg-%d", i))
		must(t, err, "publish")
		equal(t, ack.Stream, "EVENTS", "ack stream")
	}
}

func TestJetStreamRestartKeepsStreamData(t *testing.T) {
	t.Parallel()
	js := natsembed.JetStream(t, natsembed.WithMaxPayload(2048))
	equal(t, js.URL, fmt.Sprintf("nats://127.0.0.1:%d", js.Port), "URL")

	publish(t, js.URL, 3)
	equal(t, streamMsgs(t, js.URL, "EVENTS"), 3, "messages before restart")

	nc := js.Connect(t)
	equal(t, nc.MaxPayload(), 2048, "max payload")
	if err := nc.Publish("events.big", make([]byte, 4096)); !errors.Is(err, nats.ErrMaxPayload) {
		t.Errorf("publishing 4KB with max_payload 2KB: got %v, want ErrMaxPayload", err)
	}

	old, port := js.Server, js.Port
	js.Restart(t)
	if js.Server == old || old.Running() {
		t.Error("Restart should replace the server and stop the old one")
	}
	equal(t, js.Port, port, "port after restart")
	equal(t, streamMsgs(t, js.URL, "EVENTS"), 3, "messages after restart")

	js.Shutdown()
	if nc, err := nats.Connect(js.URL, nats.Timeout(time.Second)); err == nil {
		nc.Close()
		t.Error("shut down server accepted a connection")
	}
}

func TestJetStreamOnFixedPortAndStoreDir(t *testing.T) {
	t.Parallel()
	port, dir := testenv.FreePort(t), t.TempDir()
	js := natsembed.JetStream(t, natsembed.WithPort(port), natsembed.WithStoreDir(dir))
	equal(t, js.Port, port, "port")
	publish(t, js.URL, 1)
	entries, err := os.ReadDir(dir)
	must(t, err, "read store dir")
	if len(entries) == 0 {
		t.Error("JetStream wrote nothing into the given store dir")
	}
}

func TestNATSProcessSurvivesKill(t *testing.T) {
	t.Parallel()
	bin := testenv.NATSServerBinary(t)
	if fi, err := os.Stat(bin); err != nil || fi.Mode()&0o111 == 0 {
		t.Fatalf("NATSServerBinary() = %s, not an executable: %v", bin, err)
	}

	p := testenv.StartNATSProcess(t, 0, "")
	publish(t, p.URL, 5)
	pid := p.PID()
	if pid == 0 {
		t.Fatal("running process reports PID 0")
	}

	must(t, p.Kill(), "kill nats-server")
	equal(t, p.PID(), 0, "PID after kill")
	if nc, err := nats.Connect(p.URL, nats.Timeout(time.Second)); err == nil {
		nc.Close()
		t.Fatal("killed server accepted a connection")
	}

	must(t, p.Start(), "start after kill")
	if p.PID() == pid {
		t.Error("restarted server has the old PID")
	}
	equal(t, streamMsgs(t, p.URL, "EVENTS"), 5, "acknowledged messages after SIGKILL")

	publish(t, p.URL, 1)
	must(t, p.Stop(), "stop nats-server")
	must(t, p.Start(), "start after stop")
	equal(t, streamMsgs(t, p.URL, "EVENTS"), 6, "messages after clean stop")
	if !strings.Contains(p.Log(), "Server is ready") {
		t.Errorf("log does not capture server output:\n%s", p.Log())
	}
}

func TestNATSClusterLeaderStepDownKillAndRestart(t *testing.T) {
	t.Parallel()
	c := testenv.StartNATSCluster(t, 3)
	nc, err := nats.Connect(c.URL)
	must(t, err, "connect to the cluster")
	defer nc.Close()
	js, err := jetstream.New(nc)
	must(t, err, "jetstream")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err = js.CreateStream(ctx, jetstream.StreamConfig{Name: "R3", Subjects: []string{"r3.>"}, Replicas: 3})
	must(t, err, "create R3 stream")
	_, err = js.Publish(ctx, "r3.a", []byte("1"))
	must(t, err, "publish")

	leader, err := c.StreamLeader(ctx, "R3")
	must(t, err, "find the leader")
	if c.Node(leader) == nil {
		t.Fatalf("leader %q is not one of %v", leader, c.Names)
	}
	old, err := c.StepDown(ctx, "R3")
	must(t, err, "step down")
	next, err := c.WaitNewLeader(ctx, "R3", old)
	must(t, err, "new leader after step-down")

	p := c.Node(next)
	pid := p.PID()
	must(t, p.Kill(), "kill -9 the leader")
	after, err := c.WaitNewLeader(ctx, "R3", next)
	must(t, err, "new leader after kill -9")
	_, err = js.Publish(ctx, "r3.a", []byte("2"))
	must(t, err, "publish with a node down")
	must(t, p.Start(), "restart the killed node")
	if p.PID() == pid || p.PID() == 0 {
		t.Errorf("restarted node has PID %d (was %d)", p.PID(), pid)
	}

	q := c.Node(after)
	must(t, q.Pause(), "SIGSTOP the leader")
	_, err = c.WaitNewLeader(ctx, "R3", after)
	must(t, err, "new leader while the old one is stopped")
	must(t, q.Resume(), "SIGCONT")
	equal(t, streamMsgs(t, c.URL, "R3"), 2, "messages in the R3 stream")

	// Every replica catches up again; the monitoring endpoints name a client's node.
	_, err = c.WaitStreamCurrent(ctx, "R3")
	must(t, err, "replicas current after the restart and the pause")
	named, err := nats.Connect(c.URL, nats.Name("testenv-probe"))
	must(t, err, "connect a named client")
	defer named.Close()
	at, err := c.ClientNode(ctx, "testenv-probe")
	must(t, err, "find the named client's node")
	equal(t, c.Node(at).URL, named.ConnectedUrl(), "the named client's node")
}
