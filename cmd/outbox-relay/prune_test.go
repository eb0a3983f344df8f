package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/sink"
)

func prune(t *testing.T, e *env, extra ...string) string {
	t.Helper()
	var out bytes.Buffer
	args := append([]string{"prune", "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--older-than", "72h", "--log-level", "warn"}, extra...)
	require.NoError(t, dispatch(context.Background(), args, &out, &out, noEnv))
	return out.String()
}

// pruneRefused runs prune, requires it to refuse, and returns the message.
func pruneRefused(t *testing.T, e *env, extra ...string) string {
	t.Helper()
	var out bytes.Buffer
	args := append([]string{"prune", "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--older-than", "1s", "--log-level", "warn"}, extra...)
	err := dispatch(context.Background(), args, &out, &out, noEnv)
	require.Error(t, err, "prune did not refuse: %s", out.String())
	require.True(t, relay.IsFatal(err))
	require.NotContains(t, out.String(), "deleted")
	return err.Error()
}

const insertOld = `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at)
	SELECT 'order', g::text, 'Old', '{}', now() - interval '100 hours' FROM generate_series(1, 50) g`

func countRows(t *testing.T, e *env, where string) int {
	t.Helper()
	var n int
	require.NoError(t, e.pg.QueryRow(t, `SELECT count(*) FROM outbox WHERE `+where).Scan(&n))
	return n
}

func TestPrune_DeletesOnlyOldRowsTheSlotHasConfirmed(t *testing.T) {
	e := newEnv(t)
	e.createSlot(t)
	e.pg.Exec(t, insertOld)
	e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) SELECT 'order', g::text, 'New', '{}' FROM generate_series(1, 5) g`)

	// Old enough, but not published yet (the relay never ran: no position record either).
	require.Contains(t, pruneRefused(t, e), "no position record")
	require.Equal(t, 55, countRows(t, e, "true"))

	stop, _ := inProcess(t, e.args("--status-interval", "1s"))
	waitStream(t, e.nats.URL, 55, 30*time.Second)
	// The slot's catalog_xmin moves past the rows once a running-transactions record (logged
	// by CHECKPOINT) is decoded and the relay confirmed a position after it.
	require.Eventually(t, func() bool {
		e.pg.Exec(t, `CHECKPOINT`)
		return prune(t, e, "--dry-run") == "would delete 50 rows from \"public\".\"outbox\"\n"
	}, 30*time.Second, 200*time.Millisecond)

	// Old rows committed now, with the relay stopped, are not confirmed and stay.
	require.NoError(t, stop())
	e.pg.Exec(t, insertOld)
	out := prune(t, e, "--batch", "7")
	require.Contains(t, out, "deleted 50 rows")
	require.Contains(t, out, "kept 50 rows older than the cutoff")
	require.Equal(t, 50, countRows(t, e, "event_type = 'Old'"), "the unconfirmed old rows stay")
	require.Equal(t, 5, countRows(t, e, "event_type = 'New'"), "rows newer than --older-than stay")
}

func TestPrune_RefusesWithoutTheSlot(t *testing.T) {
	e := newEnv(t)
	var out bytes.Buffer
	err := dispatch(context.Background(), []string{"prune", "--pg-url", e.pg.URL, "--older-than", "1h", "--slot", "nope"}, &out, &out, noEnv)
	require.ErrorContains(t, err, `replication slot "nope" does not exist`)
	err = dispatch(context.Background(), []string{"prune", "--pg-url", e.pg.URL}, &out, &out, noEnv)
	require.ErrorContains(t, err, "--older-than is required")
	err = dispatch(context.Background(), []string{"prune", "--pg-url", e.pg.URL, "--older-than", "1h", "--position-bucket", ""}, &out, &out, noEnv)
	require.ErrorContains(t, err, "--skip-source-check")
}

// Rows old enough but not behind the slot's catalog_xmin are kept, and prune says so.
func TestPrune_ReportsRowsKeptBehindCatalogXmin(t *testing.T) {
	e := newEnv(t)
	relayEvents(t, e, "published", 3)
	e.pg.Exec(t, insertOld) // the relay is stopped: not published, not behind catalog_xmin
	out := prune(t, e)
	require.Contains(t, out, "deleted 0 rows")
	require.Contains(t, out, `kept 50 rows older than the cutoff: their transactions are not yet behind slot "outbox_relay"'s catalog_xmin`)
	require.Contains(t, out, "within seconds to minutes")
	out = prune(t, e, "--dry-run")
	require.Contains(t, out, "would delete 0 rows")
	require.Contains(t, out, "kept 50 rows")
	require.Equal(t, 53, countRows(t, e, "true"))
}

