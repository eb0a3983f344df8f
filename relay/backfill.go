package relay

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/internal/redact"
	"github.com/outbox-relay/outbox-relay/sink"
)

// backfillWindow is how many publishes are in flight at once.
const backfillWindow = 256

// BackfillRange is what Backfill republishes: rows created in [Since, Until).
type BackfillRange struct {
	Since  time.Time
	Until  *time.Time // nil: no bound
	DryRun bool       // count the rows, publish nothing
}

// BackfillResult counts what Backfill did.
type BackfillResult struct {
	Rows       int // rows read (with DryRun: rows in range)
	Stored     int // acknowledged by JetStream, duplicates included
	Duplicates int // already in the stream
}

// Backfill republishes the outbox rows created in r from the table itself, e.g. after a slot
// gap: in (created_at, id) order, with the same subject, body and headers as the relay (cfg is
// the relay's), Nats-Msg-Id = id and Outbox-Backfill: true. JetStream drops those it still
// holds within its duplicate window. Per-aggregate order between backfilled and live events is
// not guaranteed; the relay's own order is kept. On a replicated stream the backfill publishes
// in chunks while the relay hands the stream over through the position bucket.
func Backfill(ctx context.Context, cfg Config, r BackfillRange, opts ...Option) (BackfillResult, error) {
	var res BackfillResult
	o := newOptions(opts)
	log := o.log
	cfg, err := cfg.resolve()
	if err != nil {
		return res, err
	}
	if err := cfg.oneTable("backfill"); err != nil {
		return res, err
	}
	if cfg.Columns.CreatedAt == "" {
		return res, configErr("backfill selects rows by Config.Columns.CreatedAt, which must name a column")
	}

	conn, err := connectText(ctx, cfg.PGURL)
	if err != nil {
		return res, err
	}
	defer conn.Close(context.Background())
	q := newBackfillQuery(cfg)
	if r.DryRun {
		res.Rows, err = q.count(ctx, conn, r)
		return res, err
	}
	nc, err := sink.Connect(cfg.NATSURL, cfg.NATSOptions...)
	if err != nil {
		return res, err
	}
	defer nc.Close()
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(backfillWindow))
	if err != nil {
		return res, err
	}
	chain, err := newBackfillChain(ctx, conn, js, cfg.PGURL, cfg.PositionBucket, cfg.Sink, log)
	if err != nil {
		return res, err
	}
	if chain != nil {
		defer chain.release()
	}
	pos, err := backfillPosition(ctx, js, cfg)
	if err != nil {
		return res, err
	}
	if res, err = q.publish(ctx, conn, js, chain, r, pos); err != nil {
		return res, err
	}
	ev := log.Info().Int("rows", res.Rows).Int("stored", res.Stored).Int("duplicates", res.Duplicates)
	if chain != nil {
		chain.release()
		ev = ev.Int("handovers", chain.handovers).Dur("stream_held", chain.heldFor)
	}
	ev.Msg("backfill done")
	return res, nil
}

// connectText connects for the backfill's SELECT, with text output as the replication
// connection gets it, so the decoder sees the same bytes.
func connectText(ctx context.Context, url string) (*pgx.Conn, error) {
	pcfg, err := pgx.ParseConfig(url)
	if err != nil {
		return nil, &ConfigError{fmt.Errorf("parse Config.PGURL %s: %w", redact.URL(url), redact.Echoed(err, url))}
	}
	pcfg.RuntimeParams["DateStyle"] = "ISO, MDY"
	pcfg.RuntimeParams["TimeZone"] = "UTC"
	pcfg.RuntimeParams["bytea_output"] = "hex"
	if pcfg.RuntimeParams["application_name"] == "" {
		pcfg.RuntimeParams["application_name"] = "outbox-relay backfill"
	}
	conn, err := pgx.ConnectConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("connect to Postgres at %s:%d: %w", pcfg.Host, pcfg.Port, err)
	}
	return conn, nil
}

// backfillPosition is the position backfilled messages carry: the stream's current last one,
// so that the relay's replay-skip position (LastStored) does not move.
func backfillPosition(ctx context.Context, js jetstream.JetStream, cfg Config) (sink.Position, error) {
	pos, seq, _, err := sink.LastStored(ctx, js, cfg.Sink)
	if err != nil {
		return pos, err
	}
	if cfg.PositionBucket != "" {
		// After a change of cluster the stream's last message may still be the old cluster's:
		// its position must not become the new cluster's skip position. 0/0 skips nothing.
		rec, ok, err := sink.ReadPositionRecord(ctx, js, cfg.PositionBucket, cfg.Sink)
		if err != nil {
			return pos, err
		}
		if ok && seq <= rec.SeqFloor {
			pos = sink.Position{}
		}
	}
	return pos, nil
}

// backfillQuery selects the mapped columns of the rows in a range, in (created_at, id) order.
type backfillQuery struct {
	cfg       Config
	names     []string // the selected columns
	table, ca string   // quoted table and created_at column
	sql       string
}

