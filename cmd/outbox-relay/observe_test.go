package main

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// httpAddrOf waits for the relay to log the address its HTTP server listens on.
func httpAddrOf(t *testing.T, log *testLog) string {
	t.Helper()
	var addr string
	require.Eventually(t, func() bool {
		for _, line := range strings.Split(log.String(), "\n") {
			if !strings.Contains(line, "serving /metrics") {
				continue
			}
			var v struct{ Addr string }
			if json.Unmarshal([]byte(line), &v) == nil && v.Addr != "" {
				addr = v.Addr
				return true
			}
		}
		return false
	}, 30*time.Second, 20*time.Millisecond, "relay never logged its http address")
	return "http://" + addr
}

// metric returns the value of the sample whose name and labels are exactly series
// (e.g. `outbox_relay_events_published_total{stream="OUTBOX",table="public.outbox"}`), or -1 when absent.
func metric(t *testing.T, body, series string) float64 {
	t.Helper()
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			require.NoError(t, err, line)
			return f
		}
	}
	return -1
}

func TestHTTP_MetricsCountEveryEventAndReadiness(t *testing.T) {
	e := newEnv(t)
	stop, log := inProcess(t, e.args("--max-in-flight", "32"))
	base := httpAddrOf(t, log)
	waitStreaming(t, e.pg, "outbox_relay")
	require.Eventually(t, func() bool { code, _ := testenv.HTTPGet(t, base+"/readyz"); return code == http.StatusOK }, 10*time.Second, 20*time.Millisecond)
	code, body := testenv.HTTPGet(t, base+"/healthz")
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "ok\n", body)

	n := workload{Writers: 2, Aggregates: 10, Txs: 20, MaxTx: 15, Seed: 3}.run(t, e.pg)
	waitStream(t, e.nats.URL, uint64(n), 30*time.Second)
	var m string
	require.Eventually(t, func() bool {
		_, m = testenv.HTTPGet(t, base+"/metrics")
		return metric(t, m, "outbox_relay_events_in_flight") == 0 && metric(t, m, "outbox_relay_bytes_in_flight") == 0
	}, 10*time.Second, 20*time.Millisecond)
	require.Equal(t, float64(n), metric(t, m, `outbox_relay_events_published_total{stream="OUTBOX",table="public.outbox"}`), "counter equals the events sent")
	require.Equal(t, float64(n), metric(t, m, `outbox_relay_publish_ack_seconds_count{table="public.outbox"}`))
	require.Equal(t, float64(n), metric(t, m, `outbox_relay_commit_to_ack_seconds_count{table="public.outbox"}`))
	require.Zero(t, metric(t, m, `outbox_relay_events_duplicate_total{stream="OUTBOX"}`))
	require.Zero(t, metric(t, m, `outbox_relay_publish_errors_total{stream="OUTBOX"}`))
	require.Zero(t, metric(t, m, "outbox_relay_replication_reconnects_total"))
	require.Equal(t, 1.0, metric(t, m, "outbox_relay_replicating"))
	require.Equal(t, 1.0, metric(t, m, "outbox_relay_nats_connected"))
	require.Zero(t, metric(t, m, "outbox_relay_stalled"))
	require.InDelta(t, float64(time.Now().Unix()), metric(t, m, `outbox_relay_last_event_timestamp_seconds{table="public.outbox"}`), 60)
	require.Greater(t, metric(t, m, "outbox_relay_acked_lsn"), 0.0)
	// The slot first, then the record: a keepalive may move both in between, never the slot
	// past the record.
	confirmed := float64(confirmedFlush(t, e.pg, "outbox_relay"))
	_, m2 := testenv.HTTPGet(t, base+"/metrics")
	require.GreaterOrEqual(t, metric(t, m2, "outbox_relay_recorded_lsn"), confirmed, "the record holds at least what the slot confirmed")
	require.Zero(t, metric(t, m, "outbox_relay_position_record_failures_total"))
	require.GreaterOrEqual(t, metric(t, m, "outbox_relay_slot_lag_bytes"), 0.0)
	require.Equal(t, -1.0, metric(t, m, "outbox_relay_slot_safe_wal_size_bytes"), "unlimited max_slot_wal_keep_size (polled at start)")
	require.NotEqual(t, -1.0, metric(t, m, "go_goroutines"))
	// The slot's confirmed position is what the relay reports as acknowledged (it may be a
	// keepalive ahead by the time Postgres saved it).
	require.LessOrEqual(t, metric(t, m, "outbox_relay_acked_lsn"), float64(confirmedFlush(t, e.pg, "outbox_relay"))+float64(1<<20))
	require.NoError(t, stop())
}

func TestHTTP_StallTurnsReadyzTo503AndNamesWhatIsStuck(t *testing.T) {
	e := newEnv(t)
	stop, log := inProcess(t, e.args("--stall-timeout", "1s", "--ack-timeout", "500ms"))
	base := httpAddrOf(t, log)
	waitStreaming(t, e.pg, "outbox_relay")
	require.Eventually(t, func() bool { code, _ := testenv.HTTPGet(t, base+"/readyz"); return code == http.StatusOK }, 10*time.Second, 20*time.Millisecond)

	e.nats.Shutdown()
	e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) SELECT 'o', g::text, 'E', '{}' FROM generate_series(1, 5) g`)
	var body string
	require.Eventually(t, func() bool {
		var code int
		code, body = testenv.HTTPGet(t, base+"/readyz")
		return code == http.StatusServiceUnavailable && strings.Contains(body, "stalled")
	}, 20*time.Second, 50*time.Millisecond)
	require.Contains(t, body, "5 events waiting for JetStream acknowledgements")
	require.Contains(t, body, "not connected to NATS")
	_, m := testenv.HTTPGet(t, base+"/metrics")
	require.Equal(t, 1.0, metric(t, m, "outbox_relay_stalled"))
	require.Equal(t, 5.0, metric(t, m, "outbox_relay_events_in_flight"))
	require.Greater(t, metric(t, m, "outbox_relay_bytes_in_flight"), 5*100.0, "5 messages of at least 100 bytes")
	require.Contains(t, log.String(), `"message":"relay stalled"`)

	// The broker comes back: the events are stored and the relay is ready again.
	e.nats.Restart(t)
	waitStream(t, e.nats.URL, 5, 30*time.Second)
	require.Eventually(t, func() bool { code, _ := testenv.HTTPGet(t, base+"/readyz"); return code == http.StatusOK }, 20*time.Second, 50*time.Millisecond)
	_, m = testenv.HTTPGet(t, base+"/metrics")
	require.Zero(t, metric(t, m, "outbox_relay_stalled"))
	require.Contains(t, log.String(), "relay moving again")
	require.NoError(t, stop())
}
