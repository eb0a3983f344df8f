package sink

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The linger timer fires once for the earliest time armed, then nothing until armed again.
func TestLingerTimer_FiresOnceAtTheEarliestTimeArmed(t *testing.T) {
	lt := newLingerTimer()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go lt.run(ctx)

	start := time.Now()
	lt.arm(start.Add(time.Hour))
	lt.arm(start.Add(300 * time.Microsecond)) // earlier: replaces the hour
	lt.arm(start.Add(time.Hour))              // later: ignored
	select {
	case <-lt.C:
	case <-time.After(10 * time.Second):
		t.Fatal("the linger timer did not fire")
	}
	require.False(t, time.Now().Before(start.Add(300*time.Microsecond)), "fired before the time armed")
	select {
	case <-lt.C:
		t.Fatal("fired twice for one arming (the hour was replaced)")
	case <-time.After(50 * time.Millisecond):
	}

	lt.arm(time.Now().Add(-time.Millisecond)) // already past: fires at once
	select {
	case <-lt.C:
	case <-time.After(10 * time.Second):
		t.Fatal("a time already past did not fire")
	}
}