func newBackfillQuery(cfg Config) backfillQuery {
	names := []string{cfg.Columns.ID, cfg.Columns.AggregateType, cfg.Columns.AggregateID, cfg.Columns.EventType, cfg.Columns.Payload, cfg.Columns.CreatedAt}
	if cfg.Columns.Headers != "" {
		names = append(names, cfg.Columns.Headers)
	}
	sel := ""
	for i, n := range names {
		if i > 0 {
			sel += ", "
		}
		sel += pgx.Identifier{n}.Sanitize()
	}
	q := backfillQuery{cfg: cfg, names: names, table: pgx.Identifier{cfg.Schema, cfg.Table}.Sanitize(), ca: pgx.Identifier{cfg.Columns.CreatedAt}.Sanitize()}
	q.sql = fmt.Sprintf(`SELECT %s FROM %s WHERE %s >= $1::timestamptz AND ($2::timestamptz IS NULL OR %s < $2::timestamptz) ORDER BY %s, %s`,
		sel, q.table, q.ca, q.ca, q.ca, pgx.Identifier{cfg.Columns.ID}.Sanitize())
	return q
}

// count counts the rows in r.
func (q backfillQuery) count(ctx context.Context, conn *pgx.Conn, r BackfillRange) (int, error) {
	var n int64
	err := conn.QueryRow(ctx, fmt.Sprintf(`SELECT count(*) FROM %s WHERE %s >= $1::timestamptz AND ($2::timestamptz IS NULL OR %s < $2::timestamptz)`,
		q.table, q.ca, q.ca), r.Since, r.Until).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("count the rows to backfill: %w", err)
	}
	return int(n), nil
}

// publish publishes the rows in r, stamped at pos, backfillWindow at a time.
// With chain (a replicated stream), one at a time through the relay's hand-over.
func (q backfillQuery) publish(ctx context.Context, conn *pgx.Conn, js jetstream.JetStream, chain *backfillChain, r BackfillRange, pos sink.Position) (BackfillResult, error) {
	var res BackfillResult
	cfg := q.cfg
	var toParam any
	if r.Until != nil {
		toParam = r.Until.UTC().Format(time.RFC3339Nano)
	}
	rr := conn.PgConn().ExecParams(ctx, q.sql, [][]byte{[]byte(r.Since.UTC().Format(time.RFC3339Nano)), nilOrBytes(toParam)}, nil, nil, nil)
	dec := decoder.New(decoder.Config{Schema: cfg.Schema, Table: cfg.Table, Columns: cfg.Columns, Subject: cfg.subject})
	fds := rr.FieldDescriptions()
	cols := make([]decoder.RowColumn, len(q.names))
	for i, n := range q.names {
		cols[i] = decoder.RowColumn{Name: n, TypeOID: fds[i].DataTypeOID}
	}
	// Each row goes through the relay's own decoder, so columns are interpreted exactly as the
	// relay does: the SELECT returns each type's text output, the same bytes pgoutput sends.
	if err := dec.SetRowColumns(cols); err != nil {
		rr.Close()
		return res, fmt.Errorf("backfill: %w", err)
	}
	var (
		futs   []jetstream.PubAckFuture
		ackErr error
	)
	wait := func() {
		for _, f := range futs {
			select {
			case ack := <-f.Ok():
				res.Stored++
				if ack.Duplicate {
					res.Duplicates++
				}
			case err := <-f.Err():
				if ackErr == nil {
					ackErr = fmt.Errorf("publish %s: %w", f.Msg().Header.Get(sink.HeaderMsgID), err)
				}
			}
		}
		futs = futs[:0]
	}
	for rr.NextRow() {
		ev, err := dec.DecodeRow(rr.Values(), pos.CommitLSN, 0)
		if err != nil {
			rr.Close()
			return res, fmt.Errorf("backfill row %d: %w", res.Rows+1, err)
		}
		m, err := sink.BackfillMsg(cfg.Sink, ev, pos)
		if err != nil {
			rr.Close()
			return res, fmt.Errorf("backfill row %d: %w", res.Rows+1, err)
		}
		res.Rows++
		if chain != nil {
			dup, err := chain.publish(ctx, m)
			if err != nil {
				rr.Close()
				return res, err
			}
			res.Stored++
			if dup {
				res.Duplicates++
			}
			continue
		}
		f, err := js.PublishMsgAsync(m, jetstream.WithExpectStream(cfg.Sink.Stream))
		if err != nil {
			rr.Close()
			return res, fmt.Errorf("publish %s: %w", m.Header.Get(sink.HeaderMsgID), err)
		}
		futs = append(futs, f)
		if len(futs) >= backfillWindow {
			wait()
			if ackErr != nil {
				rr.Close()
				return res, ackErr
			}
		}
	}
	if _, err := rr.Close(); err != nil {
		return res, fmt.Errorf("read %s.%s: %w", cfg.Schema, cfg.Table, err)
	}
	wait()
	return res, ackErr
}

func nilOrBytes(v any) []byte {
	if s, ok := v.(string); ok {
		return []byte(s)
	}
	return nil
}
