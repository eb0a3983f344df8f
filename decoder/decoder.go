// Package decoder turns pgoutput logical replication messages (protocol version 1) into outbox
// events.
//
// A Decoder is fed the payload of every XLogData message in order. It keeps the relation cache
// (Relation messages carry the column layout of a table, found again by name each time so that
// added or reordered columns keep working) and the position of the current transaction. Only
// INSERTs into the configured outbox table become events; UPDATE, DELETE and TRUNCATE are
// ignored, and so are rows of other tables.
//
// Protocol reference: https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html
package decoder

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
)

// Columns names the outbox table's columns that carry the event. ID, AggregateType,
// AggregateID, EventType and Payload are required; Headers and CreatedAt are optional (empty
// name: not used).
type Columns struct {
	ID            string
	AggregateType string
	AggregateID   string
	EventType     string
	Payload       string
	Headers       string
	CreatedAt     string
}

// DefaultColumns is the layout of the table created by migrations.
var DefaultColumns = Columns{
	ID:            "id",
	AggregateType: "aggregate_type",
	AggregateID:   "aggregate_id",
	EventType:     "event_type",
	Payload:       "payload",
	Headers:       "headers",
	CreatedAt:     "created_at",
}

// Config selects the outbox table and how its rows become events.
type Config struct {
	// Schema and Table name the outbox table (default public.outbox).
	Schema, Table string
	// Columns maps the table's columns; zero value means DefaultColumns.
	Columns Columns
	// SubjectPrefix is the first subject token (default "outbox").
	SubjectPrefix string
	// MessagePrefix, when set, turns transactional logical decoding messages
	// (pg_logical_emit_message(true, MessagePrefix, json)) into events too; the replication
	// stream must be started with messages 'true'. See decodeMessage for the content.
	MessagePrefix string
	// Subject, when set, builds each subject instead of <prefix>.<aggregate_type>.<event_type>.
	Subject *SubjectTemplate
	// Tables, when set, are several outbox tables, each with its own columns and subject;
	// Schema, Table, Columns and Subject above are then not used. Event.Table is the index
	// of an event's table here.
	Tables []Table
}

// Table is one of several outbox tables (Config.Tables).
type Table struct {
	Schema, Table string
	Columns       Columns          // zero value: DefaultColumns
	Subject       *SubjectTemplate // nil: <prefix>.<aggregate_type>.<event_type>
}

// Event is one outbox row. Every byte slice aliases either the message passed to Decode or the
// Decoder's scratch space: it is valid only until the next call to Decode. Whoever keeps an
// event past that copies it.
type Event struct {
	ID            []byte
	AggregateType []byte
	AggregateID   []byte
	EventType     []byte
	Subject       []byte // <prefix>.<aggregate_type>.<event_type>, tokens sanitized
	Payload       []byte // the payload column exactly as Postgres sent it
	CreatedAt     []byte // RFC 3339, empty when the table has no created_at column or it is NULL
	Headers       []Header
	// CommitLSN is the start of the transaction's commit record (BeginMessage.FinalLSN); it is
	// the same for every event of a transaction and orders transactions.
	CommitLSN pglogrepl.LSN
	// TxIndex is the 0-based position of the event among the transaction's events (of every
	// outbox table).
	TxIndex int
	// Table is the index of the event's outbox table in Config.Tables (0 without them).
	Table int
}

// Header is one string entry of the headers JSON column.
type Header struct {
	Key, Value string
}

// Kind says what a decoded message means to the relay.
type Kind uint8

const (
	// Skip: nothing for the relay (relation, type, origin, ignored rows).
	Skip Kind = iota
	// Begin: a transaction opened.
	Begin
	// Insert: Change.Event holds an outbox event.
	Insert
	// Commit: the transaction ended at Change.CommitEnd.
	Commit
	// NonTransactional: a non-transactional logical decoding message with the configured
	// prefix. It is not part of any transaction (it is decoded when written, even if its
	// transaction later rolls back), so it is not published; the relay warns.
	NonTransactional
	// Poison: returned with a *PoisonError for an outbox row that cannot become an event;
	// Change.Event holds what could be read (CommitLSN and TxIndex always, ID if any).
	Poison
)

// Change is the meaning of one pgoutput message.
type Change struct {
	Kind  Kind
	Event *Event // Insert only; points into the Decoder, valid until the next Decode
	// CommitEnd is CommitMessage.TransactionEndLSN (Commit only): the position to confirm once
	// every event of the transaction, and of all earlier ones, is stored by the broker.
	CommitEnd pglogrepl.LSN
	// CommitTime is the transaction's commit timestamp (Begin only).
	CommitTime time.Time
}

