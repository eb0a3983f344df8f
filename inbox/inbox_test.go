package inbox_test

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/inbox"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

type fixture struct {
	pool *pgxpool.Pool
	js   jetstream.JetStream
}

// setup: a database with a ledger (the handler's effects, no uniqueness so a double effect
// shows) and a stream whose duplicate window is short enough to store a re-published copy.
func setup(t *testing.T) fixture {
	t.Helper()
	ctx := context.Background()
	pg := testenv.Postgres(t)
	pool, err := pgxpool.New(ctx, pg.URL)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	require.NoError(t, inbox.EnsureTable(ctx, pool, ""))
	_, err = pool.Exec(ctx, `CREATE TABLE ledger (event_id text NOT NULL, amount int NOT NULL)`)
	require.NoError(t, err)
	n := testenv.JetStream(t)
	js, err := jetstream.New(n.Connect(t))
	require.NoError(t, err)
	_, err = js.CreateStream(ctx, jetstream.StreamConfig{Name: "OUTBOX", Subjects: []string{"outbox.>"}, Duplicates: 100 * time.Millisecond})
	require.NoError(t, err)
	return fixture{pool: pool, js: js}
}

func (f fixture) publish(t *testing.T, id string, amount int) {
	t.Helper()
	m := nats.NewMsg("outbox.account.Credited")
	m.Header.Set(jetstream.MsgIDHeader, id)
	m.Data = []byte(strconv.Itoa(amount))
	_, err := f.js.PublishMsg(context.Background(), m)
	require.NoError(t, err)
}

func credit(ctx context.Context, tx pgx.Tx, msg jetstream.Msg) error {
	amount, err := strconv.Atoi(string(msg.Data()))
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, `INSERT INTO ledger (event_id, amount) VALUES ($1, $2)`, msg.Headers().Get(jetstream.MsgIDHeader), amount)
	return err
}

func run(t *testing.T, c *inbox.Consumer) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
}

// ledger returns how many times each event's effect was applied, and the total.
func ledger(t *testing.T, pool *pgxpool.Pool) (map[string]int, int) {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT event_id, amount FROM ledger`)
	require.NoError(t, err)
	effects, total := map[string]int{}, 0
	for rows.Next() {
		var id string
		var amount int
		require.NoError(t, rows.Scan(&id, &amount))
		effects[id]++
		total += amount
	}
	require.NoError(t, rows.Err())
	return effects, total
}

func TestInbox_DuplicatesAndFailedDeliveriesHaveExactlyOnceEffects(t *testing.T) {
	f := setup(t)
	var mu sync.Mutex
	attempts := map[string]int{}
	c, err := inbox.New(f.js, f.pool, inbox.Config{Durable: "ledger", Backoff: []time.Duration{20 * time.Millisecond}},
		func(ctx context.Context, tx pgx.Tx, msg jetstream.Msg) error {
			id := msg.Headers().Get(jetstream.MsgIDHeader)
			if err := credit(ctx, tx, msg); err != nil {
				return err
			}
			mu.Lock()
			attempts[id]++
			n := attempts[id]
			mu.Unlock()
			// Every third event fails twice, after its effect was written: the rollback
			// must undo it.
			if i, _ := strconv.Atoi(id[1:]); i%3 == 0 && n <= 2 {
				return errors.New("transient failure")
			}
			return nil
		})
	require.NoError(t, err)

	want := 0
	for i := 0; i < 30; i++ {
		f.publish(t, fmt.Sprintf("e%d", i), i+1)
		want += i + 1
	}
	time.Sleep(150 * time.Millisecond) // let the stream's 100ms duplicate window pass
	for i := 0; i < 30; i += 4 {
		f.publish(t, fmt.Sprintf("e%d", i), i+1) // stored again: a real duplicate delivery
	}
	run(t, c)

	require.Eventually(t, func() bool {
		s := c.Stats()
		return s.Processed == 30 && s.Duplicates == 8
	}, 30*time.Second, 20*time.Millisecond, "stats %+v", c.Stats())
	effects, total := ledger(t, f.pool)
	require.Len(t, effects, 30)
	for id, n := range effects {
		require.Equal(t, 1, n, "effect of %s applied %d times", id, n)
	}
	require.Equal(t, want, total)
	require.EqualValues(t, 20, c.Stats().Failures, "10 events failed twice each")
	var recorded int
	require.NoError(t, f.pool.QueryRow(context.Background(), `SELECT count(*) FROM processed_events`).Scan(&recorded))
	require.Equal(t, 30, recorded)
}

// A handler slower than AckWait: the server redelivers while the first delivery is still
// running; the first commits and acks (too late), the redelivery is then a duplicate.
func TestInbox_RedeliveryAfterAckWaitIsSkipped(t *testing.T) {
	f := setup(t)
	var calls sync.Map
	c, err := inbox.New(f.js, f.pool, inbox.Config{Durable: "slow", AckWait: 300 * time.Millisecond},
		func(ctx context.Context, tx pgx.Tx, msg jetstream.Msg) error {
			id := msg.Headers().Get(jetstream.MsgIDHeader)
			n, _ := calls.LoadOrStore(id, new(int))
			*n.(*int)++
			if id == "slow" {
				time.Sleep(700 * time.Millisecond) // the fault: longer than AckWait
			}
			return credit(ctx, tx, msg)
		})
	require.NoError(t, err)
	f.publish(t, "slow", 5)
	f.publish(t, "next", 1)
	run(t, c)
	require.Eventually(t, func() bool {
		s := c.Stats()
		return s.Processed == 2 && s.Duplicates >= 1
	}, 20*time.Second, 20*time.Millisecond, "stats %+v", c.Stats())
	effects, total := ledger(t, f.pool)
	require.Equal(t, map[string]int{"slow": 1, "next": 1}, effects)
	require.Equal(t, 6, total)
}

func TestInbox_GivesUpAfterMaxDeliver(t *testing.T) {
	f := setup(t)
	var mu sync.Mutex
	tries := 0
	var gaveUp []string
	c, err := inbox.New(f.js, f.pool, inbox.Config{Durable: "poison", MaxDeliver: 3, Backoff: []time.Duration{10 * time.Millisecond},
		OnGiveUp: func(msg jetstream.Msg, err error) {
			mu.Lock()
			defer mu.Unlock()
			gaveUp = append(gaveUp, msg.Headers().Get(jetstream.MsgIDHeader))
		}},
		func(ctx context.Context, tx pgx.Tx, msg jetstream.Msg) error {
			if string(msg.Data()) == "-1" {
				mu.Lock()
				tries++
				mu.Unlock()
				return errors.New("cannot apply")
			}
			return credit(ctx, tx, msg)
		})
	require.NoError(t, err)
	f.publish(t, "bad", -1)
	f.publish(t, "good", 2)
	run(t, c)
	require.Eventually(t, func() bool {
		s := c.Stats()
		return s.Processed == 1 && s.GaveUp == 1
	}, 20*time.Second, 20*time.Millisecond, "stats %+v", c.Stats())
	mu.Lock()
	require.Equal(t, 3, tries)
	require.Equal(t, []string{"bad"}, gaveUp)
	mu.Unlock()
	effects, _ := ledger(t, f.pool)
	require.Equal(t, map[string]int{"good": 1}, effects)
	var recorded int
	require.NoError(t, f.pool.QueryRow(context.Background(), `SELECT count(*) FROM processed_events WHERE event_id = 'bad'`).Scan(&recorded))
	require.Zero(t, recorded, "a failed event is not recorded")
}
