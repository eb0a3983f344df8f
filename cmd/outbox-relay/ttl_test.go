package main

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/sink"
)

// insertWithHeaders inserts one event with the given headers JSON.
func insertWithHeaders(t *testing.T, e *env, aggID, headers string) {
	t.Helper()
	e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) VALUES ('gap', $1, 'Gap.Happened', '{}', $2::jsonb)`, aggID, headers)
}

// A Nats-TTL entry of the headers column passes through to JetStream (the one Nats- header the
// relay lets producers set): on a stream with allow_msg_ttl the event expires after its TTL;
// on a stream without it, the event is poison (named, or dead-lettered), not retried forever.
func TestNatsTTLHeaderPassesThrough(t *testing.T) {
	e := newEnv(t)
	js, closeNC := connectJS(t, e.nats.URL)
	defer closeNC()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: sink.DefaultStream, Subjects: []string{"outbox.>"}, Storage: jetstream.FileStorage,
		AllowMsgTTL: true, Duplicates: time.Minute})
	require.NoError(t, err)

	stop, log := inProcess(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	require.NotContains(t, log.String(), "does not allow per-message TTLs")
	insertWithHeaders(t, e, "keeps", `{}`)
	insertWithHeaders(t, e, "expires", `{"Nats-TTL": "1s"}`)
	waitStream(t, e.nats.URL, 2, 30*time.Second)
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	require.Equal(t, "1s", recs[1].Header.Get(sink.HeaderTTL))
	s, err := js.Stream(ctx, sink.DefaultStream)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		info, err := s.Info(ctx)
		require.NoError(t, err)
		return info.State.Msgs == 1
	}, 10*time.Second, 50*time.Millisecond, "the event with Nats-TTL: 1s never expired")
	require.NoError(t, stop())

	// Without allow_msg_ttl the server refuses it: poison, not an endless retry.
	e2 := newEnv(t)
	done, log := runRelay(t, e2.args("--slot", "outbox_relay_ttl")) // slots are cluster-wide
	waitStreaming(t, e2.pg, "outbox_relay_ttl")
	require.Contains(t, log.String(), "stream OUTBOX does not allow per-message TTLs", "preflight names the stream option")
	insertWithHeaders(t, e2, "refused", `{"Nats-TTL": "1s"}`)
	err = relayExit(t, done, 30*time.Second, "a Nats-TTL header on a stream without allow_msg_ttl")
	require.ErrorIs(t, err, sink.ErrPoison)
	require.Contains(t, err.Error(), "does not allow per-message TTLs")
}

// A row asking for a JetStream message schedule (Nats-Schedule and its companions) is poison,
// not published without its schedule (a reminder due in 30 minutes would be delivered at
// once): the relay stops naming why, or with --on-poison dead-letter publishes it to the dead
// letter subject without the schedule headers and goes on. Why the relay refuses schedules:
// sink's TestMessageSchedulesBreakTheRelaysStream.
func TestNatsScheduleHeaderIsPoison(t *testing.T) {
	e := newEnv(t)
	done, _ := runRelay(t, e.args())
	waitStreaming(t, e.pg, "outbox_relay")
	insertWithHeaders(t, e, "later", `{"Nats-Schedule": "@at 2030-01-01T00:00:00Z", "Nats-Schedule-Target": "outbox.gap.Remind", "traceparent": "00-x"}`)
	err := relayExit(t, done, 30*time.Second, "a Nats-Schedule header")
	require.ErrorIs(t, err, sink.ErrPoison)
	require.Contains(t, err.Error(), `headers column key "Nats-Schedule" asks for a JetStream message schedule, which the relay refuses`)

	stop, _ := inProcess(t, e.args("--on-poison", "dead-letter"))
	insertWithHeaders(t, e, "after", `{}`)
	waitStream(t, e.nats.URL, 2, 30*time.Second)
	require.NoError(t, stop())
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	require.Equal(t, "outbox.dead-letter", recs[0].Subject)
	require.Contains(t, recs[0].Header.Get(sink.HeaderPoisonReason), "JetStream message schedule")
	require.Empty(t, recs[0].Header.Get("Nats-Schedule"))
	require.Empty(t, recs[0].Header.Get("Nats-Schedule-Target"))
	require.Equal(t, "00-x", recs[0].Header.Get("traceparent"))
	require.Equal(t, "outbox.gap.Gap_Happened", recs[1].Subject)
}
