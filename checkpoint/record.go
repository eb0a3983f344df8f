package checkpoint

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
)

// Store keeps the relay's durable record of the position it may confirm (the sink keeps it in
// a JetStream key-value bucket, next to the events).
type Store interface {
	Record(ctx context.Context, lsn pglogrepl.LSN) error
}

// FlushSource is the position the relay may confirm: the Tracker's, or a Recorder's capped by
// its record. The replication loop reads it (replication.Stream.Run and Drain), and a Recorder
// caps one (the Tracker).
type FlushSource interface {
	Flushed() (lsn pglogrepl.LSN, idle bool)
	// Awaited is what a drain waits for before its final status update: the events whose
	// confirmation can still move the position (see Tracker.Awaited).
	Awaited() int
}

// Recorder stores the source's flushed position in a Store off the hot path, and reports
// min(flushed, recorded) as the position the replication loop may confirm: Postgres never hears
// of a position the record does not hold. A slot found ahead of the record at the next start
// was therefore moved by someone else (dropped and recreated, advanced), and the events in
// between may be missing from the WAL stream.
type Recorder struct {
	src      FlushSource
	store    Store
	recorded atomic.Uint64
	failures atomic.Uint64
	// failingSince is when the current run of failed writes began (unix nanoseconds; 0 while
	// the last write succeeded).
	failingSince atomic.Int64
}

// NewRecorder returns a Recorder whose record holds recorded.
func NewRecorder(src FlushSource, store Store, recorded pglogrepl.LSN) *Recorder {
	r := &Recorder{src: src, store: store}
	r.recorded.Store(uint64(recorded))
	return r
}

// Flushed is the source's position, capped at the recorded one.
func (r *Recorder) Flushed() (pglogrepl.LSN, bool) {
	lsn, idle := r.src.Flushed()
	if rec := r.Recorded(); lsn > rec {
		return rec, false
	}
	return lsn, idle
}

// Awaited counts a flushed position not yet recorded as one more awaited item, so a drain
// waits for the record before its final status update.
func (r *Recorder) Awaited() int {
	n := r.src.Awaited()
	if lsn, _ := r.src.Flushed(); lsn > r.Recorded() {
		n++
	}
	return n
}

// Recorded is the last position the store confirmed.
func (r *Recorder) Recorded() pglogrepl.LSN { return pglogrepl.LSN(r.recorded.Load()) }

// Failures counts failed writes to the store.
func (r *Recorder) Failures() uint64 { return r.failures.Load() }

// Record stores the source's position if it moved past the record.
func (r *Recorder) Record(ctx context.Context) error {
	lsn, _ := r.src.Flushed()
	if lsn <= r.Recorded() {
		return nil
	}
	if err := r.store.Record(ctx, lsn); err != nil {
		r.failures.Add(1)
		r.failingSince.CompareAndSwap(0, time.Now().UnixNano())
		return err
	}
	r.recorded.Store(uint64(lsn))
	r.failingSince.Store(0)
	return nil
}

// FailingFor is how long writes have failed in a row (0 while the last one succeeded).
func (r *Recorder) FailingFor() time.Duration {
	since := r.failingSince.Load()
	if since == 0 {
		return 0
	}
	return time.Since(time.Unix(0, since))
}

// Run records every interval until ctx ends. A failed write is reported to onErr (may be nil)
// and retried at the next tick; meanwhile the confirmable position does not move. A zero
// interval means 250ms.
func (r *Recorder) Run(ctx context.Context, interval time.Duration, onErr func(error)) {
	if interval <= 0 {
		interval = 250 * time.Millisecond
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := r.Record(wctx)
		cancel()
		if err != nil && ctx.Err() == nil && onErr != nil {
			onErr(err)
		}
	}
}
