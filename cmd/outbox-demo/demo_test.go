package main

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

var (
	createdRE  = regexp.MustCompile(`(?m)^producer +\| created order ([0-9a-f-]{36})`)
	consumedRE = regexp.MustCompile(`(?m)^consumer +\| OrderCreated order/([0-9a-f-]{36}) latency=(\S+) `)
)

// TestDemo_OrdersFlowFromProducerToConsumerAndStopCleansUp runs the whole demo (Postgres,
// relay with embedded NATS, producer, consumer) for a few seconds.
func TestDemo_OrdersFlowFromProducerToConsumerAndStopCleansUp(t *testing.T) {
	if !havePostgres() {
		if ci, _ := strconv.ParseBool(os.Getenv("CI")); ci {
			t.Fatal("PostgreSQL server binaries missing (CI=true, not skipping): apt-get install postgresql-15")
		}
		t.Skip("PostgreSQL server binaries missing: apt-get install postgresql-15")
	}
	bins := t.TempDir()
	require.NoError(t, build(context.Background(), bins))

	out := &testenv.SyncBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("demo output:\n%s", out.String())
		}
	})
	d, err := start(context.Background(), config{BinDir: bins, Interval: 100 * time.Millisecond, Install: false, Out: out})
	require.NoError(t, err)
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = d.stop()
		}
	})

	// Events flow: the consumer prints orders the producer committed, with a latency.
	require.Eventually(t, func() bool { return len(consumedRE.FindAllString(out.String(), -1)) >= 5 }, 60*time.Second, 100*time.Millisecond)
	created := map[string]bool{}
	for _, m := range createdRE.FindAllStringSubmatch(out.String(), -1) {
		created[m[1]] = true
	}
	for _, m := range consumedRE.FindAllStringSubmatch(out.String(), -1) {
		// The producer prints after its commit and the consumer may be faster, so check
		// against the output once more below if missing.
		if !created[m[1]] {
			require.Eventually(t, func() bool {
				return regexp.MustCompile(`created order ` + m[1]).MatchString(out.String())
			}, 5*time.Second, 50*time.Millisecond, "consumed order %s was never created", m[1])
		}
		lat, err := time.ParseDuration(m[2])
		require.NoError(t, err, "latency %q", m[2])
		require.Less(t, lat, 10*time.Second)
	}

	// The first order the producer committed arrives too (the slot exists from the migration on).
	first := createdRE.FindStringSubmatch(out.String())
	require.NotNil(t, first, "no order created")
	require.Eventually(t, func() bool {
		return regexp.MustCompile(`(?m)^consumer +\| OrderCreated order/` + regexp.QuoteMeta(first[1]) + ` `).MatchString(out.String())
	}, 30*time.Second, 50*time.Millisecond, "the first order %s never arrived", first[1])

	pids, dir, pgDir := d.pids(), d.dir, d.pg.DataDir
	require.Len(t, pids, 4, "postgres, relay, consumer, producer")
	stopped = true
	require.NoError(t, d.stop())
	for _, pid := range pids {
		require.False(t, alive(pid), "pid %d still running after stop", pid)
	}
	_, err = os.Stat(dir)
	require.True(t, os.IsNotExist(err), "temporary directory %s still exists", dir)
	_, err = os.Stat(pgDir)
	require.True(t, os.IsNotExist(err), "Postgres data directory %s still exists", pgDir)
	require.Contains(t, out.String(), "relay    | ", "relay output is shown")
	require.Regexp(t, `relay +\| .*stopped`, out.String(), "the relay stopped gracefully on SIGINT")
}

// alive reports whether pid is a running (not zombie) process.
func alive(pid int) bool {
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := strings.LastIndexByte(string(b), ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}
