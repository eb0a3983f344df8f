package checkpoint_test

import (
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/jackc/pglogrepl"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/checkpoint"
)

func TestTracker_OutOfOrderAcksAdvanceOnlyOverContiguousWholeTransactions(t *testing.T) {
	trk := checkpoint.New(100)
	trk.Begin()
	a1, a2 := trk.Add(), trk.Add()
	trk.Commit(200)
	trk.Begin()
	b1 := trk.Add()
	trk.Commit(300)

	trk.Confirm(b1) // later transaction first: nothing moves
	lsn, idle := trk.Flushed()
	require.Equal(t, pglogrepl.LSN(100), lsn)
	require.False(t, idle)

	trk.Confirm(a2) // half of the first transaction: still nothing
	lsn, _ = trk.Flushed()
	require.Equal(t, pglogrepl.LSN(100), lsn)

	trk.Confirm(a1) // first complete: both pop, to the second commit end
	lsn, idle = trk.Flushed()
	require.Equal(t, pglogrepl.LSN(300), lsn)
	require.True(t, idle)
	require.Zero(t, trk.Pending())
}

func TestTracker_OpenTransactionHoldsEvenWhenItsEventsAreAcked(t *testing.T) {
	trk := checkpoint.New(10)
	trk.Begin()
	trk.Confirm(trk.Add())
	lsn, idle := trk.Flushed()
	require.Equal(t, pglogrepl.LSN(10), lsn, "no Commit yet: the transaction would be re-sent, its end is unknown")
	require.False(t, idle)
	trk.Keepalive(500) // a keepalive mid-transaction must not confirm anything
	lsn, _ = trk.Flushed()
	require.Equal(t, pglogrepl.LSN(10), lsn)
	trk.Commit(40)
	lsn, idle = trk.Flushed()
	require.Equal(t, pglogrepl.LSN(40), lsn)
	require.True(t, idle)
}

func TestTracker_KeepaliveIsABarrierBehindPendingEvents(t *testing.T) {
	trk := checkpoint.New(10)
	trk.Keepalive(20) // idle: confirmed at once
	lsn, _ := trk.Flushed()
	require.Equal(t, pglogrepl.LSN(20), lsn)

	trk.Begin()
	e := trk.Add()
	trk.Commit(30)
	trk.Keepalive(90) // after a pending transaction: waits for it
	trk.Keepalive(95) // merged with the previous barrier
	lsn, _ = trk.Flushed()
	require.Equal(t, pglogrepl.LSN(20), lsn)
	trk.Confirm(e)
	lsn, idle := trk.Flushed()
	require.Equal(t, pglogrepl.LSN(95), lsn)
	require.True(t, idle)
}

func TestTracker_EmptyTransactionsAndKeepalivesBehindAStuckOneStayBounded(t *testing.T) {
	trk := checkpoint.New(1)
	trk.Begin()
	stuck := trk.Add()
	trk.Commit(2)
	for i := 0; i < 100000; i++ {
		trk.Begin()
		trk.Commit(pglogrepl.LSN(3 + 2*i))
		trk.Keepalive(pglogrepl.LSN(4 + 2*i))
	}
	lsn, _ := trk.Flushed()
	require.Equal(t, pglogrepl.LSN(1), lsn)
	trk.Confirm(stuck)
	lsn, _ = trk.Flushed()
	require.Equal(t, pglogrepl.LSN(4+2*99999), lsn)
}

func TestTracker_NeverMovesBackwards(t *testing.T) {
	trk := checkpoint.New(1000)
	trk.Keepalive(500)
	trk.Begin()
	trk.Commit(900)
	lsn, _ := trk.Flushed()
	require.Equal(t, pglogrepl.LSN(1000), lsn)
}

// A property test: transactions of random sizes, acks confirmed concurrently in random order.
// At every moment the flushed position must be the end of a transaction all of whose events,
// and all earlier transactions' events, are confirmed.
func TestTracker_RandomConcurrentAcks(t *testing.T) {
	for seed := uint64(0); seed < 20; seed++ {
		r := rand.New(rand.NewPCG(seed, 1))
		trk := checkpoint.New(0)
		type tx struct {
			end     pglogrepl.LSN
			tickets []checkpoint.Ticket
		}
		var txs []tx
		lsn := pglogrepl.LSN(0)
		for i := 0; i < 300; i++ {
			trk.Begin()
			var t tx
			for n := r.IntN(6); n > 0; n-- {
				t.tickets = append(t.tickets, trk.Add())
			}
			lsn += pglogrepl.LSN(1 + r.IntN(100))
			t.end = lsn
			trk.Commit(lsn)
			if r.IntN(4) == 0 {
				lsn++
				trk.Keepalive(lsn)
			}
			txs = append(txs, t)
		}
		// confirmed[i][j] tracks which tickets were confirmed.
		var mu sync.Mutex
		done := make([]int, len(txs))
		type ack struct{ tx, idx int }
		var acks []ack
		for i, t := range txs {
			for j := range t.tickets {
				acks = append(acks, ack{i, j})
			}
		}
		r.Shuffle(len(acks), func(i, j int) { acks[i], acks[j] = acks[j], acks[i] })
		var wg sync.WaitGroup
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func(part []ack) {
				defer wg.Done()
				for _, a := range part {
					mu.Lock()
					trk.Confirm(txs[a.tx].tickets[a.idx])
					done[a.tx]++
					flushed, _ := trk.Flushed()
					// Every transaction ending at or before flushed must be complete.
					for i, t := range txs {
						if t.end <= flushed && done[i] != len(t.tickets) {
							mu.Unlock()
							panic("flushed past an unconfirmed event")
						}
					}
					mu.Unlock()
				}
			}(acks[w*len(acks)/4 : (w+1)*len(acks)/4])
		}
		wg.Wait()
		flushed, idle := trk.Flushed()
		require.True(t, idle)
		require.GreaterOrEqual(t, flushed, txs[len(txs)-1].end)
	}
}

func BenchmarkTracker_PerEvent(b *testing.B) {
	trk := checkpoint.New(0)
	b.ReportAllocs()
	lsn := pglogrepl.LSN(0)
	tickets := make([]checkpoint.Ticket, 0, 100)
	for i := 0; i < b.N; i += 100 {
		trk.Begin()
		tickets = tickets[:0]
		for j := 0; j < 100; j++ {
			tickets = append(tickets, trk.Add())
		}
		lsn += 1000
		trk.Commit(lsn)
		for _, tk := range tickets {
			trk.Confirm(tk)
		}
	}
}

// Awaited leaves out the open transaction's events: a drain waits only for events whose
// confirmation can move the position.
func TestTracker_AwaitedLeavesOutTheOpenTransaction(t *testing.T) {
	trk := checkpoint.New(100)
	trk.Begin()
	a := trk.Add()
	trk.Commit(200)
	trk.Begin()
	b := trk.Add()
	trk.Add()
	require.Equal(t, 3, trk.Pending())
	require.Equal(t, 1, trk.Awaited(), "the committed transaction's one event")
	trk.Confirm(a)
	require.Equal(t, 0, trk.Awaited())
	lsn, _ := trk.Flushed()
	require.Equal(t, pglogrepl.LSN(200), lsn)
	trk.Confirm(b)
	require.Equal(t, 0, trk.Awaited())
	require.Equal(t, 1, trk.Pending())
}