// Decoder holds the relation cache and the current transaction. It is not safe for concurrent
// use: one replication loop owns it.
type Decoder struct {
	cfg       Config
	tables    []Table // Config.Tables, or the one table of Config
	relations map[uint32]*relation

	inTx      bool
	commitLSN pglogrepl.LSN
	txIndex   int

	ev       Event
	cols     []column
	subject  []byte
	created  []byte
	payload  []byte
	Ignored  int // rows of the outbox table that were not inserts (UPDATE/DELETE/TRUNCATE)
	Messages int // logical decoding messages seen (events only with Config.MessagePrefix)
	// Foreign counts inserts into other relations than the outbox table that the publication
	// sent (a renamed outbox table, the partitions of a partitioned one published without
	// publish_via_partition_root, another table added to the publication): none is published.
	Foreign uint64
	// OnForeign, when set, is called at the first such insert of each relation in a session.
	OnForeign func(schema, table string)
	msg       messageContent
	row       *relation // the columns of DecodeRow's rows (SetRowColumns)
}

type relation struct {
	id        uint32
	namespace string
	name      string
	outbox    bool
	tbl       int  // index in Decoder.tables of an outbox relation
	reported  bool // a foreign relation's first insert was reported (OnForeign)
	// indexes into the tuple; -1 when the optional column is absent
	idCol, aggType, aggID, evType, payload, headers, createdAt int
	payloadType                                                uint32
	ncols                                                      int
}

// New returns a Decoder for cfg, filling defaults.
func New(cfg Config) *Decoder {
	if cfg.Schema == "" {
		cfg.Schema = "public"
	}
	if cfg.Table == "" {
		cfg.Table = "outbox"
	}
	if cfg.Columns == (Columns{}) {
		cfg.Columns = DefaultColumns
	}
	if cfg.SubjectPrefix == "" {
		cfg.SubjectPrefix = "outbox"
	}
	tables := append([]Table(nil), cfg.Tables...)
	if len(tables) == 0 {
		tables = []Table{{Schema: cfg.Schema, Table: cfg.Table, Columns: cfg.Columns, Subject: cfg.Subject}}
	}
	for i := range tables {
		if tables[i].Schema == "" {
			tables[i].Schema = "public"
		}
		if tables[i].Columns == (Columns{}) {
			tables[i].Columns = DefaultColumns
		}
	}
	return &Decoder{cfg: cfg, tables: tables, relations: make(map[uint32]*relation)}
}

// tableOf is the index of schema.table among the outbox tables, -1 for another relation.
func (d *Decoder) tableOf(schema, table string) int {
	for i, t := range d.tables {
		if t.Schema == schema && t.Table == table {
			return i
		}
	}
	return -1
}

// pgEpoch is the origin of Postgres timestamps in the replication protocol.
var pgEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// pgTime is a protocol timestamp (microseconds since pgEpoch).
func pgTime(us uint64) time.Time {
	return pgEpoch.Add(time.Duration(int64(us)) * time.Microsecond)
}

// InTransaction reports whether a Begin was decoded without its Commit yet.
func (d *Decoder) InTransaction() bool { return d.inTx }

// Reset forgets the current transaction (after a reconnect the server resends it whole). The
// relation cache is dropped too: the server sends Relation messages again on a new session.
func (d *Decoder) Reset() {
	d.inTx = false
	d.txIndex = 0
	clear(d.relations)
}

