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
	js := newStream(t)
	return fixture{pool: pool, js: js}
}

// newStream starts a nats-server process (the inbox's tests do not embed one, so the package
// keeps the nats-server module out of its importers' module graph) with a stream OUTBOX whose
// duplicate window is short enough to store a re-published copy.
func newStream(t testing.TB) jetstream.JetStream {
	t.Helper()
	n := testenv.StartNATSProcess(t, 0, "")
	nc, err := nats.Connect(n.URL)
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	_, err = js.CreateStream(context.Background(), jetstream.StreamConfig{Name: "OUTBOX", Subjects: []string{"outbox.>"}, Duplicates: 100 * time.Millisecond})
	require.NoError(t, err)
	return js
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

// consumerLedger is a handler recording (consumer, event id) per call.
func consumerLedger(t *testing.T, pool *pgxpool.Pool, name string) inbox.Handler {
	t.Helper()
	_, err := pool.Exec(context.Background(), `CREATE TABLE IF NOT EXISTS effects (consumer text NOT NULL, event_id text NOT NULL, subject text NOT NULL)`)
	require.NoError(t, err)
	return func(ctx context.Context, tx pgx.Tx, msg jetstream.Msg) error {
		_, err := tx.Exec(ctx, `INSERT INTO effects VALUES ($1, $2, $3)`, name, msg.Headers().Get(jetstream.MsgIDHeader), msg.Subject())
		return err
	}
}

func effects(t *testing.T, pool *pgxpool.Pool) []string {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT consumer || ' ' || event_id || ' ' || subject FROM effects ORDER BY 1`)
	require.NoError(t, err)
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return out
}

// Two consumers (different durables) sharing the processed-events table each process every
// event once.
func TestInbox_ConsumersSharingTheTableEachProcessEveryEvent(t *testing.T) {
	f := setup(t)
	var cs []*inbox.Consumer
	for _, name := range []string{"billing", "shipping"} {
		c, err := inbox.New(f.js, f.pool, inbox.Config{Durable: name}, consumerLedger(t, f.pool, name))
		require.NoError(t, err)
		cs = append(cs, c)
	}
	f.publish(t, "e1", 1)
	f.publish(t, "e2", 2)
	for _, c := range cs {
		run(t, c)
	}
	require.Eventually(t, func() bool {
		return cs[0].Stats().Processed+cs[0].Stats().Duplicates == 2 && cs[1].Stats().Processed+cs[1].Stats().Duplicates == 2
	}, 20*time.Second, 20*time.Millisecond)
	require.Equal(t, []string{
		"billing e1 outbox.account.Credited", "billing e2 outbox.account.Credited",
		"shipping e1 outbox.account.Credited", "shipping e2 outbox.account.Credited",
	}, effects(t, f.pool))
	require.Zero(t, cs[0].Stats().Duplicates+cs[1].Stats().Duplicates)
}

// The relay's dead letter of an event and the corrected event, re-published later with the
// same id, are both processed; a redelivery of either is still a duplicate.
func TestInbox_CorrectedRepublishOfADeadLetterIsProcessed(t *testing.T) {
	f := setup(t)
	c, err := inbox.New(f.js, f.pool, inbox.Config{Durable: "billing"}, consumerLedger(t, f.pool, "billing"))
	require.NoError(t, err)
	dl := nats.NewMsg("outbox.dead-letter")
	dl.Header.Set(jetstream.MsgIDHeader, "e1")
	dl.Header.Set(inbox.HeaderPoisonReason, "headers column key \"content type\" is not a valid NATS header key")
	_, err = f.js.PublishMsg(context.Background(), dl)
	require.NoError(t, err)
	time.Sleep(150 * time.Millisecond) // the stream's 100ms duplicate window
	f.publish(t, "e1", 1)              // corrected
	time.Sleep(150 * time.Millisecond)
	f.publish(t, "e1", 1) // a duplicate of the corrected one
	run(t, c)
	require.Eventually(t, func() bool { s := c.Stats(); return s.Processed+s.Duplicates == 3 }, 20*time.Second, 20*time.Millisecond)
	require.Equal(t, []string{"billing e1 outbox.account.Credited", "billing e1 outbox.dead-letter"}, effects(t, f.pool))
	require.EqualValues(t, 1, c.Stats().Duplicates)
}

// A table of the earlier layout (primary key event_id alone) keeps working as it did
// (deduplicating on the id for everyone) until MigrateTable; its rows then still count as
// processed by every consumer, and new events are recorded per consumer.
func TestInbox_EarlierTableLayoutWorksAndMigrates(t *testing.T) {
	ctx := context.Background()
	pg := testenv.Postgres(t)
	pool, err := pgxpool.New(ctx, pg.URL)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	_, err = pool.Exec(ctx, `CREATE TABLE processed_events (event_id text PRIMARY KEY, subject text NOT NULL, processed_at timestamptz NOT NULL DEFAULT now())`)
	require.NoError(t, err)
	require.NoError(t, inbox.EnsureTable(ctx, pool, ""), "leaves the earlier layout alone")
	js := newStream(t)
	f := fixture{pool: pool, js: js}

	a, err := inbox.New(js, pool, inbox.Config{Durable: "billing"}, consumerLedger(t, pool, "billing"))
	require.NoError(t, err)
	f.publish(t, "old", 1)
	actx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- a.Run(actx) }()
	require.Eventually(t, func() bool { return a.Stats().Processed == 1 }, 20*time.Second, 20*time.Millisecond)
	cancel()
	require.NoError(t, <-done)

	require.NoError(t, inbox.MigrateTable(ctx, pool, ""))
	require.NoError(t, inbox.MigrateTable(ctx, pool, ""), "again: nothing to do")
	f.publish(t, "new", 2)
	b, err := inbox.New(js, pool, inbox.Config{Durable: "shipping"}, consumerLedger(t, pool, "shipping"))
	require.NoError(t, err)
	a, err = inbox.New(js, pool, inbox.Config{Durable: "billing"}, consumerLedger(t, pool, "billing"))
	require.NoError(t, err)
	run(t, a)
	run(t, b)
	require.Eventually(t, func() bool {
		return a.Stats().Processed == 1 && b.Stats().Processed == 1 && b.Stats().Duplicates == 1
	}, 20*time.Second, 20*time.Millisecond, "a %+v b %+v", a.Stats(), b.Stats())
	require.Equal(t, []string{
		"billing new outbox.account.Credited", "billing old outbox.account.Credited",
		"shipping new outbox.account.Credited",
	}, effects(t, pool), "old was recorded before the migration: processed for every consumer")
}
