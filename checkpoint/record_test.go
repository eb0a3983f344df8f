package checkpoint

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
)

// memStore records in memory and fails while down is set.
type memStore struct {
	mu   sync.Mutex
	lsn  pglogrepl.LSN
	down bool
}

func (s *memStore) Record(_ context.Context, lsn pglogrepl.LSN) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		return errors.New("store down")
	}
	s.lsn = lsn
	return nil
}

func (s *memStore) setDown(d bool) { s.mu.Lock(); s.down = d; s.mu.Unlock() }

func TestRecorder_NeverReportsAnUnrecordedPosition(t *testing.T) {
	trk := New(100)
	st := &memStore{}
	r := NewRecorder(trk, st, 100)
	trk.Keepalive(200)
	if lsn, _ := r.Flushed(); lsn != 100 {
		t.Fatalf("Flushed = %s before recording, want 0/64", lsn)
	}
	if r.Awaited() != 1 {
		t.Fatalf("an unrecorded position counts as pending: got %d", r.Awaited())
	}
	if err := r.Record(context.Background()); err != nil {
		t.Fatal(err)
	}
	if lsn, _ := r.Flushed(); lsn != 200 || st.lsn != 200 || r.Awaited() != 0 {
		t.Fatalf("after recording: Flushed %s, store %s, pending %d", lsn, st.lsn, r.Awaited())
	}

	st.setDown(true)
	trk.Keepalive(300)
	if err := r.Record(context.Background()); err == nil {
		t.Fatal("a failed store write was not reported")
	}
	if lsn, _ := r.Flushed(); lsn != 200 {
		t.Fatalf("Flushed = %s while the store is down, want the recorded 200", lsn)
	}
	if r.Failures() != 1 {
		t.Fatalf("failures = %d", r.Failures())
	}

	// Run retries until the store is back.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); r.Run(ctx, time.Millisecond, nil) }()
	time.Sleep(20 * time.Millisecond)
	if lsn, _ := r.Flushed(); lsn != 200 {
		t.Fatalf("Flushed = %s while the store is down", lsn)
	}
	st.setDown(false)
	deadline := time.Now().Add(5 * time.Second)
	for {
		if lsn, _ := r.Flushed(); lsn == 300 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the position was never recorded after the store came back")
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	<-done
}
