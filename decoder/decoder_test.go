package decoder_test

import (
	"encoding/binary"
	"testing"

	"github.com/jackc/pglogrepl"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/decoder"
)

// msg builds pgoutput messages for tests.
type msg []byte

func (m msg) u8(b byte) msg     { return append(m, b) }
func (m msg) u16(v uint16) msg  { return binary.BigEndian.AppendUint16(m, v) }
func (m msg) u32(v uint32) msg  { return binary.BigEndian.AppendUint32(m, v) }
func (m msg) u64(v uint64) msg  { return binary.BigEndian.AppendUint64(m, v) }
func (m msg) str(s string) msg  { return append(append(m, s...), 0) }
func (m msg) text(s string) msg { return append(msg(append(m, 't')).u32(uint32(len(s))), s...) }
func (m msg) null() msg         { return append(m, 'n') }

func begin(final uint64) []byte { return msg{'B'}.u64(final).u64(0).u32(7) }
func commit(commitLSN, end uint64) []byte {
	return msg{'C'}.u8(0).u64(commitLSN).u64(end).u64(0)
}

type col struct {
	name string
	oid  uint32
}

func relation(id uint32, ns, name string, cols ...col) []byte {
	m := msg{'R'}.u32(id).str(ns).str(name).u8('d').u16(uint16(len(cols)))
	for _, c := range cols {
		m = m.u8(0).str(c.name).u32(c.oid).u32(0xffffffff)
	}
	return m
}

// insert builds an Insert; a nil value is NULL.
func insert(rel uint32, vals ...*string) []byte {
	m := msg{'I'}.u32(rel).u8('N').u16(uint16(len(vals)))
	for _, v := range vals {
		if v == nil {
			m = m.null()
		} else {
			m = m.text(*v)
		}
	}
	return m
}

func s(v string) *string { return &v }

var outboxCols = []col{{"id", 2950}, {"aggregate_type", 25}, {"aggregate_id", 25}, {"event_type", 25}, {"payload", 3802}, {"headers", 3802}, {"created_at", 1184}}

func decodeAll(t *testing.T, d *decoder.Decoder, msgs ...[]byte) []decoder.Change {
	t.Helper()
	var out []decoder.Change
	for _, m := range msgs {
		ch, err := d.Decode(m)
		require.NoError(t, err)
		out = append(out, ch)
	}
	return out
}

func TestDecode_InsertBecomesEvent(t *testing.T) {
	d := decoder.New(decoder.Config{})
	chs := decodeAll(t, d,
		relation(16384, "public", "outbox", outboxCols...),
		begin(0x100),
	)
	require.Equal(t, decoder.Begin, chs[1].Kind)
	ch, err := d.Decode(insert(16384, s("0b5a4c1e-0000-4000-8000-000000000001"), s("order"), s("42"), s("Order.Created"),
		s(`{"total": 10}`), s(`{"traceparent": "00-abc-def-01", "n": 3, "x": null}`), s("2026-11-26 13:50:57.123456+00")))
	require.NoError(t, err)
	require.Equal(t, decoder.Insert, ch.Kind)
	ev := ch.Event
	require.Equal(t, "0b5a4c1e-0000-4000-8000-000000000001", string(ev.ID))
	require.Equal(t, "outbox.order.Order_Created", string(ev.Subject))
	require.Equal(t, `{"total": 10}`, string(ev.Payload))
	require.Equal(t, "42", string(ev.AggregateID))
	require.Equal(t, "2026-11-26T13:50:57.123456Z", string(ev.CreatedAt))
	require.Equal(t, []decoder.Header{{Key: "traceparent", Value: "00-abc-def-01"}}, ev.Headers)
	require.Equal(t, pglogrepl.LSN(0x100), ev.CommitLSN)
	require.Equal(t, 0, ev.TxIndex)

	ch, err = d.Decode(insert(16384, s("id-2"), s("order"), s("42"), s("Paid"), s(`{}`), nil, s("2026-11-26 13:50:57+00")))
	require.NoError(t, err)
	require.Equal(t, 1, ch.Event.TxIndex)
	require.Empty(t, ch.Event.Headers)
	require.Equal(t, "2026-11-26T13:50:57.000000Z", string(ch.Event.CreatedAt))

	ch, err = d.Decode(commit(0x100, 0x180))
	require.NoError(t, err)
	require.Equal(t, decoder.Commit, ch.Kind)
	require.Equal(t, pglogrepl.LSN(0x180), ch.CommitEnd)
}

