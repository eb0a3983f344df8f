package outbox_test

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// A service writes its business row and the event in one transaction: the event is published
// if and only if the transaction commits.
func ExampleWrite() {
	ctx := context.Background()
	pool, done := exampleDatabase(ctx, "ExampleWrite")
	defer done()

	type Order struct {
		ID    string  `json:"id"`
		Total float64 `json:"total"`
	}
	o := Order{ID: "42", Total: 27.08}
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO orders (id, total) VALUES ($1, $2)`, o.ID, o.Total); err != nil {
			return err
		}
		return outbox.Write(ctx, tx, outbox.NewEvent("order", o.ID, "OrderCreated", o).WithHeader("tenant", "acme"))
	})
	if err != nil {
		panic(err)
	}

	printOutbox(ctx, pool)
	// Output:
	// order/42 OrderCreated {"id": "42", "total": 27.08} {"tenant": "acme"}
}

// Events of a transaction that rolls back never reach the table, so the relay never sees them.
func ExampleWrite_rollback() {
	ctx := context.Background()
	pool, done := exampleDatabase(ctx, "ExampleWrite_rollback")
	defer done()

	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if err := outbox.Write(ctx, tx,
			outbox.NewEvent("order", "43", "OrderCreated", map[string]int{"total": 5}),
			outbox.NewEvent("order", "43", "OrderPaid", map[string]int{"total": 5}),
		); err != nil {
			return err
		}
		return fmt.Errorf("payment declined")
	})
	fmt.Println("transaction:", err)

	printOutbox(ctx, pool)
	// Output:
	// transaction: payment declined
	// 0 events
}

// exampleDatabase is a new database of the tests' Postgres with the outbox table (migrations,
// as outbox-relay migrate creates it) and an orders table.
func exampleDatabase(ctx context.Context, name string) (*pgxpool.Pool, func()) {
	t, done := testenv.ForExample(name)
	pg := testenv.Postgres(t)
	conn, err := pgx.Connect(ctx, pg.URL)
	if err == nil {
		_, err = migrations.Apply(ctx, conn, migrations.Options{})
		conn.Close(ctx)
	}
	if err != nil {
		done()
		panic(err)
	}
	pg.Exec(t, `CREATE TABLE orders (id text PRIMARY KEY, total numeric NOT NULL)`)
	pool, err := pgxpool.New(ctx, pg.URL)
	if err != nil {
		done()
		panic(err)
	}
	return pool, func() { pool.Close(); done() }
}

// printOutbox prints the outbox rows, in the order they were written.
func printOutbox(ctx context.Context, pool *pgxpool.Pool) {
	rows, err := pool.Query(ctx, `SELECT aggregate_type, aggregate_id, event_type, payload::text, coalesce(headers::text, '')
		FROM outbox ORDER BY id`)
	if err != nil {
		panic(err)
	}
	n := 0
	for rows.Next() {
		var typ, id, event, payload, headers string
		if err := rows.Scan(&typ, &id, &event, &payload, &headers); err != nil {
			panic(err)
		}
		fmt.Printf("%s/%s %s %s %s\n", typ, id, event, payload, headers)
		n++
	}
	if err := rows.Err(); err != nil {
		panic(err)
	}
	if n == 0 {
		fmt.Println("0 events")
	}
}
