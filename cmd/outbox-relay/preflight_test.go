package main

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
	"github.com/outbox-relay/outbox-relay/relay"
)

// runPreflight runs the relay with args and requires it to stop at preflight; it returns the
// error message and the log.
func runPreflight(t *testing.T, args ...string) (msg, log string) {
	t.Helper()
	var out bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := dispatch(ctx, append([]string{"run", "--http-addr", "off", "--log-format", "json"}, args...), &out, &out, noEnv)
	var pe *relay.PreflightError
	require.ErrorAs(t, err, &pe, "log: %s", out.String())
	require.True(t, relay.IsFatal(err))
	return err.Error(), out.String()
}

func TestPreflight_ReportsEveryProblemInOneMessage(t *testing.T) {
	cluster := testenv.NewCluster(t, testenv.WithConfig("wal_level = replica"))
	pg := cluster.NewDatabase(t)
	deadNATS := fmt.Sprintf("nats://127.0.0.1:%d", testenv.FreePort(t))
	msg, _ := runPreflight(t, "--pg-url", pg.URL, "--nats-url", deadNATS)
	t.Log(msg)
	require.Contains(t, msg, "preflight found 5 problems")
	require.Contains(t, msg, `wal_level is "replica"`)
	require.Contains(t, msg, "ALTER SYSTEM SET wal_level = logical")
	require.Contains(t, msg, `table "public"."outbox" does not exist`)
	require.Contains(t, msg, "outbox-relay migrate")
	require.Contains(t, msg, `CREATE PUBLICATION "outbox_pub" FOR TABLE "public"."outbox" WITH (publish = 'insert');`)
	require.Contains(t, msg, "replication slot \"outbox_relay\" does not exist. Fix: pass --create-slot")
	require.Contains(t, msg, "connect to NATS at "+deadNATS)
	require.Contains(t, msg, "set --nats-url")
}

func TestPreflight_RoleWithoutReplication(t *testing.T) {
	e := newEnv(t)
	e.pg.Exec(t, `DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_norepl') THEN CREATE ROLE app_norepl LOGIN; END IF; END $$`)
	url := strings.Replace(e.pg.URL, "postgres@", "app_norepl@", 1)
	msg, _ := runPreflight(t, "--pg-url", url, "--nats-url", e.nats.URL, "--create-slot")
	require.Contains(t, msg, `role "app_norepl" lacks the REPLICATION attribute`)
	require.Contains(t, msg, `ALTER ROLE "app_norepl" REPLICATION;`)
}

