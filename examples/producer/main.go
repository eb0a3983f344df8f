// Command producer is an example order service: every --interval it creates an order and
// writes an OrderCreated event in the same transaction with the outbox package, so the event
// is published if and only if the order is committed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/outbox"
)

// Order is the example aggregate and the OrderCreated payload.
type Order struct {
	ID         string `json:"id"`
	Customer   string `json:"customer"`
	TotalCents int    `json:"total_cents"`
}

func main() {
	pgURL := flag.String("pg-url", os.Getenv("OUTBOX_RELAY_PG_URL"), "Postgres URL")
	interval := flag.Duration("interval", time.Second, "time between two orders")
	count := flag.Int("count", 0, "stop after this many orders (0: run until interrupted)")
	messages := flag.Bool("messages", false, "write events with outbox_emit (table-less mode) instead of outbox rows")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *pgURL, *interval, *count, *messages); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "producer:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, pgURL string, interval time.Duration, count int, messages bool) error {
	if pgURL == "" {
		return errors.New("--pg-url is required")
	}
	pool, err := pgxpool.New(ctx, pgURL)
	if err != nil {
		return err
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS orders (
		id uuid PRIMARY KEY, customer text NOT NULL, total_cents int NOT NULL, created_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return fmt.Errorf("create orders table: %w", err)
	}
	w := &outbox.Writer{}
	if messages {
		w.Mode = outbox.MessageMode
	}
	customers := []string{"ada", "grace", "linus", "barbara", "ken"}
	t := time.NewTicker(interval)
	defer t.Stop()
	for n := 1; count == 0 || n <= count; n++ {
		o := Order{ID: outbox.NewID(), Customer: customers[rand.IntN(len(customers))], TotalCents: 100 + rand.IntN(10000)}
		if err := createOrder(ctx, pool, w, o); err != nil {
			return err
		}
		fmt.Printf("created order %s for %s (%d.%02d)\n", o.ID, o.Customer, o.TotalCents/100, o.TotalCents%100)
		select {
		case <-t.C:
		case <-ctx.Done():
			return nil
		}
	}
	return nil
}

// createOrder stores the order and its event in one transaction.
func createOrder(ctx context.Context, pool *pgxpool.Pool, w *outbox.Writer, o Order) error {
	return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO orders (id, customer, total_cents) VALUES ($1, $2, $3)`, o.ID, o.Customer, o.TotalCents); err != nil {
			return fmt.Errorf("insert order: %w", err)
		}
		return w.Write(ctx, tx, outbox.NewEvent("order", o.ID, "OrderCreated", o))
	})
}
