// Package checkpoint decides which WAL position the relay may confirm to Postgres.
//
// Postgres re-sends a transaction after a reconnect unless the confirmed (flush) position is at
// or past the end of its commit record. The relay publishes events asynchronously and JetStream
// acknowledges them in any order, so the Tracker keeps a FIFO with one entry per received
// transaction, counting the events not yet stored by the broker. The confirmable position is the
// commit end LSN (CommitMessage.TransactionEndLSN) of the last entry of the longest prefix whose
// events are all stored. A keepalive's server WAL end enters the same FIFO as an entry without
// events (a barrier), so an idle outbox still lets the slot advance, but never past a
// transaction that is still in flight.
package checkpoint

import (
	"fmt"
	"sync"

	"github.com/jackc/pglogrepl"
)

// Ticket identifies the transaction an event belongs to; pass it back to Confirm once the
// broker stored the event.
type Ticket uint64

// Tracker is the relay's flush position. Begin, Add, Commit and Keepalive are called by the
// replication loop only, in WAL order; Confirm may be called from any goroutine, in any order,
// exactly once per Add. Memory is bounded by the number of transactions with events in flight
// (entries without pending events that queue behind them are merged).
type Tracker struct {
	mu      sync.Mutex
	q       []entry // ring buffer of entries, q[head%len] is the oldest
	head    uint64  // sequence number of the oldest entry
	n       int     // number of entries
	open    bool    // the newest entry is a transaction whose Commit has not arrived
	flushed pglogrepl.LSN
	pending int // events added and not confirmed, over all entries
}

type entry struct {
	end     pglogrepl.LSN // 0 while the transaction is open
	pending int
}

// New returns a Tracker whose flush position starts at start (the position replication started
// from: everything before it is already confirmed).
func New(start pglogrepl.LSN) *Tracker {
	return &Tracker{q: make([]entry, 64), flushed: start}
}

func (t *Tracker) at(seq uint64) *entry { return &t.q[seq%uint64(len(t.q))] }

func (t *Tracker) push(e entry) {
	if t.n == len(t.q) {
		bigger := make([]entry, 2*len(t.q))
		for i := 0; i < t.n; i++ {
			bigger[(t.head+uint64(i))%uint64(len(bigger))] = *t.at(t.head + uint64(i))
		}
		t.q = bigger
	}
	*t.at(t.head + uint64(t.n)) = e
	t.n++
}

// advance pops resolved entries off the front. t.mu is held.
func (t *Tracker) advance() {
	for t.n > 0 {
		e := t.at(t.head)
		if e.end == 0 || e.pending > 0 {
			return
		}
		if e.end > t.flushed {
			t.flushed = e.end
		}
		t.head++
		t.n--
	}
}

// Begin opens a transaction; Add and Commit refer to it until the next Begin.
func (t *Tracker) Begin() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.open {
		panic("checkpoint: Begin inside an open transaction")
	}
	t.push(entry{})
	t.open = true
}

// Add records one event of the open transaction as in flight and returns its ticket.
func (t *Tracker) Add() Ticket {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.open {
		panic("checkpoint: Add outside a transaction")
	}
	seq := t.head + uint64(t.n) - 1
	t.at(seq).pending++
	t.pending++
	return Ticket(seq)
}

// Confirm records that the broker stored one event of the ticket's transaction.
func (t *Tracker) Confirm(tk Ticket) {
	t.mu.Lock()
	defer t.mu.Unlock()
	seq := uint64(tk)
	if seq < t.head || seq >= t.head+uint64(t.n) || t.at(seq).pending == 0 {
		panic(fmt.Sprintf("checkpoint: confirm of unknown ticket %d", seq))
	}
	t.at(seq).pending--
	t.pending--
	if seq == t.head {
		t.advance()
	}
}

// Commit closes the open transaction at end (CommitMessage.TransactionEndLSN).
func (t *Tracker) Commit(end pglogrepl.LSN) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.open {
		panic("checkpoint: Commit outside a transaction")
	}
	t.open = false
	last := t.at(t.head + uint64(t.n) - 1)
	last.end = end
	t.mergeTail()
	t.advance()
}

// Keepalive records a primary keepalive's server WAL end: every transaction committed before it
// has been received, so it may be confirmed once everything received before it is stored.
func (t *Tracker) Keepalive(walEnd pglogrepl.LSN) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.n == 0 {
		if walEnd > t.flushed {
			t.flushed = walEnd
		}
		return
	}
	if t.open {
		// A keepalive sent while the walsender is writing a transaction carries a position
		// before that transaction's commit; it adds nothing the Commit will not confirm.
		return
	}
	t.push(entry{end: walEnd})
	t.mergeTail()
	t.advance()
}

// mergeTail folds the newest entry into the one before it when both have no pending events and
// are closed: they will pop together anyway. This keeps keepalives and empty transactions that
// queue behind a slow one from growing the FIFO.
func (t *Tracker) mergeTail() {
	if t.n < 2 {
		return
	}
	last := t.at(t.head + uint64(t.n) - 1)
	prev := t.at(t.head + uint64(t.n) - 2)
	if last.pending == 0 && last.end != 0 && prev.pending == 0 && prev.end != 0 {
		if last.end > prev.end {
			prev.end = last.end
		}
		t.n--
	}
}

// Flushed returns the position that may be confirmed to Postgres, and whether nothing is in
// flight (no open transaction, no pending event).
func (t *Tracker) Flushed() (lsn pglogrepl.LSN, idle bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.flushed, t.n == 0
}

// Pending returns the number of events added and not yet confirmed.
func (t *Tracker) Pending() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.pending
}

// Awaited returns the number of events added and not yet confirmed in transactions whose
// Commit arrived: the events whose confirmation can still move the flush position. The open
// transaction's events cannot until its Commit arrives, so a drain (which stops reading) does
// not wait for them.
func (t *Tracker) Awaited() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.open {
		return t.pending - t.at(t.head+uint64(t.n)-1).pending
	}
	return t.pending
}