func TestDecode_ColumnsFoundByNameInAnyOrderWithExtraColumns(t *testing.T) {
	d := decoder.New(decoder.Config{})
	decodeAll(t, d,
		relation(1, "public", "outbox", col{"tenant", 25}, col{"payload", 3802}, col{"event_type", 25}, col{"id", 2950}, col{"aggregate_id", 25}, col{"aggregate_type", 25}),
		begin(1))
	ch, err := d.Decode(insert(1, s("t1"), s(`{"a":1}`), s("Created"), s("id-1"), s("7"), s("user")))
	require.NoError(t, err)
	require.Equal(t, "id-1", string(ch.Event.ID))
	require.Equal(t, "outbox.user.Created", string(ch.Event.Subject))
	require.Empty(t, ch.Event.CreatedAt)

	// ALTER TABLE: a new Relation message replaces the layout.
	decodeAll(t, d, relation(1, "public", "outbox", col{"id", 2950}, col{"aggregate_type", 25}, col{"aggregate_id", 25}, col{"event_type", 25}, col{"payload", 25}))
	ch, err = d.Decode(insert(1, s("id-2"), s("user"), s("7"), s("Renamed"), s("plain text")))
	require.NoError(t, err)
	require.Equal(t, "plain text", string(ch.Event.Payload))
}

func TestDecode_IgnoresOtherTablesAndNonInserts(t *testing.T) {
	d := decoder.New(decoder.Config{})
	decodeAll(t, d, relation(1, "public", "outbox", outboxCols...), relation(2, "public", "orders", col{"id", 23}), begin(1))
	ch, err := d.Decode(insert(2, s("5")))
	require.NoError(t, err)
	require.Equal(t, decoder.Skip, ch.Kind)
	for _, m := range [][]byte{msg{'U'}.u32(1), msg{'D'}.u32(1), msg{'T'}.u32(1), msg{'Y'}, msg{'O'}} {
		ch, err := d.Decode(m)
		require.NoError(t, err)
		require.Equal(t, decoder.Skip, ch.Kind)
	}
	require.Equal(t, 3, d.Ignored)
}

func TestDecode_MissingRequiredColumnFailsClosed(t *testing.T) {
	d := decoder.New(decoder.Config{})
	_, err := d.Decode(relation(1, "public", "outbox", col{"id", 2950}, col{"payload", 3802}))
	require.ErrorContains(t, err, `no column "aggregate_type"`)
	_, err = d.Decode(relation(1, "public", "outbox", col{"id", 2950}, col{"aggregate_type", 25}, col{"aggregate_id", 25}, col{"event_type", 25}, col{"payload", 23}))
	require.ErrorContains(t, err, "use text, json, jsonb or bytea")
}

func TestDecode_PoisonRows(t *testing.T) {
	for name, vals := range map[string][]*string{
		"null id":         {nil, s("a"), s("1"), s("E"), s("{}"), nil, nil},
		"empty id":        {s(""), s("a"), s("1"), s("E"), s("{}"), nil, nil},
		"headers array":   {s("i"), s("a"), s("1"), s("E"), s("{}"), s("[1]"), nil},
		"headers invalid": {s("i"), s("a"), s("1"), s("E"), s("{}"), s("{bad"), nil},
	} {
		t.Run(name, func(t *testing.T) {
			d := decoder.New(decoder.Config{})
			decodeAll(t, d, relation(1, "public", "outbox", outboxCols...), begin(0xABC))
			_, err := d.Decode(insert(1, vals...))
			var poison *decoder.PoisonError
			require.ErrorAs(t, err, &poison)
			require.Equal(t, pglogrepl.LSN(0xABC), poison.CommitLSN)
			require.ErrorContains(t, err, "0/ABC")
		})
	}
}

func TestDecode_ByteaPayload(t *testing.T) {
	d := decoder.New(decoder.Config{})
	decodeAll(t, d, relation(1, "public", "outbox", col{"id", 25}, col{"aggregate_type", 25}, col{"aggregate_id", 25}, col{"event_type", 25}, col{"payload", 17}), begin(1))
	ch, err := d.Decode(insert(1, s("i"), s("a"), s("1"), s("E"), s(`\x7b7d`)))
	require.NoError(t, err)
	require.Equal(t, "{}", string(ch.Event.Payload))
}

func TestDecode_ProtocolErrors(t *testing.T) {
	d := decoder.New(decoder.Config{})
	_, err := d.Decode(commit(1, 2))
	require.ErrorContains(t, err, "without Begin")
	decodeAll(t, d, begin(5))
	_, err = d.Decode(commit(6, 7))
	require.ErrorContains(t, err, "out of order commit")
	_, err = d.Decode(insert(99, s("x")))
	require.ErrorContains(t, err, "before its Relation")
	_, err = d.Decode([]byte{'I', 0, 0})
	require.Error(t, err)
	_, err = d.Decode([]byte{'S'})
	require.ErrorContains(t, err, "unexpected pgoutput message")
}