// Decode interprets one pgoutput message (the WALData of an XLogData).
func (d *Decoder) Decode(data []byte) (Change, error) {
	if len(data) == 0 {
		return Change{}, errors.New("empty pgoutput message")
	}
	r := reader{buf: data, off: 1}
	switch data[0] {
	case tagBegin:
		final := pglogrepl.LSN(r.u64())
		commitTime := r.u64()
		r.u32() // xid
		if r.err != nil {
			return Change{}, fmt.Errorf("decode Begin: %w", r.err)
		}
		if d.inTx {
			return Change{}, fmt.Errorf("Begin of transaction %s inside open transaction %s", final, d.commitLSN)
		}
		d.inTx, d.commitLSN, d.txIndex = true, final, 0
		return Change{Kind: Begin, CommitTime: pgTime(commitTime)}, nil
	case tagCommit:
		r.u8() // flags
		commit := pglogrepl.LSN(r.u64())
		end := pglogrepl.LSN(r.u64())
		r.u64() // commit time
		if r.err != nil {
			return Change{}, fmt.Errorf("decode Commit: %w", r.err)
		}
		if !d.inTx {
			return Change{}, fmt.Errorf("Commit %s without Begin", commit)
		}
		if commit != d.commitLSN {
			return Change{}, fmt.Errorf("out of order commit %s, expected %s", commit, d.commitLSN)
		}
		d.inTx = false
		return Change{Kind: Commit, CommitEnd: end}, nil
	case tagRelation:
		return Change{}, d.decodeRelation(&r)
	case tagInsert:
		return d.decodeInsert(&r)
	case tagUpdate, tagDelete, tagTruncate:
		d.Ignored++
		return Change{}, nil
	case tagMessage:
		d.Messages++
		return d.decodeMessage(&r)
	case tagType, tagOrigin:
		return Change{}, nil
	default:
		// Stream Start/Stop/Commit/Abort and two-phase messages only appear when the relay
		// asks for them (it does not): treat them as a protocol error rather than guess.
		return Change{}, fmt.Errorf("unexpected pgoutput message %q", data[0])
	}
}

func (d *Decoder) decodeRelation(r *reader) error {
	rel := &relation{id: r.u32()}
	rel.namespace = string(r.cstring())
	rel.name = string(r.cstring())
	r.u8() // replica identity
	n := int(r.u16())
	if r.err != nil {
		return fmt.Errorf("decode Relation: %w", r.err)
	}
	rel.ncols = n
	rel.tbl = d.tableOf(rel.namespace, rel.name)
	rel.outbox = rel.tbl >= 0
	var cols []RowColumn
	for i := 0; i < n; i++ {
		r.u8() // flags
		name := r.cstring()
		typ := r.u32()
		r.u32() // type modifier
		if r.err != nil {
			return fmt.Errorf("decode Relation %s.%s column %d: %w", rel.namespace, rel.name, i, r.err)
		}
		if rel.outbox {
			cols = append(cols, RowColumn{Name: string(name), TypeOID: typ})
		}
	}
	if err := d.mapColumns(rel, cols); err != nil {
		return err
	}
	d.relations[rel.id] = rel
	return nil
}

// mapColumns finds the configured columns among an outbox relation's columns (nothing for
// another relation) and checks that the required ones are there with a payload type the
// relay reads.
func (d *Decoder) mapColumns(rel *relation, cols []RowColumn) error {
	rel.idCol, rel.aggType, rel.aggID, rel.evType, rel.payload, rel.headers, rel.createdAt = -1, -1, -1, -1, -1, -1, -1
	if !rel.outbox {
		return nil
	}
	c := d.tables[rel.tbl].Columns
	for i, col := range cols {
		name, typ := col.Name, col.TypeOID
		switch name {
		case c.ID:
			rel.idCol = i
		case c.AggregateType:
			rel.aggType = i
		case c.AggregateID:
			rel.aggID = i
		case c.EventType:
			rel.evType = i
		case c.Payload:
			rel.payload, rel.payloadType = i, typ
		}
		// Optional columns may share a name with nothing above; check separately so an empty
		// optional name never matches.
		if c.Headers != "" && name == c.Headers {
			rel.headers = i
		}
		if c.CreatedAt != "" && name == c.CreatedAt {
			rel.createdAt = i
		}
	}
	for _, req := range []struct {
		idx  int
		name string
	}{{rel.idCol, c.ID}, {rel.aggType, c.AggregateType}, {rel.aggID, c.AggregateID}, {rel.evType, c.EventType}, {rel.payload, c.Payload}} {
		if req.idx < 0 {
			return fmt.Errorf("outbox table %s.%s has no column %q (map it with Config.Columns or add it)", rel.namespace, rel.name, req.name)
		}
	}
	switch rel.payloadType {
	case oidText, oidVarchar, oidJSON, oidJSONB, oidBytea:
	default:
		return fmt.Errorf("outbox column %s.%s.%s has type oid %d; use text, json, jsonb or bytea", rel.namespace, rel.name, c.Payload, rel.payloadType)
	}
	return nil
}

// RowColumn is a column of outbox rows read by other means than replication (a SELECT of the
// table, as the backfill does): its name and type OID.
type RowColumn struct {
	Name    string
	TypeOID uint32
}

