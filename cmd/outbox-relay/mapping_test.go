package main

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
	"github.com/outbox-relay/outbox-relay/sink"
)

// A user's own table, with other column names, a bytea payload and a non-default publication,
// relayed with the --column-* flags and a subject template.
func TestRelay_CustomTableColumnsAndSubjectTemplate(t *testing.T) {
	pg, js := testenv.Postgres(t), natsembed.JetStream(t)
	pg.Exec(t, `CREATE SCHEMA app; CREATE TABLE app.domain_events (
		seq         bigserial PRIMARY KEY,
		event_uuid  uuid NOT NULL DEFAULT gen_random_uuid(),
		entity      text NOT NULL,
		entity_id   bigint NOT NULL,
		kind        varchar(64) NOT NULL,
		body        bytea NOT NULL,
		meta        json,
		happened_at timestamp with time zone NOT NULL DEFAULT now())`)

	out, err := runCmd("publication", "create", "--pg-url", pg.URL, "--publication", "events_pub", "--table", "app.domain_events")
	require.NoError(t, err)
	require.Contains(t, out, "created publication events_pub")
	out, err = runCmd("publication", "create", "--pg-url", pg.URL, "--publication", "events_pub", "--table", "app.domain_events")
	require.NoError(t, err)
	require.Contains(t, out, "already publishes")
	out, err = runCmd("publication", "show", "--pg-url", pg.URL, "--publication", "events_pub", "--output", "json")
	require.NoError(t, err)
	var pv publicationView
	require.NoError(t, json.Unmarshal([]byte(out), &pv))
	require.Equal(t, []string{"app.domain_events"}, pv.Tables)
	require.True(t, pv.Insert)
	require.False(t, pv.Update)

	stop, _ := inProcess(t, []string{"run", "--pg-url", pg.URL, "--nats-url", js.URL, "--create-slot", "--log-format", "json", "--http-addr", "127.0.0.1:0",
		"--table", "app.domain_events", "--publication", "events_pub", "--slot", "events_slot",
		"--column-id", "event_uuid", "--column-aggregate-type", "entity", "--column-aggregate-id", "entity_id",
		"--column-event-type", "kind", "--column-payload", "body", "--column-headers", "meta", "--column-created-at", "happened_at",
		"--subject-prefix", "acme", "--subject-template", "{prefix}.{aggregate_type}.{aggregate_id}.{event_type}", "--stream", "ACME"})
	waitStreaming(t, pg, "events_slot")
	pg.Exec(t, `INSERT INTO app.domain_events (event_uuid, entity, entity_id, kind, body, meta, happened_at) VALUES
		('00000000-0000-4000-8000-0000000000a1', 'Order Line', 42, 'Shipped.v2', '\x00ff10'::bytea, '{"traceparent": "00-abc-01"}', '2026-01-02 03:04:05.123456+00'),
		('00000000-0000-4000-8000-0000000000a2', 'invoice', 7, 'Paid', convert_to('{"sum": 3}', 'UTF8'), NULL, '2026-01-02 03:04:06+00')`)
	require.Eventually(t, func() bool { return streamMsgs(t, js.URL, "ACME") >= 2 }, 30*time.Second, 50*time.Millisecond)
	require.NoError(t, stop())

	recs := readStream(t, js.URL, "ACME")
	require.Len(t, recs, 2)
	r := recs[0]
	require.Equal(t, "acme.Order_Line.42.Shipped_v2", r.Subject)
	require.Equal(t, []byte{0x00, 0xff, 0x10}, r.Data, "bytea payload is sent as its raw bytes")
	require.Equal(t, "00000000-0000-4000-8000-0000000000a1", r.Header.Get(sink.HeaderMsgID))
	require.Equal(t, "Order Line", r.Header.Get(sink.HeaderAggregateType))
	require.Equal(t, "42", r.Header.Get(sink.HeaderAggregateID))
	require.Equal(t, "Shipped.v2", r.Header.Get(sink.HeaderEventType))
	require.Equal(t, "2026-01-02T03:04:05.123456Z", r.Header.Get(sink.HeaderCreatedAt))
	require.Equal(t, "00-abc-01", r.Header.Get("traceparent"))
	require.Equal(t, "acme.invoice.7.Paid", recs[1].Subject)
	require.Equal(t, `{"sum": 3}`, string(recs[1].Data))
}

func TestPublication_DropAndShowMissing(t *testing.T) {
	pg := testenv.Postgres(t)
	pg.Exec(t, `CREATE TABLE t1 (x int)`)
	_, err := runCmd("publication", "create", "--pg-url", pg.URL, "--publication", "p1", "--table", "t1")
	require.NoError(t, err)
	out, err := runCmd("publication", "show", "--pg-url", pg.URL, "--publication", "p1")
	require.NoError(t, err)
	require.Regexp(t, `publishes\s+insert\n`, out)
	require.Regexp(t, `table\s+public.t1\n`, out)
	_, err = runCmd("publication", "drop", "--pg-url", pg.URL, "--publication", "p1")
	require.NoError(t, err)
	_, err = runCmd("publication", "drop", "--pg-url", pg.URL, "--publication", "p1")
	require.ErrorContains(t, err, "--if-exists")
	_, err = runCmd("publication", "drop", "--pg-url", pg.URL, "--publication", "p1", "--if-exists")
	require.NoError(t, err)
	_, err = runCmd("publication", "show", "--pg-url", pg.URL, "--publication", "p1")
	require.ErrorContains(t, err, "publication create")
	_, err = runCmd("publication", "create", "--pg-url", pg.URL, "--publication", "p1", "--table", "nope")
	require.ErrorContains(t, err, `table "public"."nope" does not exist`)
}
