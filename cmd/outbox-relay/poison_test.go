package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
	"github.com/outbox-relay/outbox-relay/sink"
)

// Poison events: an outbox row the relay cannot publish as it is. With --on-poison stop (the
// default) the relay halts with an error naming the event and the way out, confirming nothing
// from it on; restarted with --on-poison dead-letter it publishes the row (or only its
// metadata) to outbox.dead-letter in its place in the order and goes on. The table has text
// columns so that the database lets the bad rows in.
func TestRelay_PoisonEventsStopOrGoToDeadLetter(t *testing.T) {
	for _, c := range []poisonCase{
		{name: "null id", insert: `(NULL, 'order', 'p', 'Bad', '{"p": 1}', NULL)`, wantErr: `(id ""): column id is NULL or empty`, wantReason: "column id is NULL or empty", keepPayload: true},
		{name: "empty id", insert: `('', 'order', 'p', 'Bad', '{"p": 1}', NULL)`, wantErr: `column id is NULL or empty`, wantReason: "column id is NULL or empty", keepPayload: true},
		{name: "invalid headers json", insert: `('p1', 'order', 'p', 'Bad', '{"p": 1}', '{bad')`, wantErr: `(id "p1"): column headers is not a JSON object`, wantReason: "column headers is not a JSON object", keepPayload: true},
		{name: "payload over max_payload", insert: `('p1', 'order', 'p', 'Big', repeat('x', 20000), NULL)`, maxPayload: 8192, wantErr: "over the server's max_payload of 8192", wantReason: "max_payload"},
		{name: "subject over the protocol limit", insert: `('p1', repeat('a', 4000), 'p', 'Long', '{}', NULL)`, wantErr: "subject is 4012 bytes", wantReason: "subject is 4012 bytes"},
		{name: "stream rejects the message", insert: `('p1', 'order', 'p', 'Big', repeat('x', 6000), NULL)`, maxMsgSize: 4096, wantErr: "rejected by the stream", wantReason: "max_msg_size"},
		// Headers-column keys nats.go refuses (nats.ErrBadHeaderMsg on every publish).
		{name: "header key with a space", insert: `('p1', 'order', 'p', 'Bad', '{"p": 1}', '{"content type": "json", "ok": "1"}')`, wantErr: `event p1 (position`, wantReason: `headers column key "content type"`, keepPayload: true, wantDropped: "1"},
		{name: "header key with a slash", insert: `('p1', 'order', 'p', 'Bad', '{"p": 1}', '{"a/b": "x"}')`, wantErr: `headers column key "a/b" is not a valid NATS header key`, wantReason: `"a/b"`, keepPayload: true, wantDropped: "1"},
		{name: "header key with a colon", insert: `('p1', 'order', 'p', 'Bad', '{"p": 1}', '{"a:b": "x"}')`, wantErr: `"a:b"`, wantReason: `"a:b"`, keepPayload: true, wantDropped: "1"},
		{name: "header key with an at sign", insert: `('p1', 'order', 'p', 'Bad', '{"p": 1}', '{"a@b": "x"}')`, wantErr: `"a@b"`, wantReason: `"a@b"`, keepPayload: true, wantDropped: "1"},
		{name: "header key with an equals sign", insert: `('p1', 'order', 'p', 'Bad', '{"p": 1}', '{"a=b": "x"}')`, wantErr: `"a=b"`, wantReason: `"a=b"`, keepPayload: true, wantDropped: "1"},
		{name: "non-ASCII header key", insert: `('p1', 'order', 'p', 'Bad', '{"p": 1}', '{"clé": "x"}')`, wantErr: `"clé"`, wantReason: `"clé"`, keepPayload: true, wantDropped: "1"},
		{name: "empty header key", insert: `('p1', 'order', 'p', 'Bad', '{"p": 1}', '{"": "x"}')`, wantErr: `headers column key ""`, wantReason: `key ""`, keepPayload: true, wantDropped: "1"},
		{name: "header key with a line break", insert: `('p1', 'order', 'p', 'Bad', '{"p": 1}', '{"a\r\nb": "x", "c\u0000": "y"}')`, wantErr: `"a\r\nb"`, wantReason: `"a\r\nb"`, keepPayload: true, wantDropped: "2"},
		// The headers alone are over max_payload: the dead letter leaves them out to fit.
		// The stream refuses the event and then its dead letter (the headers alone are over
		// max_msg_size): the minimal dead letter goes out.
		{name: "dead letter over max_msg_size", insert: `('p1', 'order', 'p', 'Big', '{"p": 1}', (SELECT json_object_agg('h' || i, repeat('v', 600))::text FROM generate_series(1, 10) i))`, maxMsgSize: 4096, wantErr: "rejected by the stream", wantReason: "max_msg_size", wantDropped: "10"},
		// JetStream refuses headers over 64k whatever max_payload is (error 10097).
		{name: "headers over 64k", insert: `('p1', 'order', 'p', 'Big', '{"p": 1}', (SELECT json_object_agg('h' || i, repeat('v', 1000))::text FROM generate_series(1, 70) i))`, wantErr: "over the 65535 JetStream stores", wantReason: "65535"},
		{name: "headers over max_payload", insert: `('p1', 'order', 'p', 'Big', '{"p": 1}', (SELECT json_object_agg('h' || i, repeat('v', 600))::text FROM generate_series(1, 10) i))`, maxPayload: 4096, wantErr: "over the server's max_payload of 4096", wantReason: "max_payload"},
	} {
		modes := []string{"single"}
		if c.maxMsgSize > 0 {
			// Refused by the stream itself: in a fast batch the refusal ends the batch.
			modes = append(modes, "fast")
		}
		for _, mode := range modes {
			t.Run(c.name+"/"+mode, func(t *testing.T) { c.run(t, mode) })
		}
	}
}

