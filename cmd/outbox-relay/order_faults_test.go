package main

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/faultproxy"
	"github.com/outbox-relay/outbox-relay/sink"
)

// The relay talks to NATS through a fault proxy while writers commit continuously. Mid-window
// the proxy drops single publishes silently (the later ones reach the server: the case that
// reorders a plain async window), resets the connection, cuts it in the middle of a message
// and blackholes it. The stream must hold every committed event once, in per-aggregate order:
// publishing single events, and publishing one fast batch (where a lost publish is a gap the
// server ends the batch at).
func TestRelay_PublishLossResetsAndBlackholeKeepOrderNoLossNoDup(t *testing.T) {
	for _, mode := range []string{"single", "fast"} {
		t.Run(mode, func(t *testing.T) { publishLossResetsAndBlackhole(t, mode) })
	}
}

// publishLossResetsAndBlackhole runs the faults above against a relay publishing in mode
// (--publish).
func publishLossResetsAndBlackhole(t *testing.T, mode string) {
	e := newEnv(t)
	proxy, err := faultproxy.StartNATS(fmt.Sprintf("127.0.0.1:%d", e.nats.Port))
	require.NoError(t, err)
	t.Cleanup(proxy.Close)
	n := 0
	proxy.DropNATSPublish(func(subject string, _ []byte) bool {
		if !strings.HasPrefix(subject, "outbox.") {
			return false
		}
		n++
		return n%700 == 0 && n <= 700*6 // six losses, each costs an ack timeout
	})
	args := []string{"run", "--pg-url", e.pg.URL, "--nats-url", "nats://" + proxy.Addr(), "--create-slot",
		"--log-format", "json", "--log-level", "info", "--ack-timeout", "1s", "--max-in-flight", "256", "--publish", mode}
	stop, log := inProcess(t, args)
	waitStreaming(t, e.pg, "outbox_relay")

	written := make(chan int, 1)
	go func() {
		written <- workload{Writers: 4, Aggregates: 30, Txs: 100, MaxTx: 30, Seed: 40}.run(t, e.pg)
	}()
	faults := []struct {
		name string
		do   func()
	}{
		{"reset", proxy.Reset},
		{"cut mid-message", func() { proxy.CutAfter(7001); time.Sleep(300 * time.Millisecond); proxy.Pass() }},
		{"blackhole 2s", func() { proxy.Blackhole(); time.Sleep(2 * time.Second); proxy.Pass() }},
		{"reset", proxy.Reset},
		{"cut mid-message", func() { proxy.CutAfter(30001); time.Sleep(300 * time.Millisecond); proxy.Pass() }},
	}
	for _, f := range faults {
		time.Sleep(400 * time.Millisecond) // let the window refill between faults
		t.Logf("fault: %s", f.name)
		f.do()
	}
	total := <-written
	waitStream(t, e.nats.URL, uint64(total), 90*time.Second)
	require.NoError(t, stop())
	_, dropped := proxy.Stats()
	require.NotZero(t, dropped, "publishes were dropped")
	requireClean(t, check(t, outboxRows(t, e.pg), readStream(t, e.nats.URL, sink.DefaultStream)))
	require.Contains(t, log.String(), "re-publishing from the first event not stored")
	t.Logf("events %d, publishes dropped %d", total, dropped)
}
