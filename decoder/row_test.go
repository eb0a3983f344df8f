package decoder_test

import (
	"errors"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/decoder"
)

func rowCols(cols ...col) []decoder.RowColumn {
	out := make([]decoder.RowColumn, len(cols))
	for i, c := range cols {
		out[i] = decoder.RowColumn{Name: c.name, TypeOID: c.oid}
	}
	return out
}

func rowVals(vals ...*string) [][]byte {
	out := make([][]byte, len(vals))
	for i, v := range vals {
		if v != nil {
			out[i] = []byte(*v)
		}
	}
	return out
}

// A row read by a SELECT becomes the event the same row becomes as a replicated INSERT: the
// same columns mapping, subject, header parsing and timestamp conversion.
func TestDecodeRow_SameEventAsAnInsert(t *testing.T) {
	cfg := decoder.Config{Columns: decoder.Columns{ID: "event_id", AggregateType: "kind", AggregateID: "entity", EventType: "type", Payload: "body", Headers: "meta", CreatedAt: "at"}}
	cols := []col{{"tenant", 25}, {"event_id", 2950}, {"kind", 25}, {"entity", 25}, {"type", 25}, {"body", 17}, {"meta", 3802}, {"at", 1184}}
	vals := []*string{s("t1"), s("0b5a4c1e-0000-4000-8000-000000000001"), s("order"), s("42"), s("Order.Created"),
		s(`\x7b7d`), s(`{"traceparent": "00-abc-def-01"}`), s("2026-11-26 13:50:57.123456+00")}

	rep := decoder.New(cfg)
	decodeAll(t, rep, relation(1, "public", "outbox", cols...), begin(0x100))
	ch, err := rep.Decode(insert(1, vals...))
	require.NoError(t, err)
	want := *ch.Event

	d := decoder.New(cfg)
	require.NoError(t, d.SetRowColumns(rowCols(cols...)))
	got, err := d.DecodeRow(rowVals(vals...), 0x100, 0)
	require.NoError(t, err)
	require.Equal(t, want, *got)
	require.Equal(t, "{}", string(got.Payload), "bytea decoded")
	require.Equal(t, "outbox.order.Order_Created", string(got.Subject))
	require.Equal(t, "2026-11-26T13:50:57.123456Z", string(got.CreatedAt))

	got, err = d.DecodeRow(rowVals(s("t1"), s("id-2"), s("order"), s("42"), s("Paid"), s(`\x`), nil, nil), 0x200, 3)
	require.NoError(t, err)
	require.Equal(t, pglogrepl.LSN(0x200), got.CommitLSN)
	require.Equal(t, 3, got.TxIndex)
	require.Empty(t, got.Headers)
	require.Empty(t, got.CreatedAt)
	require.False(t, d.InTransaction(), "DecodeRow opens no transaction")
}

// A row that cannot become an event fails with the words the replication stream's would.
func TestDecodeRow_PoisonAsAnInsert(t *testing.T) {
	for name, vals := range map[string][]*string{
		"null id":         {nil, s("a"), s("1"), s("E"), s("{}"), nil, nil},
		"null payload":    {s("i"), s("a"), s("1"), s("E"), nil, nil, nil},
		"headers invalid": {s("i"), s("a"), s("1"), s("E"), s("{}"), s("{bad"), nil},
		"bad created_at":  {s("i"), s("a"), s("1"), s("E"), s("{}"), nil, s("yesterday")},
	} {
		t.Run(name, func(t *testing.T) {
			rep := decoder.New(decoder.Config{})
			decodeAll(t, rep, relation(1, "public", "outbox", outboxCols...), begin(0xABC))
			_, want := rep.Decode(insert(1, vals...))
			require.Error(t, want)

			d := decoder.New(decoder.Config{})
			require.NoError(t, d.SetRowColumns(rowCols(outboxCols...)))
			_, err := d.DecodeRow(rowVals(vals...), 0xABC, 0)
			var poison *decoder.PoisonError
			require.True(t, errors.As(err, &poison), "%v", err)
			require.Equal(t, pglogrepl.LSN(0xABC), poison.CommitLSN)
			require.Equal(t, want.Error(), err.Error())
		})
	}
}

func TestDecodeRow_ColumnsCheckedAsARelation(t *testing.T) {
	d := decoder.New(decoder.Config{})
	_, err := d.DecodeRow(rowVals(s("i")), 1, 0)
	require.ErrorContains(t, err, "before SetRowColumns")
	require.ErrorContains(t, d.SetRowColumns(rowCols(col{"id", 2950}, col{"payload", 3802})), `outbox table public.outbox has no column "aggregate_type"`)
	require.ErrorContains(t, d.SetRowColumns(rowCols(col{"id", 2950}, col{"aggregate_type", 25}, col{"aggregate_id", 25}, col{"event_type", 25}, col{"payload", 23})),
		"outbox column public.outbox.payload has type oid 23; use text, json, jsonb or bytea")
	require.NoError(t, d.SetRowColumns(rowCols(outboxCols...)))
	_, err = d.DecodeRow(rowVals(s("i"), s("a")), 1, 0)
	require.ErrorContains(t, err, "has 2 columns, SetRowColumns declared 7")
}

// A row decoded between a transaction's inserts leaves the transaction's numbering alone.
func TestDecodeRow_LeavesTheTransactionAlone(t *testing.T) {
	d := decoder.New(decoder.Config{})
	require.NoError(t, d.SetRowColumns(rowCols(outboxCols...)))
	decodeAll(t, d, relation(1, "public", "outbox", outboxCols...), begin(0x100))
	_, err := d.Decode(insert(1, s("i1"), s("a"), s("1"), s("E"), s("{}"), nil, nil))
	require.NoError(t, err)
	_, err = d.DecodeRow(rowVals(s("r"), s("a"), s("1"), s("E"), s("{}"), nil, nil), 0x50, 0)
	require.NoError(t, err)
	ch, err := d.Decode(insert(1, s("i2"), s("a"), s("1"), s("E"), s("{}"), nil, nil))
	require.NoError(t, err)
	require.Equal(t, 1, ch.Event.TxIndex)
	require.Equal(t, pglogrepl.LSN(0x100), ch.Event.CommitLSN)
}

// Begin carries the transaction's commit time (microseconds since 2000-01-01 UTC).
func TestDecode_BeginCommitTime(t *testing.T) {
	at := time.Date(2026, 11, 26, 13, 50, 57, 123456000, time.UTC)
	us := at.Sub(time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)).Microseconds()
	d := decoder.New(decoder.Config{})
	ch, err := d.Decode(msg{'B'}.u64(0x100).u64(uint64(us)).u32(7))
	require.NoError(t, err)
	require.Equal(t, decoder.Begin, ch.Kind)
	require.True(t, at.Equal(ch.CommitTime), "%s", ch.CommitTime)
}
