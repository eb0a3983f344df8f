package sink

import (
	"syscall"
	"time"
)

// preciseSleep sleeps for d in a nanosleep system call, which wakes within tens of
// microseconds of d, where time.Sleep in an idle process wakes a millisecond late at the
// earliest (see lingerTimer). It holds an OS thread meanwhile; the scheduler hands the
// goroutine's P to others.
func preciseSleep(d time.Duration) {
	ts := syscall.NsecToTimespec(int64(d))
	_ = syscall.Nanosleep(&ts, nil) // EINTR: returns early, and the caller re-checks the time
}
