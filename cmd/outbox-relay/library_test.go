package main

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/sink"
)

const testTraceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

// produce writes, through w, a committed transaction of 20 events (COPY in table mode), a
// rolled-back one of 3, a committed one of 1 with a traceparent, then a committed one of 2.
// It returns the committed events in commit order.
func produce(t *testing.T, pg *testenv.PG, w *outbox.Writer) []outbox.Event {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, pg.URL)
	require.NoError(t, err)
	defer conn.Close(ctx)
	batch := func(tag string, n int) []outbox.Event {
		ev := make([]outbox.Event, n)
		for i := range ev {
			ev[i] = outbox.NewEvent("order", fmt.Sprintf("%s-%d", tag, i%3), "OrderCreated", map[string]any{"tx": tag, "i": i})
		}
		return ev
	}
	var committed []outbox.Event
	write := func(ctx context.Context, ev []outbox.Event, commit bool) {
		tx, err := conn.Begin(ctx)
		require.NoError(t, err)
		_, err = tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY)`)
		require.NoError(t, err)
		require.NoError(t, w.Write(ctx, tx, ev...))
		if commit {
			require.NoError(t, tx.Commit(ctx))
			committed = append(committed, ev...)
		} else {
			require.NoError(t, tx.Rollback(ctx))
		}
	}
	write(ctx, batch("a", 20), true)
	write(ctx, batch("rolled-back", 3), false)
	write(outbox.ContextWithTraceparent(ctx, testTraceparent), batch("b", 1), true)
	write(ctx, batch("c", 2), true)
	return committed
}

// requirePublished checks the stream holds exactly want, in order, with body and headers.
func requirePublished(t *testing.T, url string, want []outbox.Event) {
	t.Helper()
	waitStream(t, url, uint64(len(want)), 30*time.Second)
	recs := readStream(t, url, sink.DefaultStream)
	require.Len(t, recs, len(want), "rolled-back events must not be published")
	for i, r := range recs {
		e := want[i]
		require.Equal(t, e.ID, r.Header.Get(sink.HeaderMsgID), "event %d out of order", i)
		require.Equal(t, "outbox.order.OrderCreated", r.Subject)
		require.Equal(t, e.AggregateID, r.Header.Get(sink.HeaderAggregateID))
		require.JSONEq(t, string(e.Payload), string(r.Data))
		require.NotEmpty(t, r.Header.Get(sink.HeaderCreatedAt))
		require.NotContains(t, string(r.Data), "rolled-back")
		require.Empty(t, r.Header.Get("ce-id"), "no CloudEvents headers without --headers cloudevents")
		if i == 20 {
			require.Equal(t, testTraceparent, r.Header.Get("traceparent"))
		} else {
			require.Empty(t, r.Header.Get("traceparent"))
		}
	}
}

func TestProducerLibrary_TableMode_CommitPublishesInOrderRollbackDoesNot(t *testing.T) {
	e := newEnv(t)
	stop, _ := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	want := produce(t, e.pg, &outbox.Writer{})
	requirePublished(t, e.nats.URL, want)
	require.NoError(t, stop())
}

func TestProducerLibrary_MessageMode_CommitPublishesInOrderRollbackDoesNot(t *testing.T) {
	pg, js := testenv.Postgres(t), natsembed.JetStream(t)
	var out bytes.Buffer
	require.NoError(t, dispatch(context.Background(), []string{"migrate", "--source", "messages", "--pg-url", pg.URL, "--log-level", "warn"}, &out, &out, noEnv))
	var hasTable bool
	require.NoError(t, pg.QueryRow(t, `SELECT to_regclass('public.outbox') IS NOT NULL`).Scan(&hasTable))
	require.False(t, hasTable, "table-less migrate creates no table")

	stop, log := inProcess(t, []string{"run", "--source", "messages", "--message-prefix", "outbox", "--pg-url", pg.URL,
		"--nats-url", js.URL, "--create-slot", "--log-format", "json"})
	waitStreaming(t, pg, "outbox_relay")
	// Neither a non-transactional message with the prefix nor a message with another prefix
	// is an event.
	pg.Exec(t, `SELECT pg_logical_emit_message(false, 'outbox', '{"id": "x", "aggregate_type": "order", "aggregate_id": "nt", "event_type": "OrderCreated", "payload": {}}')`)
	pg.Exec(t, `SELECT pg_logical_emit_message(true, 'audit', 'not an event')`)
	want := produce(t, pg, &outbox.Writer{Mode: outbox.MessageMode})
	requirePublished(t, js.URL, want)
	require.NoError(t, stop())
	require.Contains(t, log.String(), "ignored a non-transactional logical decoding message")
}

// outbox_emit called from SQL, with the relay's default prefix and no headers.
func TestMessageMode_OutboxEmitFromSQL(t *testing.T) {
	pg, js := testenv.Postgres(t), natsembed.JetStream(t)
	var out bytes.Buffer
	require.NoError(t, dispatch(context.Background(), []string{"migrate", "--source", "messages", "--pg-url", pg.URL, "--log-level", "warn"}, &out, &out, noEnv))
	stop, _ := inProcess(t, []string{"run", "--source", "messages", "--pg-url", pg.URL, "--nats-url", js.URL, "--create-slot"})
	waitStreaming(t, pg, "outbox_relay")
	pg.Exec(t, `BEGIN;
		SELECT outbox_emit('invoice', '7', 'InvoiceSent', '{"amount": 3}', id => '00000000-0000-4000-8000-000000000007');
		SELECT outbox_emit('invoice', '7', 'InvoicePaid', '{"amount": 3}', '{"k": "v"}', '00000000-0000-4000-8000-000000000008');
		COMMIT;`)
	waitStream(t, js.URL, 2, 30*time.Second)
	require.NoError(t, stop())
	recs := readStream(t, js.URL, sink.DefaultStream)
	require.Len(t, recs, 2)
	require.Equal(t, "outbox.invoice.InvoiceSent", recs[0].Subject)
	require.Equal(t, `{"amount": 3}`, string(recs[0].Data))
	require.Equal(t, "00000000-0000-4000-8000-000000000007", recs[0].Header.Get(sink.HeaderMsgID))
	require.Equal(t, "0", recs[0].Header.Get(sink.HeaderTxIndex))
	require.Equal(t, "1", recs[1].Header.Get(sink.HeaderTxIndex))
	require.Equal(t, "v", recs[1].Header.Get("k"))
	require.Equal(t, recs[0].Header.Get(sink.HeaderCommitLSN), recs[1].Header.Get(sink.HeaderCommitLSN))
	require.Error(t, pg.QueryRow(t, `SELECT outbox_emit('invoice', '7', 'X', NULL)`).Scan(new(string)), "a NULL payload is refused")
}

func TestRelay_CloudEventsHeaders(t *testing.T) {
	e := newEnv(t)
	stop, _ := inProcess(t, e.args("--headers", "cloudevents", "--cloudevents-source", "/shop/orders"))
	waitStreaming(t, e.pg, "outbox_relay")
	e.pg.Exec(t, `INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers)
		VALUES ('00000000-0000-4000-8000-0000000000ce', 'order', '42', 'OrderCreated', '{"total": 10}', '{"ce-type": "spoofed"}')`)
	waitStream(t, e.nats.URL, 1, 30*time.Second)
	require.NoError(t, stop())
	r := readStream(t, e.nats.URL, sink.DefaultStream)[0]
	require.Equal(t, "1.0", r.Header.Get("ce-specversion"))
	require.Equal(t, "00000000-0000-4000-8000-0000000000ce", r.Header.Get("ce-id"))
	require.Equal(t, "OrderCreated", r.Header.Get("ce-type"), "the relay's attribute wins over the headers column")
	require.Equal(t, "/shop/orders", r.Header.Get("ce-source"))
	require.Equal(t, "42", r.Header.Get("ce-subject"))
	require.Equal(t, r.Header.Get(sink.HeaderCreatedAt), r.Header.Get("ce-time"))
	_, err := time.Parse(time.RFC3339Nano, r.Header.Get("ce-time"))
	require.NoError(t, err)
	require.Equal(t, "application/json", r.Header.Get("content-type"))
	require.Equal(t, "00000000-0000-4000-8000-0000000000ce", r.Header.Get(sink.HeaderMsgID))
	require.Equal(t, `{"total": 10}`, string(r.Data))

	// An unknown value is a usage error.
	var out bytes.Buffer
	require.ErrorContains(t, dispatch(context.Background(), e.args("--headers", "xml"), &out, &out, noEnv), "--headers")
}
