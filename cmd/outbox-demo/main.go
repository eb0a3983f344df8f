// Command outbox-demo runs outbox-relay end to end on one machine without Docker: a throwaway
// PostgreSQL from the local server binaries (the postgresql-15 Debian package is installed
// when missing and the demo runs as root), the relay with NATS JetStream embedded, an example
// producer that creates orders and writes OrderCreated events in the same transaction, and an
// example consumer that prints each event with its end-to-end latency. Ctrl-C stops every
// process and removes the temporary directory. `make demo` runs it.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	var cfg config
	flag.StringVar(&cfg.BinDir, "bin-dir", "", "directory with outbox-relay, producer and consumer binaries (default: build them)")
	flag.DurationVar(&cfg.Interval, "interval", time.Second, "time between two orders")
	flag.BoolVar(&cfg.Install, "install", true, "apt-get install postgresql-15 when the PostgreSQL server binaries are missing (root only)")
	flag.Parse()
	cfg.Out = os.Stdout
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	d, err := start(ctx, cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "outbox-demo:", err)
		os.Exit(1)
	}
	err = d.wait(ctx)
	if serr := d.stop(); serr != nil {
		fmt.Fprintln(os.Stderr, "outbox-demo: cleanup:", serr)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "outbox-demo:", err)
		os.Exit(1)
	}
}
