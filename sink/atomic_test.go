package sink

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/decoder"
)

// publishTxs publishes txs transactions of size events each (ids tx-TTTT-IIII) and ends each
// one (EndTx).
func (r *sinkRig) publishTxs(t *testing.T, txs, size int) {
	t.Helper()
	for tx := 0; tx < txs; tx++ {
		for i := 0; i < size; i++ {
			id := fmt.Sprintf("tx-%04d-%04d", tx, i)
			ev := &decoder.Event{ID: []byte(id), AggregateType: []byte("a"), AggregateID: []byte("1"), EventType: []byte("E"),
				Subject: []byte("outbox.a.E"), Payload: []byte(`{}`), CommitLSN: pglogrepl.LSN(1000 + tx), TxIndex: i}
			require.NoError(t, r.sink.Publish(context.Background(), ev, checkpoint.Ticket(tx*size+i)))
		}
		r.sink.EndTx()
	}
}

// storedBatches reads the stream: every message's Nats-Msg-Id and Nats-Batch-Id, in order.
func storedBatches(t *testing.T, url string) (ids, batches []string) {
	t.Helper()
	nc, err := nats.Connect(url)
	require.NoError(t, err)
	defer nc.Close()
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	s, err := js.Stream(context.Background(), DefaultStream)
	require.NoError(t, err)
	info, err := s.Info(context.Background())
	require.NoError(t, err)
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := s.GetMsg(context.Background(), seq)
		require.NoError(t, err)
		ids = append(ids, m.Header.Get(HeaderMsgID))
		batches = append(batches, m.Header.Get(headerBatchID))
	}
	return ids, batches
}

// requireWholeTxs checks that the stream holds txs transactions of size events once each, in
// order, and that each transaction was stored by one atomic batch (batchMax events at most).
func requireWholeTxs(t *testing.T, url string, txs, size, batchMax int) {
	t.Helper()
	ids, batches := storedBatches(t, url)
	require.Len(t, ids, txs*size)
	for tx := 0; tx < txs; tx++ {
		for i := 0; i < size; i++ {
			k := tx*size + i
			require.Equal(t, fmt.Sprintf("tx-%04d-%04d", tx, i), ids[k])
			require.NotEmpty(t, batches[k], "event %s stored by an atomic batch", ids[k])
			if i%batchMax != 0 {
				require.Equal(t, batches[k-1], batches[k], "event %s in its predecessor's batch", ids[k])
			} else if k > 0 {
				require.NotEqual(t, batches[k-1], batches[k], "event %s starts a batch", ids[k])
			}
		}
	}
}

// Atomic mode: each transaction is one batch; one of 250 events with a window of 100 goes out
// as batches of at most 100.
func TestJetStream_AtomicPublishesEachTransactionAsOneBatch(t *testing.T) {
	r := newSinkRig(t, Config{Publish: PublishAtomic, Window: 100})
	r.publishTxs(t, 20, 7)
	r.waitConfirmed(t, 140)
	requireWholeTxs(t, r.nats.URL, 20, 7, 100)
	require.Equal(t, uint64(140), r.sink.Stats().Published)

	// Single-event transactions go out on their own (no batch: one event is stored whole).
	r1 := newSinkRig(t, Config{Publish: PublishAtomic, Window: 100})
	r1.publishTxs(t, 300, 1)
	r1.waitConfirmed(t, 300)
	ids, batches := storedBatches(t, r1.nats.URL)
	require.Len(t, ids, 300)
	for i := range ids {
		require.Equal(t, fmt.Sprintf("tx-%04d-0000", i), ids[i])
		require.Empty(t, batches[i])
	}

	r2 := newSinkRig(t, Config{Publish: PublishAtomic, Window: 100})
	r2.publishTxs(t, 2, 250)
	r2.waitConfirmed(t, 500)
	requireWholeTxs(t, r2.nats.URL, 2, 250, 100)
}

// A message lost inside a batch: the server finds the gap and refuses the batch as
// incomplete; the sink re-sends it whole, and the stream holds every transaction once, whole,
// in order.
func TestJetStream_AtomicLostMessageInsideABatchResendsItWhole(t *testing.T) {
	r := newSinkRig(t, Config{Publish: PublishAtomic, Window: 256, AckTimeout: 500 * time.Millisecond})
	r.proxy.DropNATSPublish(dropOnce("tx-0005-0003"))
	r.publishTxs(t, 30, 10)
	r.waitConfirmed(t, 300)
	_, dropped := r.proxy.Stats()
	require.Equal(t, 1, dropped, "the fault was injected")
	requireWholeTxs(t, r.nats.URL, 30, 10, 1000)
	require.NotZero(t, r.sink.Stats().Retries)
}

// Connection resets and cuts in the middle of a message under a full window: every
// transaction stored once, whole, in order.
func TestJetStream_AtomicResetsAndCutsKeepTransactionsWhole(t *testing.T) {
	r := newSinkRig(t, Config{Publish: PublishAtomic, Window: 128, AckTimeout: time.Second})
	done := r.resetsAndCuts()
	r.publishTxs(t, 150, 20)
	<-done
	r.waitConfirmed(t, 3000)
	requireWholeTxs(t, r.nats.URL, 150, 20, 1000)
}
