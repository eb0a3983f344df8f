package main

import (
	"bytes"
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/replication"
)

func runCmd(args ...string) (string, error) {
	var out bytes.Buffer
	err := dispatch(context.Background(), args, &out, &out, noEnv)
	return out.String(), err
}

// holdSlot starts replication on slot from a separate connection, so the slot is active.
func holdSlot(t *testing.T, pg *testenv.PG, slot string) {
	t.Helper()
	ctx := context.Background()
	conn, err := replication.Connect(ctx, pg.URL)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	require.NoError(t, pglogrepl.StartReplication(ctx, conn, slot, 0,
		pglogrepl.StartReplicationOptions{PluginArgs: []string{"proto_version '1'", "publication_names 'outbox_pub'"}}))
	waitStreaming(t, pg, slot)
}

func TestSlot_CreateListDrop(t *testing.T) {
	pg := testenv.Postgres(t)
	out, err := runCmd("slot", "create", "--pg-url", pg.URL, "--slot", "s1")
	require.NoError(t, err)
	require.Contains(t, out, "created replication slot s1 at ")

	_, err = runCmd("slot", "create", "--pg-url", pg.URL, "--slot", "s1")
	require.ErrorContains(t, err, "--if-not-exists")
	out, err = runCmd("slot", "create", "--pg-url", pg.URL, "--slot", "s1", "--if-not-exists")
	require.NoError(t, err)
	require.Contains(t, out, "replication slot s1 exists")

	_, err = runCmd("slot", "create", "--pg-url", pg.URL, "--slot", "tmp", "--temporary")
	require.ErrorContains(t, err, "run --temporary-slot")
	require.ErrorAs(t, err, new(usageError))

	// Hold WAL back: the lag grows by at least what is written after the slot.
	pg.Exec(t, `CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 5000) g`)
	out, err = runCmd("slot", "list", "--pg-url", pg.URL, "--output", "json")
	require.NoError(t, err)
	var views []slotView
	require.NoError(t, json.Unmarshal([]byte(out), &views), out)
	var mine *slotView
	for i := range views {
		if views[i].Name == "s1" {
			mine = &views[i]
		}
	}
	require.NotNil(t, mine, out)
	require.Equal(t, "pgoutput", mine.Plugin)
	require.Equal(t, pg.DBName, mine.Database)
	require.False(t, mine.Active)
	require.Nil(t, mine.ActivePID)
	require.Greater(t, mine.LagBytes, int64(1_000_000), "5000 rows of 200 bytes were written after the slot")
	require.Equal(t, "reserved", mine.WALStatus)
	require.Nil(t, mine.SafeWALSize, "max_slot_wal_keep_size is unlimited in the test cluster")
	_, err = pglogrepl.ParseLSN(mine.ConfirmedFlushLSN)
	require.NoError(t, err)

	out, err = runCmd("slot", "list", "--pg-url", pg.URL)
	require.NoError(t, err)
	require.Contains(t, out, "NAME")
	require.Contains(t, out, "CONFIRMED FLUSH LSN")
	require.Regexp(t, `s1\s+pgoutput\s+`+pg.DBName+`\s+-\s+\S+\s+\S+\s+\d+\.\d MiB\s+reserved\s+unlimited`, out)

	out, err = runCmd("slot", "drop", "--pg-url", pg.URL, "--slot", "s1")
	require.NoError(t, err)
	require.Contains(t, out, "dropped replication slot s1")
	_, err = runCmd("slot", "drop", "--pg-url", pg.URL, "--slot", "s1")
	require.ErrorContains(t, err, "--if-exists")
	_, err = runCmd("slot", "drop", "--pg-url", pg.URL, "--slot", "s1", "--if-exists")
	require.NoError(t, err)
}

func TestSlot_DropActiveNeedsForceWhichTerminatesTheHolder(t *testing.T) {
	e := newEnv(t)
	e.createSlot(t)
	holdSlot(t, e.pg, "outbox_relay")

	_, err := runCmd("slot", "drop", "--pg-url", e.pg.URL)
	require.ErrorContains(t, err, "is active")
	require.ErrorContains(t, err, "--force")
	var n int
	require.NoError(t, e.pg.QueryRow(t, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outbox_relay'`).Scan(&n))
	require.Equal(t, 1, n, "refused drop must leave the slot")

	start := time.Now()
	out, err := runCmd("slot", "drop", "--pg-url", e.pg.URL, "--force")
	require.NoError(t, err)
	require.Contains(t, out, "dropped replication slot outbox_relay")
	require.Less(t, time.Since(start), 10*time.Second)
	require.NoError(t, e.pg.QueryRow(t, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outbox_relay'`).Scan(&n))
	require.Zero(t, n)
}

func TestSlot_CreateIfNotExistsRefusesAForeignSlot(t *testing.T) {
	pg := testenv.Postgres(t)
	pg.Exec(t, `SELECT pg_create_logical_replication_slot('td', 'test_decoding')`)
	_, err := runCmd("slot", "create", "--pg-url", pg.URL, "--slot", "td", "--if-not-exists")
	require.ErrorContains(t, err, `uses plugin "test_decoding"`)
}