func TestPrune_RefusesASlotThatIsNotTheRelays(t *testing.T) {
	e := newEnv(t)
	relayEvents(t, e, "published", 3)
	// Another tool's slot, created now: its catalog_xmin is past every row.
	e.pg.Exec(t, `SELECT pg_create_logical_replication_slot('other_tool', 'pgoutput')`)
	e.pg.Exec(t, insertOld)
	e.pg.Exec(t, `SELECT pg_replication_slot_advance('other_tool', pg_current_wal_lsn())`)
	msg := pruneRefused(t, e, "--slot", "other_tool")
	require.Contains(t, msg, `prune refuses slot "other_tool"`)
	require.Contains(t, msg, `on slot "outbox_relay"`)
	require.Contains(t, msg, "Fix: pass --slot outbox_relay")
	// Another stream's record is not this relay's either.
	require.Contains(t, pruneRefused(t, e, "--stream", "OTHER"), "no position record")
	require.Equal(t, 53, countRows(t, e, "true"))
}

func TestPrune_RefusesAnotherCluster(t *testing.T) {
	e := newEnv(t)
	relayEvents(t, e, "published", 3)
	// The record names another cluster (the database was replaced since).
	js, closeNC := connectJS(t, e.nats.URL)
	defer closeNC()
	r, err := sink.OpenPositionRecord(context.Background(), js, sink.DefaultPositionBucket, sink.Config{})
	require.NoError(t, err)
	rec := positionRecord(t, e.nats)
	rec.SystemID = "7000000000000000001"
	require.NoError(t, r.Put(context.Background(), rec))
	e.pg.Exec(t, insertOld)
	msg := pruneRefused(t, e)
	require.Contains(t, msg, "cluster 7000000000000000001")
	require.Contains(t, msg, "this database is on Postgres cluster ")
	require.Contains(t, msg, "--accept-slot-gap")
	require.Equal(t, 53, countRows(t, e, "true"))
}

func TestPrune_RefusesASlotAheadOfTheRecordUntilOverridden(t *testing.T) {
	e := newEnv(t)
	relayEvents(t, e, "published", 3)
	// Someone skips the slot past events the relay never saw: backfill needs them.
	e.pg.Exec(t, insertOld)
	e.pg.Exec(t, `SELECT pg_replication_slot_advance('outbox_relay', pg_current_wal_lsn())`)
	e.pg.Exec(t, `CHECKPOINT`)
	msg := pruneRefused(t, e)
	require.Contains(t, msg, `replication slot "outbox_relay" is at `)
	require.Contains(t, msg, "ahead of what the relay recorded")
	require.Contains(t, msg, "outbox-relay backfill --since ")
	require.Equal(t, 53, countRows(t, e, "true"))

	// The explicit override prunes what the slot's catalog_xmin allows.
	require.Eventually(t, func() bool {
		e.pg.Exec(t, `CHECKPOINT`)
		e.pg.Exec(t, `SELECT pg_replication_slot_advance('outbox_relay', pg_current_wal_lsn())`)
		return countRows(t, e, "event_type = 'Old'") == 0 ||
			strings.Contains(prune(t, e, "--skip-source-check"), "deleted 50 rows")
	}, 30*time.Second, 200*time.Millisecond)
	require.Equal(t, 3, countRows(t, e, "true"))
}

// The record is found with the relay's --subject-template, as run names it.
func TestPrune_FindsTheRecordOfARelayWithASubjectTemplate(t *testing.T) {
	e := newEnv(t)
	// The feed's prefix is the template's leading literal tokens: acme.events, not acme.
	tmpl := []string{"--subject-prefix", "acme", "--subject-template", "{prefix}.events.{aggregate_type}.{event_type}", "--stream", "ACME"}
	stop, _ := inProcess(t, e.args(tmpl...))
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "published", 3)
	require.Eventually(t, func() bool { return streamMsgs(t, e.nats.URL, "ACME") == 3 }, 30*time.Second, 20*time.Millisecond)
	require.NoError(t, stop())
	require.Contains(t, prune(t, e, tmpl...), "deleted 0 rows")
	require.Contains(t, pruneRefused(t, e, "--stream", "ACME", "--subject-prefix", "acme"), "no position record")
}