// poisonCase is a case of TestRelay_PoisonEventsStopOrGoToDeadLetter.
type poisonCase struct {
	name        string
	insert      string // the poison row's VALUES
	maxPayload  int32
	maxMsgSize  int32
	wantErr     string // in the stop error
	wantReason  string // in the dead-letter reason header
	keepPayload bool
	wantDropped string // Outbox-Dropped-Headers of the dead letter
}

// run runs the case with --publish mode.
func (c poisonCase) run(t *testing.T, mode string) {
	pg, ns := looseOutbox(t, c.maxPayload, c.maxMsgSize, mode)
	ins := `INSERT INTO loose_outbox (id, aggregate_type, aggregate_id, event_type, payload, headers) VALUES `
	pg.Exec(t, ins+`('g1', 'order', 'g', 'Good', '{"n": 1}', NULL)`)
	pg.Exec(t, ins+c.insert)
	pg.Exec(t, ins+`('g2', 'order', 'g', 'Good', '{"n": 2}', NULL)`)
	args := []string{"run", "--pg-url", pg.URL, "--nats-url", ns.URL, "--table", "public.loose_outbox", "--log-format", "json", "--publish", mode}

	err := runToStop(t, args)
	require.Error(t, err, "the default policy stops the relay")
	require.ErrorContains(t, err, c.wantErr)
	require.ErrorContains(t, err, "--on-poison dead-letter")
	require.Contains(t, err.Error(), "committed at")
	recs := readStream(t, ns.URL, sink.DefaultStream)
	require.Len(t, recs, 1, "nothing after the poison event is published")

	stop, _ := inProcess(t, append(args, "--on-poison", "dead-letter"))
	waitStream(t, ns.URL, 3, 30*time.Second)
	require.NoError(t, stop())
	recs = readStream(t, ns.URL, sink.DefaultStream)
	require.Len(t, recs, 3, "the poison transaction was not confirmed by the stopped relay, and g1 is not stored twice")
	require.Equal(t, "g1", recs[0].Header.Get(sink.HeaderMsgID))
	dl := recs[1]
	require.Equal(t, "outbox.dead-letter", dl.Subject)
	require.Contains(t, dl.Header.Get(sink.HeaderPoisonReason), c.wantReason)
	require.NotEmpty(t, dl.Header.Get(sink.HeaderCommitLSN))
	if c.keepPayload {
		require.Equal(t, `{"p": 1}`, string(dl.Data))
	} else {
		require.Empty(t, dl.Data, "too big: metadata only")
	}
	if c.wantDropped != "" {
		require.Equal(t, c.wantDropped, dl.Header.Get(sink.HeaderDroppedHeaders))
	}
	require.Equal(t, "g2", recs[2].Header.Get(sink.HeaderMsgID))
	require.True(t, strings.HasPrefix(recs[2].Subject, "outbox.order."))
}

