package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/internal/redact"
	"github.com/outbox-relay/outbox-relay/sink"
)

const backfillUsage = `Republish outbox rows created in a time range from the table itself, e.g. after a slot gap.

  outbox-relay backfill --since <RFC 3339 time> [--until <time>] [--dry-run] --pg-url ... --nats-url ...

Rows with created_at in [since, until) are published in (created_at, id) order with the same
subject, body and headers as the relay, Nats-Msg-Id = id, and Outbox-Backfill: true. JetStream
drops those it still holds within its duplicate window. Per-aggregate order between backfilled
and live events is not guaranteed; the relay's own order is kept. On a replicated stream the
backfill publishes in chunks while the relay hands the stream over through --position-bucket.`

// backfillWindow is how many publishes are in flight at once.
const backfillWindow = 256

func cmdBackfill(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) (string, bool)) error {
	fs := newFlagSet("backfill", backfillUsage, stderr)
	var (
		lf                              logFlags
		auth                            natsAuth
		pgURL, natsURL, table, template string
		since, until, bucket            string
		dryRun                          bool
		scfg                            sink.Config
		cols                            decoder.Columns
	)
	fs.StringVar(&pgURL, "pg-url", "", "Postgres connection URL or DSN (required)")
	fs.StringVar(&natsURL, "nats-url", nats.DefaultURL, "NATS server URL(s), comma separated")
	auth.register(fs)
	fs.StringVar(&table, "table", "public.outbox", "outbox table, schema.table")
	fs.StringVar(&scfg.Stream, "stream", sink.DefaultStream, "JetStream stream (must exist)")
	fs.StringVar(&scfg.SubjectPrefix, "subject-prefix", sink.DefaultSubjectPrefix, "as for run")
	fs.StringVar(&template, "subject-template", decoder.DefaultSubjectTemplate, "as for run")
	registerColumnFlags(fs, &cols)
	fs.StringVar(&since, "since", "", "republish rows with created_at at or after this RFC 3339 time (required)")
	fs.StringVar(&until, "until", "", "and before this RFC 3339 time (default: no bound)")
	fs.BoolVar(&dryRun, "dry-run", false, "count the rows, publish nothing")
	fs.StringVar(&bucket, "position-bucket", sink.DefaultPositionBucket, "as for run")
	headers := fs.String("headers", "outbox", "as for run: outbox or cloudevents (give the relay's value: backfilled messages carry the same headers as live ones)")
	fs.StringVar(&scfg.CloudEventsSource, "cloudevents-source", sink.DefaultCloudEventsSource, "as for run")
	lf.register(fs)
	log, err := parseCommand(fs, args, env, &lf, stderr, &pgURL)
	if err != nil {
		return err
	}
	switch *headers {
	case "outbox":
	case "cloudevents":
		scfg.CloudEvents = true
	default:
		return usageError{fmt.Errorf("--headers %q: use outbox or cloudevents", *headers)}
	}
	from, err := time.Parse(time.RFC3339Nano, since)
	if err != nil {
		return usageError{fmt.Errorf("--since %q: use an RFC 3339 time, e.g. 2026-05-01T12:00:00Z", since)}
	}
	var to *time.Time
	if until != "" {
		t, err := time.Parse(time.RFC3339Nano, until)
		if err != nil {
			return usageError{fmt.Errorf("--until %q: use an RFC 3339 time", until)}
		}
		to = &t
	}
	schema, tbl, err := splitTable(table)
	if err != nil {
		return usageError{err}
	}
	if err := checkColumns(cols); err != nil {
		return usageError{err}
	}
	if cols.CreatedAt == "" {
		return usageError{errors.New("backfill selects rows by --column-created-at, which must name a column")}
	}
	subject, err := subjectTemplate(template, &scfg)
	if err != nil {
		return err
	}
	natsOpts, err := auth.options(natsURL)
	if err != nil {
		return usageError{err}
	}

	// Text output as the replication connection gets it, so the decoder sees the same bytes.
	pcfg, err := pgx.ParseConfig(pgURL)
	if err != nil {
		return usageError{fmt.Errorf("parse --pg-url %s: %w", redact.URL(pgURL), redact.Echoed(err, pgURL))}
	}
	pcfg.RuntimeParams["DateStyle"] = "ISO, MDY"
	pcfg.RuntimeParams["TimeZone"] = "UTC"
	pcfg.RuntimeParams["bytea_output"] = "hex"
	if pcfg.RuntimeParams["application_name"] == "" {
		pcfg.RuntimeParams["application_name"] = "outbox-relay backfill"
	}
	conn, err := pgx.ConnectConfig(ctx, pcfg)
	if err != nil {
		return fmt.Errorf("connect to Postgres at %s:%d: %w", pcfg.Host, pcfg.Port, err)
	}
	defer conn.Close(context.Background())

	names := []string{cols.ID, cols.AggregateType, cols.AggregateID, cols.EventType, cols.Payload, cols.CreatedAt}
	if cols.Headers != "" {
		names = append(names, cols.Headers)
	}
	sel := ""
	for i, n := range names {
		if i > 0 {
			sel += ", "
		}
		sel += pgx.Identifier{n}.Sanitize()
	}
	ca, id := pgx.Identifier{cols.CreatedAt}.Sanitize(), pgx.Identifier{cols.ID}.Sanitize()
	sql := fmt.Sprintf(`SELECT %s FROM %s WHERE %s >= $1::timestamptz AND ($2::timestamptz IS NULL OR %s < $2::timestamptz) ORDER BY %s, %s`,
		sel, pgx.Identifier{schema, tbl}.Sanitize(), ca, ca, ca, id)
	if dryRun {
		var n int64
		err := conn.QueryRow(ctx, fmt.Sprintf(`SELECT count(*) FROM %s WHERE %s >= $1::timestamptz AND ($2::timestamptz IS NULL OR %s < $2::timestamptz)`,
			pgx.Identifier{schema, tbl}.Sanitize(), ca, ca), from, to).Scan(&n)
		if err != nil {
			return fmt.Errorf("count the rows to backfill: %w", err)
		}
		fmt.Fprintf(stdout, "dry run: %d rows with %s in range would be republished to stream %s\n", n, cols.CreatedAt, scfg.Stream)
		return nil
	}

	nc, err := sink.Connect(natsURL, natsOpts...)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(backfillWindow))
	if err != nil {
		return err
	}
	chain, err := newBackfillChain(ctx, conn, js, pgURL, bucket, scfg, log)
	if err != nil {
		return err
	}
	if chain != nil {
		defer chain.release()
	}
	// Backfilled messages carry the stream's current last position, so the relay's
	// replay-skip position (LastStored) does not move.
	pos, seq, _, err := sink.LastStored(ctx, js, scfg)
	if err != nil {
		return err
	}
	if bucket != "" {
		// After a change of cluster the stream's last message may still be the old cluster's:
		// its position must not become the new cluster's skip position. 0/0 skips nothing.
		rec, ok, err := sink.ReadPositionRecord(ctx, js, bucket, scfg)
		if err != nil {
			return err
		}
		if ok && seq <= rec.SeqFloor {
			pos = sink.Position{}
		}
	}

	var toParam any
	if to != nil {
		toParam = to.UTC().Format(time.RFC3339Nano)
	}
	rr := conn.PgConn().ExecParams(ctx, sql, [][]byte{[]byte(from.UTC().Format(time.RFC3339Nano)), nilOrBytes(toParam)}, nil, nil, nil)
	dec := decoder.New(decoder.Config{Schema: schema, Table: tbl, Columns: cols, Subject: subject})
	if _, err := dec.Decode(relationMsg(schema, tbl, names, rr.FieldDescriptions())); err != nil {
		rr.Close()
		return fmt.Errorf("backfill: %w", err)
	}
	var (
		futs            []jetstream.PubAckFuture
		stored, dups, n int
		ackErr          error
		insert          []byte
	)
	wait := func() {
		for _, f := range futs {
			select {
			case ack := <-f.Ok():
				stored++
				if ack.Duplicate {
					dups++
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
		if _, err := dec.Decode(beginMsg(pos.CommitLSN)); err != nil {
			rr.Close()
			return err
		}
		insert = insertMsg(insert[:0], rr.Values())
		ch, err := dec.Decode(insert)
		if err != nil {
			rr.Close()
			return fmt.Errorf("backfill row %d: %w", n+1, err)
		}
		m, err := sink.BackfillMsg(scfg, ch.Event, pos)
		if err != nil {
			rr.Close()
			return fmt.Errorf("backfill row %d: %w", n+1, err)
		}
		if _, err := dec.Decode(commitMsg(pos.CommitLSN)); err != nil {
			rr.Close()
			return err
		}
		n++
		if chain != nil {
			dup, err := chain.publish(ctx, m)
			if err != nil {
				rr.Close()
				return err
			}
			stored++
			if dup {
				dups++
			}
			continue
		}
		f, err := js.PublishMsgAsync(m, jetstream.WithExpectStream(scfg.Stream))
		if err != nil {
			rr.Close()
			return fmt.Errorf("publish %s: %w", m.Header.Get(sink.HeaderMsgID), err)
		}
		futs = append(futs, f)
		if len(futs) >= backfillWindow {
			wait()
			if ackErr != nil {
				rr.Close()
				return ackErr
			}
		}
	}
	if _, err := rr.Close(); err != nil {
		return fmt.Errorf("read %s: %w", table, err)
	}
	wait()
	if ackErr != nil {
		return ackErr
	}
	ev := log.Info().Int("rows", n).Int("stored", stored).Int("duplicates", dups)
	if chain != nil {
		chain.release()
		ev = ev.Int("handovers", chain.handovers).Dur("stream_held", chain.heldFor)
	}
	ev.Msg("backfill done")
	fmt.Fprintf(stdout, "backfill: %d rows read, %d newly stored, %d duplicates (already in the stream)\n", n, stored-dups, dups)
	return nil
}

// backfillChain publishes into a replicated stream. There the relay chains its window on the
// sequence each of its messages will get, which a message stored by another publisher can
// break (see package sink), so backfill publishes only while the relay hands the stream over
// (sink.Handover), one message at a time, each expecting the sequence of the one before.
type backfillChain struct {
	js        jetstream.JetStream
	ho        *sink.Handover // nil: no position bucket; no relay streams (checked at start)
	stream    string
	relayLive func(context.Context) (bool, error)
	log       zerolog.Logger

	held       bool
	seq        uint64    // the stream's last sequence: what the next message expects
	until      time.Time // end of the lease: nothing is sent after it
	chunkEnd   time.Time
	chunk      int
	handovers  int
	heldFor    time.Duration
	chunkStart time.Time
}

// Waits of the hand-over: for a relay's grant before checking that one streams at all, and
// in all.
const (
	handoverGrantWait = 3 * time.Second
	handoverMaxWait   = 60 * time.Second
	// handoverGap: after a chunk the stream is the relay's for at least this long.
	handoverGap = 100 * time.Millisecond
)

// newBackfillChain returns nil for a single-replica stream: there the relay chains on message
// ids and a backfill next to it only costs re-chains, and the backfill publishes freely.
func newBackfillChain(ctx context.Context, conn *pgx.Conn, js jetstream.JetStream, pgURL, bucket string, scfg sink.Config, log zerolog.Logger) (*backfillChain, error) {
	s, err := js.Stream(ctx, scfg.Stream)
	if err != nil {
		return nil, fmt.Errorf("look up stream %s: %w", scfg.Stream, err)
	}
	replicas := s.CachedInfo().Config.Replicas
	if replicas <= 1 {
		return nil, nil
	}
	c := &backfillChain{js: js, stream: scfg.Stream, log: log,
		relayLive: func(ctx context.Context) (bool, error) {
			qc, err := connectPG(ctx, pgURL)
			if err != nil {
				return false, err
			}
			defer qc.Close(context.Background())
			slots, err := streamingSlots(ctx, qc)
			return len(slots) > 0, err
		}}
	if bucket != "" {
		c.ho, err = sink.OpenHandover(ctx, js, bucket, scfg, log)
		if err != nil && !errors.Is(err, jetstream.ErrBucketNotFound) {
			return nil, err
		}
	}
	if c.ho != nil {
		return c, nil
	}
	// No bucket: no relay can hand the stream over, and none may stream. The last sequence is
	// read before the check: a relay that starts streaming after it stores its first message
	// alone, after that sequence, and the backfill's next message is refused from then on.
	c.seq = s.CachedInfo().State.LastSeq
	c.until = time.Now().Add(100 * 365 * 24 * time.Hour)
	slots, err := streamingSlots(ctx, conn)
	if err != nil {
		return nil, err
	}
	if len(slots) > 0 {
		return nil, fmt.Errorf("stream %s is replicated (R%d) and slot(s) %v are streaming, but there is no position bucket %q through which the relay could hand the stream over: a backfill next to a live relay on a replicated stream could let one of the relay's events be stored after a gap. Run the relay with --position-bucket (the default) and give backfill the same, or stop the relay for the backfill (it resumes from its slot afterwards)",
			scfg.Stream, replicas, slots, bucket)
	}
	return c, nil
}

// streamingSlots lists the pgoutput slots of the database that a client streams from.
func streamingSlots(ctx context.Context, conn *pgx.Conn) ([]string, error) {
	rows, err := conn.Query(ctx, `SELECT slot_name FROM pg_replication_slots WHERE database = current_database() AND slot_type = 'logical' AND plugin = 'pgoutput' AND active ORDER BY 1`)
	if err != nil {
		return nil, fmt.Errorf("list the active replication slots: %w", err)
	}
	slots, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("list the active replication slots: %w", err)
	}
	return slots, nil
}

// acquire takes the stream: a grant from the relay (or, when none streams, from itself).
// Without a bucket the chain read at start is the only one (a failure ends the backfill).
func (c *backfillChain) acquire(ctx context.Context) error {
	if c.ho != nil {
		seq, until, err := c.ho.Acquire(ctx, handoverGrantWait, handoverMaxWait, c.relayLive)
		if err != nil {
			return err
		}
		c.seq, c.until = seq, until
		c.handovers++
	}
	c.held, c.chunk = true, 0
	c.chunkStart = time.Now()
	c.chunkEnd = c.chunkStart.Add(sink.BackfillChunkTime)
	return nil
}

// release hands the stream back to the relay.
func (c *backfillChain) release() {
	if !c.held {
		return
	}
	c.held = false
	c.heldFor += time.Since(c.chunkStart)
	if c.ho != nil {
		c.ho.Release(context.Background())
	}
}

// publish stores m right after the message before it (or the grant's sequence), waiting for
// its ack: dup reports a copy of a message the stream already held (it takes no sequence).
// A refused expectation means the stream was not ours any more (the lease ran out): the
// message is published again under a new grant.
func (c *backfillChain) publish(ctx context.Context, m *nats.Msg) (dup bool, err error) {
	id := m.Header.Get(sink.HeaderMsgID)
	for attempt := 1; ; attempt++ {
		now := time.Now()
		if c.ho != nil && c.held && (c.chunk >= sink.BackfillChunk || now.After(c.chunkEnd) || now.After(c.until)) {
			c.release()
			select {
			case <-time.After(handoverGap):
			case <-ctx.Done():
				return false, ctx.Err()
			}
		}
		if !c.held {
			if err := c.acquire(ctx); err != nil {
				return false, err
			}
		}
		pctx, cancel := context.WithTimeout(ctx, sink.DefaultAckTimeout)
		ack, err := c.js.PublishMsg(pctx, m, jetstream.WithExpectStream(c.stream), jetstream.WithExpectLastSequence(c.seq))
		cancel()
		if err == nil {
			c.chunk++
			if !ack.Duplicate {
				c.seq = ack.Sequence
			}
			return ack.Duplicate, nil
		}
		var apiErr *jetstream.APIError
		permanent := errors.As(err, &apiErr) && apiErr.ErrorCode != jetstream.JSErrCodeStreamWrongLastSequence &&
			apiErr.ErrorCode != jetstream.JSErrCodeStreamWrongLastSequenceConstant
		if permanent || c.ho == nil || attempt >= 5 || ctx.Err() != nil {
			if c.ho == nil && !permanent {
				err = fmt.Errorf("%w (another publisher, a relay that started meanwhile?, wrote to the stream: run the backfill again, its ids deduplicate what it already stored)", err)
			}
			return false, fmt.Errorf("publish %s: %w", id, err)
		}
		// The outcome is unknown or the stream moved on: hand it back and ask again.
		c.log.Warn().Err(err).Str("id", id).Int("attempt", attempt).Msg("backfill publish failed; asking for the stream again")
		c.release()
	}
}

func nilOrBytes(v any) []byte {
	if s, ok := v.(string); ok {
		return []byte(s)
	}
	return nil
}

// The backfill feeds each row through the relay's own pgoutput decoder as a one-row
// transaction, so columns are interpreted exactly as the relay does: the SELECT returns the
// type's text output, the same bytes pgoutput sends.

func relationMsg(schema, table string, names []string, fds []pgconn.FieldDescription) []byte {
	b := []byte{'R'}
	b = binary.BigEndian.AppendUint32(b, 1)
	b = append(append(b, schema...), 0)
	b = append(append(b, table...), 0)
	b = append(b, 'd')
	b = binary.BigEndian.AppendUint16(b, uint16(len(names)))
	for i, n := range names {
		b = append(b, 0)
		b = append(append(b, n...), 0)
		b = binary.BigEndian.AppendUint32(b, fds[i].DataTypeOID)
		b = binary.BigEndian.AppendUint32(b, uint32(fds[i].TypeModifier))
	}
	return b
}

func beginMsg(lsn pglogrepl.LSN) []byte {
	b := []byte{'B'}
	b = binary.BigEndian.AppendUint64(b, uint64(lsn))
	b = binary.BigEndian.AppendUint64(b, 0)
	return binary.BigEndian.AppendUint32(b, 0)
}

func commitMsg(lsn pglogrepl.LSN) []byte {
	b := []byte{'C', 0}
	b = binary.BigEndian.AppendUint64(b, uint64(lsn))
	b = binary.BigEndian.AppendUint64(b, uint64(lsn))
	return binary.BigEndian.AppendUint64(b, 0)
}

func insertMsg(b []byte, vals [][]byte) []byte {
	b = append(b, 'I')
	b = binary.BigEndian.AppendUint32(b, 1)
	b = append(b, 'N')
	b = binary.BigEndian.AppendUint16(b, uint16(len(vals)))
	for _, v := range vals {
		if v == nil {
			b = append(b, 'n')
			continue
		}
		b = append(b, 't')
		b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
		b = append(b, v...)
	}
	return b
}
