package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/sink"
)

// partialTxs returns the commit LSNs of the transactions the stream holds part of (fewer than
// size events), with how many it holds.
func partialTxs(recs []record, size int) []string {
	n := map[string]int{}
	for _, r := range recs {
		n[r.Header.Get(sink.HeaderCommitLSN)]++
	}
	var out []string
	for lsn, c := range n {
		if c != size {
			out = append(out, fmt.Sprintf("%s: %d of %d", lsn, c, size))
		}
	}
	sort.Strings(out)
	return out
}

// settleStream waits until the stream's message count stays the same for 300 ms.
func settleStream(t *testing.T, url string) {
	t.Helper()
	n := streamMsgs(t, url, sink.DefaultStream)
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
		time.Sleep(300 * time.Millisecond)
		m := streamMsgs(t, url, sink.DefaultStream)
		if m == n {
			return
		}
		n = m
	}
	t.Fatalf("the stream kept growing for 30 s with the relay killed")
}

// produceTxs commits transactions of size events until stop, pausing pause between them.
func produceTxs(t *testing.T, url string, size int, pause time.Duration, stop *atomic.Bool) (wait func()) {
	var wg sync.WaitGroup
	var err error
	wg.Add(1)
	go func() {
		defer wg.Done()
		ctx := context.Background()
		conn, cerr := pgx.Connect(ctx, url)
		if cerr != nil {
			err = cerr
			return
		}
		defer conn.Close(ctx)
		for tx := 0; !stop.Load(); tx++ {
			err = pgx.BeginFunc(ctx, conn, func(ptx pgx.Tx) error {
				b := &pgx.Batch{}
				for i := 0; i < size; i++ {
					b.Queue(`INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', $1, 'Order.Line', $2)`,
						fmt.Sprintf("tx%d", tx), fmt.Sprintf(`{"tx": %d, "seq": %d}`, tx, i+1))
				}
				return ptx.SendBatch(ctx, b).Close()
			})
			if err != nil {
				return
			}
			time.Sleep(pause)
		}
	}()
	return func() { wg.Wait(); require.NoError(t, err) }
}

// The all-or-nothing test: the relay is SIGKILLed again and again while a producer commits
// transactions of 500 events, and the stream is read before every restart. With --publish
// atomic every transaction is in the stream whole or not at all; with --publish single (the
// control) a kill leaves part of a transaction in the stream. At the end, with the relay left
// running, every event is in the stream once, in order.
func TestPublish_KilledRelayLeavesWholeTransactionsOnlyWhenAtomic(t *testing.T) {
	if testing.Short() {
		t.Skip("kills the relay repeatedly")
	}
	const size, rounds = 500, 6
	for _, mode := range []string{"atomic", "single"} {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t)
			args := e.args("--publish", mode, "--log-level", "info")
			relay := startProc(t, args)
			waitStreaming(t, e.pg, "outbox_relay")
			var stop atomic.Bool
			wait := produceTxs(t, e.pg.URL, size, 30*time.Millisecond, &stop)
			var partials [][]string
			rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
			for round := 0; round < rounds; round++ {
				// Kill while the relay publishes: after the stream grew, at a random moment.
				before := streamMsgs(t, e.nats.URL, sink.DefaultStream)
				waitStream(t, e.nats.URL, before+1, 60*time.Second)
				time.Sleep(time.Duration(rng.IntN(200)) * time.Millisecond)
				relay.kill()
				// A batch committed just before the kill may still be being written (a
				// reader can see part of it meanwhile): read once the stream is still.
				settleStream(t, e.nats.URL)
				recs := readStream(t, e.nats.URL, sink.DefaultStream)
				p := partialTxs(recs, size)
				t.Logf("round %d: %d events in the stream, partial transactions %v", round, len(recs), p)
				partials = append(partials, p)
				relay = startProc(t, args)
			}
			stop.Store(true)
			wait()
			committed := outboxRows(t, e.pg)
			waitStream(t, e.nats.URL, uint64(len(committed)), 120*time.Second)
			recs := readStream(t, e.nats.URL, sink.DefaultStream)
			requireClean(t, check(t, committed, recs))
			require.Empty(t, partialTxs(recs, size))
			if mode == "atomic" {
				for round, p := range partials {
					require.Empty(t, p, "round %d: transactions in part in the stream", round)
				}
				return
			}
			seen := 0
			for _, p := range partials {
				seen += len(p)
			}
			require.NotZero(t, seen, "a relay killed while publishing 500-event transactions one event at a time leaves part of one in the stream")
		})
	}
}
