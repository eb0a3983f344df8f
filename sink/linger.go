package sink

import (
	"context"
	"sync"
	"time"
)

// lingerTimer wakes Run when the event held back in fast mode is due (fastLinger after it was
// held). A runtime timer would not do: while the process is idle, Go's scheduler sleeps in
// epoll_wait, whose timeout is in milliseconds, so a 200 µs timer fired after about 1.1 ms on
// the machines here, and every event that waited for the linger reached the stream a
// millisecond late (fast mode's p99 at 1,000 events/s was twice the bare pipe's). The timer's
// goroutine sleeps with nanosleep instead (preciseSleep), which wakes within tens of
// microseconds. At most one fire time is armed: arm only moves it earlier, and a fire clears it.
type lingerTimer struct {
	mu   sync.Mutex
	at   time.Time     // the armed fire time; zero: none
	wake chan struct{} // arm tells the goroutine of a new time
	C    chan struct{} // a fire; Run re-checks what is due, so a late or spare one is harmless
}

func newLingerTimer() *lingerTimer {
	return &lingerTimer{wake: make(chan struct{}, 1), C: make(chan struct{}, 1)}
}

// arm makes the timer fire at at, unless it is armed for an earlier time.
func (t *lingerTimer) arm(at time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.at.IsZero() && !at.Before(t.at) {
		return
	}
	t.at = at
	select {
	case t.wake <- struct{}{}:
	default:
	}
}

// run fires the armed times until ctx ends.
func (t *lingerTimer) run(ctx context.Context) {
	for {
		t.mu.Lock()
		at := t.at
		t.mu.Unlock()
		if at.IsZero() {
			select {
			case <-t.wake:
			case <-ctx.Done():
				return
			}
			continue
		}
		if d := time.Until(at); d > 0 {
			// Re-read after the sleep: arm may have moved the time earlier meanwhile (a
			// fire that late is still correct), or a fire consumed it.
			preciseSleep(min(d, time.Millisecond))
			continue
		}
		t.mu.Lock()
		if t.at.Equal(at) {
			t.at = time.Time{}
		}
		t.mu.Unlock()
		select {
		case t.C <- struct{}{}:
		default:
		}
	}
}
