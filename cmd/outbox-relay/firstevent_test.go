package main

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
	"github.com/outbox-relay/outbox-relay/sink"
)

// A fresh setup: the application writes its first event right after the migration, before the
// relay ever ran. With migrate --create-slot the slot exists from then on and that event
// arrives; without it, migrate says that such rows are not relayed.
func TestFreshSetup_FirstEventArrives(t *testing.T) {
	e := &env{pg: testenv.Postgres(t), nats: natsembed.JetStream(t)}
	var out bytes.Buffer
	require.NoError(t, dispatch(context.Background(), []string{"migrate", "--pg-url", e.pg.URL, "--create-slot", "--log-level", "warn"}, &out, &out, noEnv))
	require.Contains(t, out.String(), "created replication slot outbox_relay")
	insertGapEvents(t, e.pg, "first", 1)

	stop, _ := inProcess(t, e.args())
	waitStream(t, e.nats.URL, 1, 30*time.Second)
	require.NoError(t, stop())
	requireClean(t, check(t, outboxRows(t, e.pg), readStream(t, e.nats.URL, sink.DefaultStream)))

	// Run again: idempotent, the slot is kept.
	out.Reset()
	require.NoError(t, dispatch(context.Background(), []string{"migrate", "--pg-url", e.pg.URL, "--create-slot", "--log-level", "warn"}, &out, &out, noEnv))
	require.Contains(t, out.String(), "replication slot outbox_relay exists")

	// Without --create-slot, migrate says what happens to rows written before the relay runs.
	pg := testenv.Postgres(t)
	out.Reset()
	require.NoError(t, dispatch(context.Background(), []string{"migrate", "--pg-url", pg.URL, "--log-level", "warn"}, &out, &out, noEnv))
	require.Contains(t, out.String(), "rows committed before the relay first runs with --create-slot are not relayed")
}
