package relay

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/sink"
)

// A graceful stop in the middle of a transaction does not wait for it: its events cannot move
// the confirmed position (the commit was never received), and under --publish atomic its open
// batch is never sent, so a drain waiting for them waited out Config.DrainTimeout in full. The
// restarted relay then publishes the whole transaction, each event once.
func TestRun_StopMidTransactionDrainsWithoutWaitingForIt(t *testing.T) {
	for _, mode := range []sink.PublishMode{sink.PublishSingle, sink.PublishAtomic, sink.PublishFast} {
		t.Run(string(mode), func(t *testing.T) {
			e := newTestEnv(t)
			cfg := e.config()
			cfg.Sink.Publish = mode
			cfg.DrainTimeout = 30 * time.Second
			const n = 20000
			r := start(t, cfg)
			r.streaming(t)
			e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
				SELECT 'test', (g % 100)::text, 'Test.Happened', '{}' FROM generate_series(1, $1::int) g`, n)
			e.waitStream(t, 1)
			stopped := time.Now()
			require.NoError(t, r.stop())
			took := time.Since(stopped)
			stored := len(e.streamIDs(t))
			require.Less(t, stored, n, "the relay stopped after the transaction, not in the middle of it")
			require.NotContains(t, r.log.String(), "drain timed out")
			t.Logf("stopped with %d of %d events stored, in %s", stored, n, took)

			r = start(t, cfg)
			r.streaming(t)
			e.waitStream(t, n)
			require.NoError(t, r.stop())
			ids := e.streamIDs(t)
			seen := map[string]bool{}
			for _, id := range ids {
				require.False(t, seen[id], "event %s stored twice", id)
				seen[id] = true
			}
			require.Len(t, seen, n)
			require.False(t, strings.Contains(r.log.String(), "drain timed out"))
		})
	}
}