// SetRowColumns declares the columns of the rows DecodeRow reads, in their order, from the
// outbox table (Config.Schema and Config.Table, or the first of Config.Tables). It checks them
// as a Relation message's.
func (d *Decoder) SetRowColumns(cols []RowColumn) error {
	t := d.tables[0]
	rel := &relation{namespace: t.Schema, name: t.Table, outbox: true, ncols: len(cols)}
	if err := d.mapColumns(rel, cols); err != nil {
		return err
	}
	d.row = rel
	return nil
}

// DecodeRow turns one outbox row into an event, as an INSERT the replication stream sent:
// vals are the columns SetRowColumns declared, in each type's text output (the bytes pgoutput
// sends), nil for NULL. The event is at commitLSN and txIndex; it is valid until the next call
// to Decode or DecodeRow. A row that cannot become an event returns a *PoisonError, with
// the same words as from the replication stream. It neither needs nor changes the current
// transaction.
func (d *Decoder) DecodeRow(vals [][]byte, commitLSN pglogrepl.LSN, txIndex int) (*Event, error) {
	rel := d.row
	if rel == nil {
		return nil, errors.New("DecodeRow before SetRowColumns")
	}
	if len(vals) != rel.ncols {
		return nil, fmt.Errorf("row of %s.%s has %d columns, SetRowColumns declared %d", rel.namespace, rel.name, len(vals), rel.ncols)
	}
	d.cols = d.cols[:0]
	for _, v := range vals {
		col := column{kind: 't', data: v}
		if v == nil {
			col.kind = 'n'
		}
		d.cols = append(d.cols, col)
	}
	ch, err := d.event(rel, commitLSN, txIndex)
	return ch.Event, err
}

// Type OIDs the payload column may have.
const (
	oidBytea   = 17
	oidText    = 25
	oidJSON    = 114
	oidVarchar = 1043
	oidJSONB   = 3802
)

func (d *Decoder) decodeInsert(r *reader) (Change, error) {
	relID := r.u32()
	if r.u8() != 'N' && r.err == nil {
		return Change{}, errors.New("decode Insert: missing new tuple marker")
	}
	if r.err != nil {
		return Change{}, fmt.Errorf("decode Insert: %w", r.err)
	}
	rel, ok := d.relations[relID]
	if !ok {
		return Change{}, fmt.Errorf("Insert for relation %d before its Relation message", relID)
	}
	if !d.inTx {
		return Change{}, fmt.Errorf("Insert into %s.%s outside a transaction", rel.namespace, rel.name)
	}
	if !rel.outbox {
		d.Foreign++
		if !rel.reported && d.OnForeign != nil {
			rel.reported = true
			d.OnForeign(rel.namespace, rel.name)
		}
		return Change{}, nil
	}
	n := int(r.u16())
	if r.err == nil && n != rel.ncols {
		return Change{}, fmt.Errorf("Insert into %s.%s has %d columns, Relation said %d", rel.namespace, rel.name, n, rel.ncols)
	}
	d.cols = d.cols[:0]
	for i := 0; i < n && r.err == nil; i++ {
		col := column{kind: r.u8()}
		switch col.kind {
		case 'n', 'u':
		case 't', 'b':
			col.data = r.bytes(int(int32(r.u32())))
		default:
			if r.err == nil {
				return Change{}, fmt.Errorf("decode Insert: unknown tuple kind %q", col.kind)
			}
		}
		d.cols = append(d.cols, col)
	}
	if r.err != nil {
		return Change{}, fmt.Errorf("decode Insert into %s.%s: %w", rel.namespace, rel.name, r.err)
	}
	idx := d.txIndex
	d.txIndex++
	return d.event(rel, d.commitLSN, idx)
}