func TestPreflight_PublicationMissingOrWithoutTheTable(t *testing.T) {
	e := newEnv(t)
	e.pg.Exec(t, `DROP PUBLICATION outbox_pub`)
	msg, _ := runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--create-slot")
	require.Contains(t, msg, `publication "outbox_pub" does not exist`)
	require.Contains(t, msg, `CREATE PUBLICATION "outbox_pub" FOR TABLE "public"."outbox" WITH (publish = 'insert');`)

	e.pg.Exec(t, `CREATE TABLE other (x int); CREATE PUBLICATION outbox_pub FOR TABLE other`)
	msg, _ = runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--create-slot")
	require.Contains(t, msg, `publication "outbox_pub" does not include "public"."outbox"`)
	require.Contains(t, msg, `ALTER PUBLICATION "outbox_pub" ADD TABLE "public"."outbox";`)

	e.pg.Exec(t, `DROP PUBLICATION outbox_pub; CREATE PUBLICATION outbox_pub FOR TABLE outbox WITH (publish = 'update')`)
	msg, _ = runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--create-slot")
	require.Contains(t, msg, `does not publish INSERTs`)
	require.Contains(t, msg, `ALTER PUBLICATION "outbox_pub" SET (publish = 'insert');`)
	// Nothing was created while problems remained.
	var n int
	require.NoError(t, e.pg.QueryRow(t, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outbox_relay'`).Scan(&n))
	require.Zero(t, n)
}

func TestPreflight_TableMissingAndUnusableColumns(t *testing.T) {
	e := newEnv(t)
	msg, _ := runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--create-slot", "--table", "app.events")
	require.Contains(t, msg, `table "app"."events" does not exist`)

	e.pg.Exec(t, `CREATE TABLE ev (id uuid, aggregate_type text, event_type text, payload integer, created_at date);
		ALTER PUBLICATION outbox_pub ADD TABLE ev`)
	msg, _ = runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--create-slot", "--table", "ev")
	require.Contains(t, msg, `table "public"."ev" has no column "aggregate_id"`)
	require.Contains(t, msg, "--column-aggregate-id")
	require.Contains(t, msg, `column "public"."ev"."payload" has type integer`)
	require.Contains(t, msg, "text, character varying, json, jsonb, bytea")
	require.Contains(t, msg, `column "public"."ev"."created_at" has type date`)
}

func TestPreflight_SlotOfAnotherPluginOrDatabase(t *testing.T) {
	e := newEnv(t)
	e.pg.Exec(t, `SELECT pg_create_logical_replication_slot('td', 'test_decoding')`)
	msg, _ := runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--slot", "td")
	require.Contains(t, msg, `replication slot "td" uses plugin "test_decoding"`)
	require.Contains(t, msg, "choose another --slot")

	other := testenv.Postgres(t)
	other.Exec(t, `SELECT pg_create_logical_replication_slot('elsewhere', 'pgoutput')`)
	msg, _ = runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--slot", "elsewhere")
	require.Contains(t, msg, fmt.Sprintf(`replication slot "elsewhere" belongs to database %q`, other.DBName))
}

func TestPreflight_SlotActiveElsewhereNamesStandby(t *testing.T) {
	e := newEnv(t)
	e.createSlot(t)
	holdSlot(t, e.pg, "outbox_relay")
	msg, _ := runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", e.nats.URL)
	require.Contains(t, msg, `replication slot "outbox_relay" is active: another process (pid `)
	require.Contains(t, msg, "--standby")
}

func TestPreflight_InvalidatedSlotExplainsTheLossAndRecovery(t *testing.T) {
	cluster := testenv.NewCluster(t, testenv.WithConfig("max_slot_wal_keep_size = 1MB"))
	e := &env{pg: cluster.NewDatabase(t), nats: natsembed.JetStream(t)}
	e.migrate(t)
	e.createSlot(t)
	// Write well past max_slot_wal_keep_size (1 MB segments) and checkpoint: the slot loses
	// its WAL.
	require.Eventually(t, func() bool {
		e.pg.Exec(t, `CREATE TABLE IF NOT EXISTS filler (pad text); INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 3000); SELECT pg_switch_wal(); CHECKPOINT;`)
		var status string
		require.NoError(t, e.pg.QueryRow(t, `SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'outbox_relay'`).Scan(&status))
		return status == "lost"
	}, 30*time.Second, 10*time.Millisecond)
	msg, _ := runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", e.nats.URL)
	require.Contains(t, msg, `replication slot "outbox_relay" is invalidated (wal_status = lost)`)
	require.Contains(t, msg, "will never be relayed")
	require.Contains(t, msg, "outbox-relay slot drop --slot outbox_relay --force && outbox-relay slot create --slot outbox_relay")
	require.Contains(t, msg, `outbox-relay backfill --since`)
}

func TestPreflight_UnlimitedSlotWALIsAWarning(t *testing.T) {
	e := newEnv(t)
	deadNATS := fmt.Sprintf("nats://127.0.0.1:%d", testenv.FreePort(t))
	msg, log := runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", deadNATS, "--create-slot")
	require.Contains(t, msg, "preflight check failed", "only NATS is a problem")
	require.NotContains(t, msg, "max_slot_wal_keep_size")
	require.Contains(t, log, `"level":"warn"`)
	require.Contains(t, log, "max_slot_wal_keep_size is unlimited (-1)")
}

func TestPreflight_DuplicateWindowShorterThanTheReplayHorizonIsAWarning(t *testing.T) {
	e := newEnv(t)
	nc := e.nats.Connect(t)
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	_, err = js.CreateStream(context.Background(), jetstream.StreamConfig{Name: "OUTBOX", Subjects: []string{"outbox.>"}, Duplicates: 3 * time.Minute})
	require.NoError(t, err)
	// checkpoint_timeout is 5 minutes in the test cluster (Postgres' default).
	_, log := runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", e.nats.URL) // fails: no slot
	require.Contains(t, log, "duplicate window of 3m0s, shorter than the replay horizon")
	require.Contains(t, log, "checkpoint_timeout 5m0s")
	require.Contains(t, log, "--dupe-window 20m")
}

// authNATS runs an embedded JetStream server that requires a user and password.
func authNATS(t *testing.T) string {
	t.Helper()
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: server.RANDOM_PORT, JetStream: true,
		StoreDir: t.TempDir(), Username: "relay", Password: "s3cret-pw", NoLog: true, NoSigs: true})
	require.NoError(t, err)
	go s.Start()
	require.True(t, s.ReadyForConnections(10*time.Second))
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	return s.ClientURL()
}

