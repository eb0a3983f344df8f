//go:build !linux

package sink

import "time"

// preciseSleep is time.Sleep outside Linux (see sleep_linux.go).
func preciseSleep(d time.Duration) { time.Sleep(d) }
