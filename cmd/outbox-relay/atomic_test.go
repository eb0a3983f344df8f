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
	"github.com/nats-io/nats.go/jetstream"
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
// control) a kill leaves part of a transaction in the stream; --publish fast, one fast batch,
// stores as events arrive and may too. At the end, with the relay left running, every event is
// in the stream once, in order.
func TestPublish_KilledRelayLeavesWholeTransactionsOnlyWhenAtomic(t *testing.T) {
	if testing.Short() {
		t.Skip("kills the relay repeatedly")
	}
	const size, rounds = 500, 6
	for _, mode := range []string{"atomic", "single", "fast"} {
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
			if mode == "fast" {
				// A fast batch stores events as they arrive: a kill may leave part of a
				// transaction, completed once (in order) after the restart, as checked above.
				t.Logf("fast: %d partial transactions seen before restarts", seen)
				return
			}
			require.NotZero(t, seen, "a relay killed while publishing 500-event transactions one event at a time leaves part of one in the stream")
		})
	}
}

// Poison under --publish atomic: one bad event in a transaction of three. With --on-poison
// stop nothing of the transaction is stored and the relay halts naming the event; with
// dead-letter the transaction is stored with the dead letter in the bad event's place. An
// event refused before it is sent (NULL id, over max_payload) is replaced inside the batch, so
// the transaction is still stored by one batch; one the stream refuses (max_msg_size) makes
// the batch fail, and the transaction is then published event by event: with stop, the events
// before the refused one are stored.
func TestPublish_AtomicPoisonStopsOrDeadLettersInItsTransaction(t *testing.T) {
	for _, c := range []struct {
		name       string
		bad        string // the poison row's VALUES
		maxPayload int32
		maxMsgSize int32
		wantErr    string
		oneBatch   bool
	}{
		{name: "null id", bad: `(NULL, 'order', 'p', 'Bad', '{"p": 1}', NULL)`, wantErr: "column id is NULL or empty", oneBatch: true},
		{name: "over max_payload", bad: `('p1', 'order', 'p', 'Big', repeat('x', 20000), NULL)`, maxPayload: 8192, wantErr: "over the server's max_payload of 8192", oneBatch: true},
		{name: "stream refuses it", bad: `('p1', 'order', 'p', 'Big', repeat('x', 6000), NULL)`, maxMsgSize: 4096, wantErr: "rejected by the stream"},
	} {
		t.Run(c.name, func(t *testing.T) {
			pg, ns := looseOutbox(t, c.maxPayload, c.maxMsgSize, "atomic")
			pg.Exec(t, `INSERT INTO loose_outbox (id, aggregate_type, aggregate_id, event_type, payload, headers) VALUES
				('g1', 'order', 'g', 'Good', '{"n": 1}', NULL), `+c.bad+`, ('g2', 'order', 'g', 'Good', '{"n": 2}', NULL)`)
			args := []string{"run", "--pg-url", pg.URL, "--nats-url", ns.URL, "--table", "public.loose_outbox", "--log-format", "json", "--publish", "atomic"}

			err := runToStop(t, args)
			require.ErrorContains(t, err, c.wantErr)
			if c.oneBatch {
				require.Empty(t, readStream(t, ns.URL, sink.DefaultStream), "nothing of the poison's transaction is stored")
			} else {
				// Published event by event to find the refused one: the events before it are
				// stored (the README says so).
				recs := readStream(t, ns.URL, sink.DefaultStream)
				require.Len(t, recs, 1)
				require.Equal(t, "g1", recs[0].Header.Get(sink.HeaderMsgID))
			}

			stop, _ := inProcess(t, append(args, "--on-poison", "dead-letter"))
			waitStream(t, ns.URL, 3, 30*time.Second)
			require.NoError(t, stop())
			recs := readStream(t, ns.URL, sink.DefaultStream)
			require.Len(t, recs, 3)
			require.Equal(t, "g1", recs[0].Header.Get(sink.HeaderMsgID))
			require.Equal(t, "outbox.dead-letter", recs[1].Subject)
			require.Equal(t, "g2", recs[2].Header.Get(sink.HeaderMsgID))
			batch := recs[0].Header.Get("Nats-Batch-Id")
			if c.oneBatch {
				require.NotEmpty(t, batch)
				for _, r := range recs {
					require.Equal(t, batch, r.Header.Get("Nats-Batch-Id"), "the transaction is stored by one batch")
				}
			} else {
				for _, r := range recs {
					require.Empty(t, r.Header.Get("Nats-Batch-Id"), "published event by event")
				}
			}
		})
	}
}