func TestPreflight_NATSAuthFailedAndPasswordRedacted(t *testing.T) {
	e := newEnv(t)
	e.createSlot(t)
	url := authNATS(t)
	wrong := strings.Replace(url, "nats://", "nats://relay:wrong-pw@", 1)
	msg, log := runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", wrong)
	require.Contains(t, msg, "NATS refused the credentials")
	require.Contains(t, msg, "--nats-url")
	require.NotContains(t, msg+log, "wrong-pw")

	// The right credentials pass.
	right := strings.Replace(url, "nats://", "nats://relay:s3cret-pw@", 1)
	stop, rlog := inProcess(t, []string{"run", "--pg-url", e.pg.URL, "--nats-url", right, "--http-addr", "off", "--log-format", "json"})
	waitStreaming(t, e.pg, "outbox_relay")
	require.NoError(t, stop())
	require.NotContains(t, rlog.String(), "s3cret-pw")
}

func TestPreflight_IncompatibleStream(t *testing.T) {
	e := newEnv(t)
	e.createSlot(t)
	nc := e.nats.Connect(t)
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	ctx := context.Background()
	_, err = js.CreateStream(ctx, jetstream.StreamConfig{Name: "OUTBOX", Subjects: []string{"other.>"}})
	require.NoError(t, err)
	msg, _ := runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", e.nats.URL)
	require.Contains(t, msg, "stream OUTBOX takes subjects [other.>], which do not cover outbox.>")
	require.Contains(t, msg, "nats stream edit OUTBOX")
	require.Contains(t, msg, "or choose another --stream / --subject-prefix", "the library names Config fields, the CLI its flags")

	_, err = js.CreateStream(ctx, jetstream.StreamConfig{Name: "NOACK", Subjects: []string{"outbox.>"}, NoAck: true})
	require.NoError(t, err)
	msg, _ = runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--stream", "NOACK")
	require.Contains(t, msg, "stream NOACK has no_ack set")
}

// In table-less mode whoever can call pg_logical_emit_message injects events; Postgres grants
// EXECUTE on it to PUBLIC by default.
func TestPreflight_EmitMessageExecutableByPublicIsAWarning(t *testing.T) {
	pg := testenv.Postgres(t)
	var out bytes.Buffer
	require.NoError(t, dispatch(context.Background(), []string{"migrate", "--source", "messages", "--pg-url", pg.URL, "--log-level", "warn"}, &out, &out, noEnv))
	deadNATS := fmt.Sprintf("nats://127.0.0.1:%d", testenv.FreePort(t))
	args := []string{"--source", "messages", "--pg-url", pg.URL, "--nats-url", deadNATS, "--create-slot"}
	_, log := runPreflight(t, args...)
	require.Contains(t, log, `"level":"warn"`)
	require.Contains(t, log, "PUBLIC can execute pg_logical_emit_message")
	require.Contains(t, log, "REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text), pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC;")

	pg.Exec(t, `REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text), pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC`)
	_, log = runPreflight(t, args...)
	require.NotContains(t, log, "pg_logical_emit_message")
}