// event reads the event of an outbox row from d.cols (the columns of rel), at commitLSN and
// idx.
func (d *Decoder) event(rel *relation, commitLSN pglogrepl.LSN, idx int) (Change, error) {
	ev := &d.ev
	*ev = Event{CommitLSN: commitLSN, TxIndex: idx, Table: rel.tbl, Headers: ev.Headers[:0]}
	poison := func(format string, args ...any) (Change, error) {
		// The row is consumed (the decoder stays in step); what is known of it goes back
		// with the error so a dead-letter policy can publish it.
		if pc := d.cols[rel.payload]; pc.kind == 't' && ev.Payload == nil {
			ev.Payload = pc.data
		}
		return Change{Kind: Poison, Event: ev}, Poisonf(commitLSN, idx, string(ev.ID), "outbox row cannot become an event: row %d of transaction committed at %s (id %q): %s",
			idx, commitLSN, ev.ID, fmt.Sprintf(format, args...))
	}
	c := &d.tables[rel.tbl].Columns
	get := func(i int) column { return d.cols[i] }
	for _, f := range []struct {
		dst  *[]byte
		idx  int
		name string
	}{{&ev.ID, rel.idCol, c.ID}, {&ev.AggregateType, rel.aggType, c.AggregateType}, {&ev.AggregateID, rel.aggID, c.AggregateID}, {&ev.EventType, rel.evType, c.EventType}} {
		col := get(f.idx)
		if col.kind == 'u' {
			return poison("column %s is an unchanged TOAST value in an INSERT", f.name)
		}
		*f.dst = col.data
		if col.kind == 'n' || len(col.data) == 0 {
			return poison("column %s is NULL or empty", f.name)
		}
	}
	pc := get(rel.payload)
	switch {
	case pc.kind == 'n':
		return poison("column %s is NULL", c.Payload)
	case pc.kind == 'u':
		return poison("column %s is an unchanged TOAST value in an INSERT", c.Payload)
	case rel.payloadType == oidBytea:
		p, err := decodeByteaHex(d.payload[:0], pc.data)
		if err != nil {
			return poison("column %s: %v", c.Payload, err)
		}
		d.payload, ev.Payload = p, p
	default:
		ev.Payload = pc.data
	}
	if rel.headers >= 0 {
		if hc := get(rel.headers); hc.kind == 't' && len(hc.data) > 0 {
			h, err := parseHeaders(ev.Headers, hc.data)
			if err != nil {
				return poison("column %s is not a JSON object: %v", c.Headers, err)
			}
			ev.Headers = h
		}
	}
	if rel.createdAt >= 0 {
		if cc := get(rel.createdAt); cc.kind == 't' {
			t, err := toRFC3339(d.created[:0], cc.data)
			if err != nil {
				return poison("column %s: %v", c.CreatedAt, err)
			}
			d.created, ev.CreatedAt = t, t
		}
	}
	d.setSubject(ev, d.tables[rel.tbl].Subject)
	return Change{Kind: Insert, Event: ev}, nil
}

// setSubject builds ev's subject with its table's template t, or
// <prefix>.<aggregate_type>.<event_type> (t nil).
func (d *Decoder) setSubject(ev *Event, t *SubjectTemplate) {
	if t != nil {
		d.subject = t.Append(d.subject[:0], ev)
	} else {
		d.subject = AppendSubject(d.subject[:0], d.cfg.SubjectPrefix, ev.AggregateType, ev.EventType)
	}
	ev.Subject = d.subject
}

// decodeByteaHex decodes Postgres' hex bytea output (\x...) into dst.
func decodeByteaHex(dst, src []byte) ([]byte, error) {
	if !bytes.HasPrefix(src, []byte(`\x`)) {
		return nil, errors.New("bytea value is not in hex format (set bytea_output = 'hex')")
	}
	src = src[2:]
	n := hex.DecodedLen(len(src))
	if cap(dst) < n {
		dst = make([]byte, n)
	}
	dst = dst[:n]
	if _, err := hex.Decode(dst, src); err != nil {
		return nil, err
	}
	return dst, nil
}

// parseHeaders appends every top-level string entry of a JSON object. Other value types are
// skipped (headers are strings); anything but an object is an error.
func parseHeaders(dst []Header, raw []byte) ([]Header, error) {
	if bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
		return dst, nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		return dst, err
	}
	for k, v := range m {
		if len(v) == 0 || v[0] != '"' {
			continue
		}
		var s string
		if err := json.Unmarshal(v, &s); err != nil {
			return dst, err
		}
		dst = append(dst, Header{Key: k, Value: s})
	}
	return dst, nil
}