// --publish atomic needs allow_atomic and --publish fast allow_batched: a stream the relay
// creates gets it; an existing one without it is refused, naming how to enable it.
func TestPublish_BatchModesNeedTheirStreamOption(t *testing.T) {
	for _, c := range []struct {
		mode, refusal, field string
		allowed              func(jetstream.StreamConfig) bool
	}{
		{"atomic", "does not allow atomic batch publishing", "allow_atomic: true", func(c jetstream.StreamConfig) bool { return c.AllowAtomicPublish }},
		{"fast", "does not allow fast batch publishing", "allow_batched: true", func(c jetstream.StreamConfig) bool { return c.AllowBatchPublish }},
	} {
		t.Run(c.mode, func(t *testing.T) {
			e := newEnv(t)
			js, err := jetstream.New(e.nats.Connect(t))
			require.NoError(t, err)
			_, err = js.CreateStream(context.Background(), jetstream.StreamConfig{Name: sink.DefaultStream, Subjects: []string{"outbox.>"}, Duplicates: 20 * time.Minute})
			require.NoError(t, err)
			err = runToStop(t, e.args("--publish", c.mode))
			require.ErrorContains(t, err, c.refusal)
			require.ErrorContains(t, err, c.field)
			require.ErrorContains(t, err, "set --publish to single")

			require.NoError(t, js.DeleteStream(context.Background(), sink.DefaultStream))
			stop, _ := inProcess(t, e.args("--publish", c.mode))
			waitStreaming(t, e.pg, "outbox_relay")
			e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', '1', 'Created', '{}')`)
			waitStream(t, e.nats.URL, 1, 30*time.Second)
			require.NoError(t, stop())
			s, err := js.Stream(context.Background(), sink.DefaultStream)
			require.NoError(t, err)
			require.True(t, c.allowed(s.CachedInfo().Config), "the stream the relay created allows %s batches", c.mode)
		})
	}
}

// --publish atomic on an R3 stream: publishes lost on their way to the stream leader (twice,
// inside batches) make the batches incomplete; the relay re-sends them, and the stream holds
// every event once, in order, with every transaction of several events stored by one batch,
// and no replica hits a critical write error.
func TestPublish_AtomicR3LostPublishes(t *testing.T) {
	e := newClusterEnvMode(t, "atomic")
	proxy := e.leaderProxyDropping(t, 300, 2000)
	args := []string{"run", "--pg-url", e.pg.URL, "--nats-url", "nats://" + proxy.Addr(), "--create-slot",
		"--log-format", "json", "--log-level", "info", "--ack-timeout", "1s", "--publish", "atomic"}
	stop, _ := inProcess(t, args)
	waitStreaming(t, e.pg, "outbox_relay")
	total := workload{Writers: 4, Aggregates: 30, Txs: 60, MaxTx: 30, Seed: 53}.run(t, e.pg)
	waitStream(t, e.cluster.URL, uint64(total), 60*time.Second)
	require.NoError(t, stop())
	_, dropped := proxy.Stats()
	require.Equal(t, 2, dropped)
	recs := readClusterStream(t, e.cluster.URL)
	requireClean(t, check(t, outboxRows(t, e.pg), recs))
	// Every transaction of more than one event stored by one batch; single-event ones on
	// their own.
	byTx := map[string][]string{}
	for _, r := range recs {
		lsn := r.Header.Get(sink.HeaderCommitLSN)
		byTx[lsn] = append(byTx[lsn], r.Header.Get("Nats-Batch-Id"))
	}
	for lsn, batches := range byTx {
		for _, b := range batches {
			if len(batches) == 1 {
				require.Empty(t, b, "single-event transaction %s published on its own", lsn)
			} else {
				require.NotEmpty(t, b, "transaction %s stored by a batch", lsn)
				require.Equal(t, batches[0], b, "transaction %s stored by one batch", lsn)
			}
		}
	}
	for _, n := range e.cluster.Nodes {
		require.NotContains(t, n.Log(), "critical write error")
	}
}