// Table-less mode: a malformed logical decoding message with the prefix stops the relay, or
// with --on-poison dead-letter is published to outbox.dead-letter with what could be salvaged
// of it (its id and payload, or the whole content) in its place, and the relay goes on.
func TestMessageMode_MalformedMessageStopsOrGoesToDeadLetter(t *testing.T) {
	for _, c := range []struct {
		name, content   string
		wantErr, wantID string
		wantData        string
	}{
		{name: "headers not an object", content: `{"id": "b1", "aggregate_type": "order", "aggregate_id": "1", "event_type": "Bad", "payload": {"p": 1}, "headers": [1]}`,
			wantErr: `id "b1"): headers is not a JSON object`, wantID: "b1", wantData: `{"p": 1}`},
		{name: "not json", content: `not json at all`, wantErr: "content is not the JSON object outbox_emit writes", wantID: "dead-letter:", wantData: `not json at all`},
	} {
		t.Run(c.name, func(t *testing.T) {
			pg, ns := testenv.Postgres(t), natsembed.JetStream(t)
			var out bytes.Buffer
			require.NoError(t, dispatch(context.Background(), []string{"migrate", "--source", "messages", "--pg-url", pg.URL, "--log-level", "warn"}, &out, &out, noEnv))
			pg.Exec(t, `SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')`)
			pg.Exec(t, `SELECT outbox_emit('order', 'g', 'Good', '{"n": 1}', id => '00000000-0000-4000-8000-000000000001')`)
			pg.Exec(t, `SELECT pg_logical_emit_message(true, 'outbox', $1::text)`, c.content)
			pg.Exec(t, `SELECT outbox_emit('order', 'g', 'Good', '{"n": 2}', id => '00000000-0000-4000-8000-000000000002')`)
			args := []string{"run", "--source", "messages", "--pg-url", pg.URL, "--nats-url", ns.URL, "--log-format", "json"}

			err := runToStop(t, args)
			require.Error(t, err, "the default policy stops the relay")
			require.ErrorContains(t, err, c.wantErr)
			require.ErrorContains(t, err, "--on-poison dead-letter")
			require.Len(t, readStream(t, ns.URL, sink.DefaultStream), 1)

			stop, _ := inProcess(t, append(args, "--on-poison", "dead-letter"))
			waitStream(t, ns.URL, 3, 30*time.Second)
			require.NoError(t, stop())
			recs := readStream(t, ns.URL, sink.DefaultStream)
			require.Len(t, recs, 3)
			require.Equal(t, "00000000-0000-4000-8000-000000000001", recs[0].Header.Get(sink.HeaderMsgID))
			dl := recs[1]
			require.Equal(t, "outbox.dead-letter", dl.Subject)
			require.True(t, strings.HasPrefix(dl.Header.Get(sink.HeaderMsgID), c.wantID), dl.Header.Get(sink.HeaderMsgID))
			require.Contains(t, dl.Header.Get(sink.HeaderPoisonReason), c.wantErr)
			require.Equal(t, c.wantData, string(dl.Data))
			require.Equal(t, "0", dl.Header.Get(sink.HeaderTxIndex), "its own transaction")
			require.Equal(t, "00000000-0000-4000-8000-000000000002", recs[2].Header.Get(sink.HeaderMsgID))
		})
	}
}

// looseOutbox is a Postgres database with an outbox table that takes rows the relay refuses
// (a NULL id, headers as any text), its publication and slot, and a JetStream server with
// max_payload maxPayload and, when maxMsgSize > 0, the relay's stream with that max_msg_size
// (allowing the batches --publish mode needs); 0 leaves the server's defaults.
func looseOutbox(t *testing.T, maxPayload, maxMsgSize int32, mode string) (*testenv.PG, *natsembed.NATS) {
	t.Helper()
	pg := testenv.Postgres(t)
	var opts []natsembed.NATSOption
	if maxPayload > 0 {
		opts = append(opts, natsembed.WithMaxPayload(maxPayload))
	}
	ns := natsembed.JetStream(t, opts...)
	if maxMsgSize > 0 {
		js, err := jetstream.New(ns.Connect(t))
		require.NoError(t, err)
		_, err = js.CreateStream(context.Background(), jetstream.StreamConfig{Name: sink.DefaultStream, Subjects: []string{"outbox.>"},
			MaxMsgSize: maxMsgSize, Duplicates: 20 * time.Minute, AllowAtomicPublish: mode == "atomic", AllowBatchPublish: mode == "fast"})
		require.NoError(t, err)
	}
	pg.Exec(t, `CREATE TABLE loose_outbox (id text, aggregate_type text NOT NULL, aggregate_id text NOT NULL, event_type text NOT NULL,
		payload text NOT NULL, headers text, created_at timestamptz NOT NULL DEFAULT now())`)
	pg.Exec(t, `CREATE PUBLICATION outbox_pub FOR TABLE loose_outbox WITH (publish = 'insert')`)
	pg.Exec(t, `SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')`)
	return pg, ns
}