func FuzzDecode(f *testing.F) {
	f.Add(relation(1, "public", "outbox", outboxCols...))
	f.Add(insert(1, s("i"), s("a"), s("1"), s("E"), s("{}"), nil, nil))
	f.Add(begin(1))
	f.Add(commit(1, 2))
	f.Fuzz(func(t *testing.T, data []byte) {
		d := decoder.New(decoder.Config{})
		_, _ = d.Decode(relation(1, "public", "outbox", outboxCols...))
		_, _ = d.Decode(begin(1))
		_, _ = d.Decode(data) // must not panic
	})
}

func BenchmarkDecode_Insert(b *testing.B) {
	d := decoder.New(decoder.Config{})
	if _, err := d.Decode(relation(1, "public", "outbox", outboxCols...)); err != nil {
		b.Fatal(err)
	}
	payload := `{"order_id": 12345, "customer": "c-981", "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}], "total": 99.5, "currency": "EUR", "note": "` + string(make([]byte, 200)) + `"}`
	ins := insert(1, s("0b5a4c1e-0000-4000-8000-000000000001"), s("order"), s("12345"), s("OrderCreated"), s(payload), nil, s("2026-11-26 13:50:57.123456+00"))
	bg, cm := begin(1), commit(1, 2)
	b.ReportAllocs()
	b.SetBytes(int64(len(ins)))
	for i := 0; i < b.N; i++ {
		if i%100 == 0 {
			if _, err := d.Decode(bg); err != nil {
				b.Fatal(err)
			}
		}
		if _, err := d.Decode(ins); err != nil {
			b.Fatal(err)
		}
		if i%100 == 99 {
			if _, err := d.Decode(cm); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// The same insert with a four-part --subject-template: the subject is still built without
// allocating.
func BenchmarkDecode_InsertSubjectTemplate(b *testing.B) {
	tmpl, err := decoder.ParseSubjectTemplate("{prefix}.{aggregate_type}.{aggregate_id}.{event_type}", "outbox")
	if err != nil {
		b.Fatal(err)
	}
	d := decoder.New(decoder.Config{Subject: tmpl})
	if _, err := d.Decode(relation(1, "public", "outbox", outboxCols...)); err != nil {
		b.Fatal(err)
	}
	ins := insert(1, s("0b5a4c1e-0000-4000-8000-000000000001"), s("order"), s("12345"), s("OrderCreated"), s(`{"total": 99.5}`), nil, s("2026-11-26 13:50:57.123456+00"))
	if _, err := d.Decode(begin(1)); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		ch, err := d.Decode(ins)
		if err != nil {
			b.Fatal(err)
		}
		if string(ch.Event.Subject) != "outbox.order.12345.OrderCreated" {
			b.Fatalf("subject %q", ch.Event.Subject)
		}
	}
}

// Several outbox tables: each row is read with its own table's columns and subject, the
// transaction index runs across the tables, and a relation that is none of them is foreign.
func TestDecode_SeveralTablesEachWithItsColumnsAndSubject(t *testing.T) {
	billing, err := decoder.ParseSubjectTemplate("{prefix}.billing.{event_type}", "outbox")
	require.NoError(t, err)
	d := decoder.New(decoder.Config{Tables: []decoder.Table{
		{Schema: "orders", Table: "outbox"},
		{Schema: "billing", Table: "outbox", Subject: billing, Columns: decoder.Columns{ID: "event_id", AggregateType: "kind", AggregateID: "account", EventType: "name", Payload: "body"}},
	}})
	decodeAll(t, d,
		relation(1, "orders", "outbox", outboxCols...),
		relation(2, "billing", "outbox", col{"event_id", 25}, col{"kind", 25}, col{"account", 25}, col{"name", 25}, col{"body", 25}),
		relation(3, "public", "outbox", outboxCols...),
		begin(0x200))
	ch, err := d.Decode(insert(2, s("b-1"), s("invoice"), s("acc-1"), s("Invoiced"), s("x")))
	require.NoError(t, err)
	require.Equal(t, decoder.Insert, ch.Kind)
	require.Equal(t, "b-1", string(ch.Event.ID))
	require.Equal(t, "outbox.billing.Invoiced", string(ch.Event.Subject))
	require.Equal(t, 1, ch.Event.Table)
	require.Equal(t, 0, ch.Event.TxIndex)
	ch, err = d.Decode(insert(1, s("o-1"), s("order"), s("7"), s("Created"), s(`{}`), nil, nil))
	require.NoError(t, err)
	require.Equal(t, "outbox.order.Created", string(ch.Event.Subject))
	require.Equal(t, 0, ch.Event.Table)
	require.Equal(t, 1, ch.Event.TxIndex)
	ch, err = d.Decode(insert(3, s("p-1"), s("order"), s("7"), s("Created"), s(`{}`), nil, nil))
	require.NoError(t, err)
	require.Equal(t, decoder.Skip, ch.Kind, "public.outbox is not one of the tables")
	require.Equal(t, uint64(1), d.Foreign)
}
