package main

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// poller is the classic polling outbox relay from the literature, for comparison: in one
// transaction, SELECT ... FOR UPDATE SKIP LOCKED LIMIT 100 the oldest unpublished rows, publish
// them (async, with the id as Nats-Msg-Id, waiting for every ack), mark them published, commit;
// when a poll returns fewer than a full batch, sleep 100 ms.
type poller struct {
	pool       *pgxpool.Pool
	js         jetstream.JetStream
	prefix     string
	batch      int
	interval   time.Duration
	statements atomic.Int64 // SQL statements sent (BEGIN, SELECT, UPDATE, COMMIT)
	published  atomic.Int64
}

// pollingSchema adds what a polling relay needs: a published_at column and a partial index of
// the rows still to publish.
const pollingSchema = `ALTER TABLE outbox ADD COLUMN published_at timestamptz;
CREATE INDEX outbox_unpublished ON outbox (created_at) WHERE published_at IS NULL;`

func newPoller(pool *pgxpool.Pool, nc *nats.Conn, prefix string) (*poller, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	return &poller{pool: pool, js: js, prefix: prefix, batch: 100, interval: 100 * time.Millisecond}, nil
}

func (p *poller) run(ctx context.Context) error {
	for ctx.Err() == nil {
		n, err := p.poll(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if n < p.batch {
			select {
			case <-time.After(p.interval):
			case <-ctx.Done():
			}
		}
	}
	return nil
}

func (p *poller) poll(ctx context.Context) (int, error) {
	tx, err := p.pool.Begin(ctx)
	p.statements.Add(1)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck
	rows, err := tx.Query(ctx, `SELECT id::text, aggregate_type, event_type, payload::text FROM outbox
		WHERE published_at IS NULL ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED`, p.batch)
	p.statements.Add(1)
	if err != nil {
		return 0, err
	}
	var ids []string
	var futs []jetstream.PubAckFuture
	for rows.Next() {
		var id, typ, ev, payload string
		if err := rows.Scan(&id, &typ, &ev, &payload); err != nil {
			return 0, err
		}
		m := nats.NewMsg(p.prefix + "." + typ + "." + ev)
		m.Data = []byte(payload)
		m.Header.Set(jetstream.MsgIDHeader, id)
		f, err := publishAsync(p.js, m)
		if err != nil {
			return 0, err
		}
		ids, futs = append(ids, id), append(futs, f)
	}
	if err := rows.Err(); err != nil {
		return 0, err
	}
	for _, f := range futs {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			return 0, fmt.Errorf("publish: %w", err)
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	if len(ids) > 0 {
		if _, err := tx.Exec(ctx, `UPDATE outbox SET published_at = now() WHERE id = ANY($1::uuid[])`, ids); err != nil {
			return 0, err
		}
		p.statements.Add(1)
	}
	err = tx.Commit(ctx)
	p.statements.Add(1)
	if err != nil && !errors.Is(err, pgx.ErrTxClosed) {
		return 0, err
	}
	p.published.Add(int64(len(ids)))
	return len(ids), nil
}