// toRFC3339 converts Postgres' ISO timestamp output ("2026-11-26 13:50:57.123456+00", or
// without offset for timestamp without time zone, read as UTC) to RFC 3339 in UTC with
// microseconds. The common shape is parsed by hand (no allocation, a tenth of time.Parse's
// cost: it runs once per event); anything else (offsets with seconds, years beyond 9999, BC)
// goes through time.Parse.
func toRFC3339(dst, src []byte) ([]byte, error) {
	if t, ok := parseISOTimestamp(src); ok {
		return appendRFC3339Micro(dst, t), nil
	}
	s := string(src)
	for _, layout := range []string{"2006-01-02 15:04:05.999999999Z07:00:00", "2006-01-02 15:04:05.999999999Z07:00", "2006-01-02 15:04:05.999999999Z07", "2006-01-02 15:04:05.999999999"} {
		if t, err := time.Parse(layout, s); err == nil {
			return t.UTC().AppendFormat(dst, rfc3339Micro), nil
		}
	}
	return dst, fmt.Errorf("unrecognised timestamp %q (the replication connection uses DateStyle ISO)", s)
}

const rfc3339Micro = "2006-01-02T15:04:05.000000Z07:00"

// appendRFC3339Micro is t.AppendFormat(dst, rfc3339Micro) for a UTC time with a 4-digit year,
// written digit by digit (AppendFormat interprets the layout on every call).
func appendRFC3339Micro(dst []byte, t time.Time) []byte {
	year, month, day := t.Date()
	if year < 1 || year > 9999 {
		return t.AppendFormat(dst, rfc3339Micro)
	}
	hour, minute, sec := t.Clock()
	dst = appendDigits(dst, year, 4)
	dst = append(dst, '-')
	dst = appendDigits(dst, int(month), 2)
	dst = append(dst, '-')
	dst = appendDigits(dst, day, 2)
	dst = append(dst, 'T')
	dst = appendDigits(dst, hour, 2)
	dst = append(dst, ':')
	dst = appendDigits(dst, minute, 2)
	dst = append(dst, ':')
	dst = appendDigits(dst, sec, 2)
	dst = append(dst, '.')
	dst = appendDigits(dst, t.Nanosecond()/1000, 6)
	return append(dst, 'Z')
}

// appendDigits appends v zero-padded to n digits (v < 10^n).
func appendDigits(dst []byte, v, n int) []byte {
	var buf [9]byte
	for i := n - 1; i >= 0; i-- {
		buf[i] = byte('0' + v%10)
		v /= 10
	}
	return append(dst, buf[:n]...)
}

// parseISOTimestamp parses "YYYY-MM-DD HH:MM:SS[.f{1,9}][(+|-)HH[:MM]]" and returns it in UTC.
// ok is false for any other shape, and for out-of-range fields (left to time.Parse, which
// reports them).
func parseISOTimestamp(b []byte) (t time.Time, ok bool) {
	if len(b) < 19 || b[4] != '-' || b[7] != '-' || b[10] != ' ' || b[13] != ':' || b[16] != ':' {
		return t, false
	}
	num := func(i, n int) int {
		v := 0
		for _, c := range b[i : i+n] {
			if c < '0' || c > '9' {
				return -1
			}
			v = v*10 + int(c-'0')
		}
		return v
	}
	year, month, day := num(0, 4), num(5, 2), num(8, 2)
	hour, minute, sec := num(11, 2), num(14, 2), num(17, 2)
	if year < 1 || month < 1 || month > 12 || day < 1 || day > 31 || hour < 0 || hour > 23 || minute < 0 || minute > 59 || sec < 0 || sec > 59 {
		return t, false
	}
	i, nsec := 19, 0
	if i < len(b) && b[i] == '.' {
		i++
		digits := 0
		for ; i < len(b) && b[i] >= '0' && b[i] <= '9'; i++ {
			if digits == 9 {
				return t, false
			}
			nsec = nsec*10 + int(b[i]-'0')
			digits++
		}
		if digits == 0 {
			return t, false
		}
		for ; digits < 9; digits++ {
			nsec *= 10
		}
	}
	offset := 0
	if i < len(b) {
		sign := 1
		switch b[i] {
		case '+':
		case '-':
			sign = -1
		default:
			return t, false
		}
		rest := b[i+1:]
		switch {
		case len(rest) == 2:
			offset = num(i+1, 2) * 3600
		case len(rest) == 5 && rest[2] == ':':
			offset = num(i+1, 2)*3600 + num(i+4, 2)*60
		default:
			return t, false
		}
		if offset < 0 || offset >= 24*3600 {
			return t, false
		}
		offset *= sign
	}
	t = time.Date(year, time.Month(month), day, hour, minute, sec, nsec, time.UTC)
	if t.Day() != day { // February 30th and the like: let time.Parse report it
		return time.Time{}, false
	}
	return t.Add(-time.Duration(offset) * time.Second), true
}
