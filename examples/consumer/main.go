// Command consumer is an example subscriber: it reads the relay's stream and prints every
// event with its end-to-end latency (from the producing transaction's created_at to now).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func main() {
	natsURL := flag.String("nats-url", nats.DefaultURL, "NATS server URL")
	stream := flag.String("stream", "OUTBOX", "JetStream stream")
	subject := flag.String("subject", "outbox.>", "subjects to read")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *natsURL, *stream, *subject); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "consumer:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, url, stream, subject string) error {
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.RetryOnFailedConnect(true), nats.ReconnectWait(200*time.Millisecond))
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	// The relay creates the stream when it starts; wait for it.
	var s jetstream.Stream
	for {
		if s, err = js.Stream(ctx, stream); err == nil {
			break
		}
		if !errors.Is(err, jetstream.ErrStreamNotFound) && ctx.Err() == nil {
			fmt.Fprintln(os.Stderr, "consumer: waiting for stream:", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	c, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}})
	if err != nil {
		return err
	}
	cc, err := c.Consume(func(m jetstream.Msg) {
		h := m.Headers()
		latency := "?"
		if t, err := time.Parse(time.RFC3339Nano, h.Get("Outbox-Created-At")); err == nil {
			latency = time.Since(t).Round(100 * time.Microsecond).String()
		}
		fmt.Printf("%s %s/%s latency=%s id=%s %s\n", h.Get("Outbox-Event-Type"), h.Get("Outbox-Aggregate-Type"),
			h.Get("Outbox-Aggregate-Id"), latency, h.Get(jetstream.MsgIDHeader), m.Data())
	})
	if err != nil {
		return err
	}
	defer cc.Stop()
	fmt.Printf("consuming %s from stream %s\n", subject, stream)
	<-ctx.Done()
	return nil
}
