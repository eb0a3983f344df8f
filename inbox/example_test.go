package inbox_test

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/outbox-relay/outbox-relay/inbox"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// A consumer credits an account for every event. The same event arrives twice (the stream
// stored a second copy once its duplicate window had passed, as a relay re-publishing after a
// crash can cause): the handler's effect happens once.
func ExampleNew() {
	ctx := context.Background()
	js, pool, done := exampleEnv(ctx)
	defer done()

	if err := inbox.EnsureTable(ctx, pool, ""); err != nil {
		panic(err)
	}
	if _, err := pool.Exec(ctx, `CREATE TABLE accounts (id text PRIMARY KEY, balance int NOT NULL);
		INSERT INTO accounts VALUES ('acme', 0)`); err != nil {
		panic(err)
	}
	c, err := inbox.New(js, pool, inbox.Config{Durable: "billing", FilterSubjects: []string{"outbox.account.>"}},
		func(ctx context.Context, tx pgx.Tx, msg jetstream.Msg) error {
			amount, err := strconv.Atoi(string(msg.Data()))
			if err != nil {
				return err
			}
			_, err = tx.Exec(ctx, `UPDATE accounts SET balance = balance + $1 WHERE id = 'acme'`, amount)
			return err // the effect commits together with the record of the event id, or not at all
		})
	if err != nil {
		panic(err)
	}

	publish := func(id, amount string) {
		m := nats.NewMsg("outbox.account.Credited")
		m.Header.Set(jetstream.MsgIDHeader, id) // the relay sets the event id
		m.Data = []byte(amount)
		if _, err := js.PublishMsg(ctx, m); err != nil {
			panic(err)
		}
	}
	publish("e1", "10")
	time.Sleep(200 * time.Millisecond) // past the stream's duplicate window: the copy is stored
	publish("e1", "10")
	publish("e2", "5")

	runCtx, stop := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() { ran <- c.Run(runCtx) }()
	for deadline := time.Now().Add(30 * time.Second); c.Stats().Processed+c.Stats().Duplicates < 3; {
		if time.Now().After(deadline) {
			panic(fmt.Sprintf("consumer stuck: %+v", c.Stats()))
		}
		time.Sleep(10 * time.Millisecond)
	}
	stop()
	if err := <-ran; err != nil {
		panic(err)
	}

	var balance int
	if err := pool.QueryRow(ctx, `SELECT balance FROM accounts WHERE id = 'acme'`).Scan(&balance); err != nil {
		panic(err)
	}
	s := c.Stats()
	fmt.Printf("balance %d; processed %d, duplicates skipped %d\n", balance, s.Processed, s.Duplicates)
	// Output:
	// balance 15; processed 2, duplicates skipped 1
}

// exampleEnv is a new database of the tests' Postgres and a nats-server process with the
// stream OUTBOX (see newStream).
func exampleEnv(ctx context.Context) (jetstream.JetStream, *pgxpool.Pool, func()) {
	t, done := testenv.ForExample("ExampleNew")
	pg := testenv.Postgres(t)
	pool, err := pgxpool.New(ctx, pg.URL)
	if err != nil {
		done()
		panic(err)
	}
	t.Cleanup(pool.Close)
	return newStream(t), pool, done
}
