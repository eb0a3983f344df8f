package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
	"github.com/outbox-relay/outbox-relay/sink"
)

func insertGapEvents(t *testing.T, pg *testenv.PG, tag string, n int) {
	t.Helper()
	pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
		SELECT 'gap', '`+tag+`-' || g, 'Gap.Happened', jsonb_build_object('g', g, 'tag', '`+tag+`'), '{"traceparent": "x"}' FROM generate_series(1, `+itoa(n)+`) g`)
}

// Events committed while the slot did not exist are not in the WAL stream of the new slot;
// backfill republishes them from the table, and the ids deduplicate the overlap.
func TestBackfill_RepublishesEventsCommittedWhileTheSlotWasGone(t *testing.T) {
	e := newEnv(t)
	stop, _ := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	n := workload{Writers: 2, Aggregates: 10, Txs: 20, MaxTx: 10, Seed: 4}.run(t, e.pg)
	waitStream(t, e.nats.URL, uint64(n), 30*time.Second)
	require.NoError(t, stop())

	// The slot is dropped; events are committed; a new slot is created past them.
	e.pg.Exec(t, `SELECT pg_drop_replication_slot('outbox_relay')`)
	insertGapEvents(t, e.pg, "lost", 30)
	e.pg.Exec(t, `SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')`)

	// The relay refuses the gap (TestSlotGap_*) until told to go on.
	stop, _ = inProcess(t, e.args("--accept-slot-gap"))
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "live", 5)
	waitStream(t, e.nats.URL, uint64(n+5), 30*time.Second)
	since := time.Now().Add(-10 * time.Minute).UTC().Format(time.RFC3339)

	// Backfill with the relay running: only the gap's events are new.
	var out bytes.Buffer
	require.NoError(t, dispatch(context.Background(), []string{"backfill", "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--since", since, "--dry-run"}, &out, &out, noEnv))
	require.Contains(t, out.String(), "dry run: "+itoa(n+35)+" rows")
	out.Reset()
	require.NoError(t, dispatch(context.Background(), []string{"backfill", "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--since", since, "--log-level", "warn"}, &out, &out, noEnv))
	require.Contains(t, out.String(), itoa(n+35)+" rows read, 30 newly stored, "+itoa(n+5)+" duplicates")
	insertGapEvents(t, e.pg, "after", 3)
	waitStream(t, e.nats.URL, uint64(n+38), 30*time.Second)
	require.NoError(t, stop())

	rows := outboxRows(t, e.pg)
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	requireClean(t, check(t, rows, recs))
	backfilled := 0
	for _, r := range recs {
		if r.Header.Get(sink.HeaderBackfill) != "true" {
			continue
		}
		backfilled++
		row := rows[r.Header.Get(sink.HeaderMsgID)]
		require.Equal(t, "gap", row.AggregateType)
		require.Equal(t, "outbox.gap.Gap_Happened", r.Subject)
		require.Equal(t, row.Payload, string(r.Data))
		require.Equal(t, row.CreatedAt, r.Header.Get(sink.HeaderCreatedAt))
		require.Equal(t, "x", r.Header.Get("traceparent"))
		require.True(t, strings.HasPrefix(row.AggregateID, "lost-"), row.AggregateID)
	}
	require.Equal(t, 30, backfilled)

	// Backfilled messages did not move the relay's replay-skip position: a restart with the
	// events after them still publishes new ones.
	stop, _ = inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "restart", 2)
	waitStream(t, e.nats.URL, uint64(n+40), 30*time.Second)
	require.NoError(t, stop())
	requireClean(t, check(t, outboxRows(t, e.pg), readStream(t, e.nats.URL, sink.DefaultStream)))
}

// A row the relay makes poison for its header keys (one NATS refuses, or a message schedule)
// stops the backfill naming it, as a row the decoder rejects does; nothing is published
// without the header.
func TestBackfill_StopsAtAHeaderKeyNATSRefuses(t *testing.T) {
	for _, c := range []struct{ headers, want string }{
		{`{"content type": "json"}`, `headers column key "content type" is not a valid NATS header key`},
		{`{"Nats-Schedule": "@at 2030-01-01T00:00:00Z", "Nats-Schedule-Target": "outbox.order.Remind"}`, `headers column key "Nats-Schedule" asks for a JetStream message schedule, which the relay refuses`},
	} {
		e := newEnv(t)
		js, closeNC := connectJS(t, e.nats.URL)
		_, err := sink.EnsureStream(context.Background(), js, sink.Config{}, zerolog.Nop())
		closeNC()
		require.NoError(t, err)
		e.pg.Exec(t, `INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers)
			VALUES ('00000000-0000-4000-8000-0000000000b1', 'order', '1', 'Bad', '{}', $1::jsonb)`, c.headers)
		since := time.Now().Add(-10 * time.Minute).UTC().Format(time.RFC3339)
		var out bytes.Buffer
		err = dispatch(context.Background(), []string{"backfill", "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--since", since, "--log-level", "warn"}, &out, &out, noEnv)
		require.ErrorContains(t, err, `backfill row 1: event cannot be published: event 00000000-0000-4000-8000-0000000000b1: `+c.want)
		require.Empty(t, readStream(t, e.nats.URL, sink.DefaultStream))
	}
}

// A backfilled copy of a row carries every header the live path writes (CloudEvents included),
// except its position stamp and the Outbox-Backfill mark.
func TestBackfill_SameHeadersAsLive(t *testing.T) {
	e := newEnv(t)
	stop, _ := inProcess(t, e.args("--headers", "cloudevents", "--cloudevents-source", "/shop"))
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "one", 1)
	waitStream(t, e.nats.URL, 1, 30*time.Second)
	require.NoError(t, stop())
	live := readStream(t, e.nats.URL, sink.DefaultStream)[0]

	// The same row backfilled into a second broker's stream.
	other := natsembed.JetStream(t)
	js, closeNC := connectJS(t, other.URL)
	defer closeNC()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: sink.DefaultStream, Subjects: []string{"outbox.>"}, Storage: jetstream.FileStorage})
	require.NoError(t, err)
	var out bytes.Buffer
	since := time.Now().Add(-10 * time.Minute).UTC().Format(time.RFC3339)
	require.NoError(t, dispatch(context.Background(), []string{"backfill", "--pg-url", e.pg.URL, "--nats-url", other.URL, "--since", since,
		"--headers", "cloudevents", "--cloudevents-source", "/shop", "--log-level", "warn"}, &out, &out, noEnv))
	back := readStream(t, other.URL, sink.DefaultStream)[0]

	require.Equal(t, live.Subject, back.Subject)
	require.Equal(t, live.Data, back.Data)
	require.Equal(t, "true", back.Header.Get(sink.HeaderBackfill))
	require.NotEmpty(t, live.Header.Get(sink.HeaderCEID), "the live copy has CloudEvents headers")
	for k, v := range live.Header {
		switch k {
		case sink.HeaderCommitLSN, sink.HeaderTxIndex, "Nats-Expected-Stream", "Nats-Expected-Last-Msg-Id", "Nats-Expected-Last-Sequence":
			continue // the position stamp, and the live chain's control headers
		}
		require.Equal(t, v, back.Header.Values(k), "header %s", k)
	}
}
