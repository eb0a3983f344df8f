package outbox_test

import (
	"context"
	"encoding/json"
	"sort"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func TestNewID_IsVersion7AndStrictlyIncreasing(t *testing.T) {
	prev := ""
	for i := 0; i < 20000; i++ { // several thousand per millisecond: exercises the counter
		id := outbox.NewID()
		require.Len(t, id, 36)
		require.Equal(t, byte('7'), id[14], "version nibble of %s", id)
		require.Contains(t, "89ab", string(id[19]), "variant of %s", id)
		require.Greater(t, id, prev, "ids must sort in creation order")
		prev = id
	}
	// The first 48 bits are the Unix time in milliseconds.
	id := outbox.NewID()
	var ms int64
	for _, c := range id[:8] + id[9:13] {
		ms = ms<<4 | int64(hexVal(byte(c)))
	}
	require.InDelta(t, time.Now().UnixMilli(), ms, 5000)
}

func hexVal(c byte) byte {
	if c >= 'a' {
		return c - 'a' + 10
	}
	return c - '0'
}

func TestEvent_InvalidEventsAreRejectedBeforeWriting(t *testing.T) {
	ctx := context.Background()
	for name, e := range map[string]outbox.Event{
		"no aggregate type": outbox.NewEvent("", "1", "X", map[string]int{}),
		"no aggregate id":   outbox.NewEvent("order", "", "X", map[string]int{}),
		"no event type":     outbox.NewEvent("order", "1", "", map[string]int{}),
		"bad json payload":  outbox.NewEvent("order", "1", "X", json.RawMessage(`{"a":`)),
		"unencodable":       outbox.NewEvent("order", "1", "X", func() {}),
		"no payload":        {AggregateType: "order", AggregateID: "1", EventType: "X"},
	} {
		// A nil tx is never used: validation fails first.
		require.Error(t, outbox.Write(ctx, nil, e), name)
	}
}

type row struct {
	ID, AggregateType, AggregateID, EventType, Payload string
	Headers                                            map[string]string
}

func readRows(t *testing.T, conn *pgx.Conn) []row {
	t.Helper()
	rows, err := conn.Query(context.Background(), `SELECT id::text, aggregate_type, aggregate_id, event_type, payload::text, headers FROM outbox`)
	require.NoError(t, err)
	var out []row
	for rows.Next() {
		var r row
		require.NoError(t, rows.Scan(&r.ID, &r.AggregateType, &r.AggregateID, &r.EventType, &r.Payload, &r.Headers))
		out = append(out, r)
	}
	require.NoError(t, rows.Err())
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Table mode writes each event as one row, by INSERT (1 event), a batch of INSERTs (2..7) or
// COPY (8 and more), with the traceparent from the context and the event's own headers.
func TestWrite_TableModeInsertBatchAndCopyWriteEveryField(t *testing.T) {
	ctx := context.Background()
	pg := testenv.Postgres(t)
	conn, err := pgx.Connect(ctx, pg.URL)
	require.NoError(t, err)
	defer conn.Close(ctx)
	_, err = migrations.Apply(ctx, conn, migrations.Options{})
	require.NoError(t, err)

	const tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	tctx := outbox.ContextWithTraceparent(ctx, tp)
	var want []outbox.Event
	for _, n := range []int{1, 3, 20} {
		events := make([]outbox.Event, n)
		for i := range events {
			events[i] = outbox.NewEvent("order", itoa(n)+"-"+itoa(i), "OrderCreated", map[string]any{"n": n, "i": i}).WithHeader("tenant", "acme")
		}
		tx, err := conn.Begin(ctx)
		require.NoError(t, err)
		require.NoError(t, outbox.Write(tctx, tx, events...))
		require.NoError(t, tx.Commit(ctx))
		for _, e := range events {
			require.NotEmpty(t, e.ID, "Write sets the id in the caller's slice")
		}
		want = append(want, events...)
	}
	got := readRows(t, conn)
	require.Len(t, got, len(want))
	sort.Slice(want, func(i, j int) bool { return want[i].ID < want[j].ID })
	for i, e := range want {
		r := got[i]
		require.Equal(t, e.ID, r.ID)
		require.Equal(t, e.AggregateID, r.AggregateID)
		require.Equal(t, "OrderCreated", r.EventType)
		require.JSONEq(t, string(e.Payload), r.Payload)
		require.Equal(t, map[string]string{"tenant": "acme", "traceparent": tp}, r.Headers)
	}

	// Rolled back: nothing stays.
	tx, err := conn.Begin(ctx)
	require.NoError(t, err)
	require.NoError(t, outbox.Write(ctx, tx, outbox.NewEvent("order", "x", "Gone", nil)))
	require.NoError(t, tx.Rollback(ctx))
	require.Len(t, readRows(t, conn), len(want))

	// An explicit header wins over the propagated one; a custom Propagate replaces the default.
	w := &outbox.Writer{Propagate: func(_ context.Context, h map[string]string) { h["tracestate"] = "v=1"; h["tenant"] = "ignored" }}
	tx, err = conn.Begin(ctx)
	require.NoError(t, err)
	require.NoError(t, w.Write(tctx, tx, outbox.NewEvent("order", "y", "Traced", nil).WithHeader("tenant", "acme").WithID("01a21836-0000-7000-8000-000000000001")))
	require.NoError(t, tx.Commit(ctx))
	var h map[string]string
	require.NoError(t, conn.QueryRow(ctx, `SELECT headers FROM outbox WHERE id = '01a21836-0000-7000-8000-000000000001'`).Scan(&h))
	require.Equal(t, map[string]string{"tenant": "acme", "tracestate": "v=1"}, h)
}

func itoa(i int) string { return string(rune('0'+i/10)) + string(rune('0'+i%10)) }

// A control character in the table name is refused before anything reaches Postgres.
func TestWriter_RefusesControlCharactersInTheTableName(t *testing.T) {
	w := &outbox.Writer{Table: "public.x\nDROP TABLE victim;\n--"}
	err := w.Write(context.Background(), nil, outbox.NewEvent("order", "1", "OrderCreated", map[string]int{"n": 1}))
	require.ErrorContains(t, err, "control character")
}
