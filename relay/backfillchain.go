package relay

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/sink"
)

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

// newBackfillChain returns nil for a single-replica stream that takes neither atomic nor fast
// batches:
// there the relay chains on message ids and a backfill next to it only costs re-chains, and the
// backfill publishes freely. A relay publishing atomic or fast batches (--publish atomic, which
// needs allow_atomic, or fast, which needs allow_batched) chains on the sequence on any stream,
// as on a replicated one.
func newBackfillChain(ctx context.Context, conn *pgx.Conn, js jetstream.JetStream, pgURL, bucket string, scfg sink.Config, log zerolog.Logger) (*backfillChain, error) {
	s, err := js.Stream(ctx, scfg.Stream)
	if err != nil {
		return nil, fmt.Errorf("look up stream %s: %w", scfg.Stream, err)
	}
	replicas := s.CachedInfo().Config.Replicas
	cfg := s.CachedInfo().Config
	if replicas <= 1 && !cfg.AllowAtomicPublish && !cfg.AllowBatchPublish {
		return nil, nil
	}
	c := &backfillChain{js: js, stream: scfg.Stream, log: log,
		relayLive: func(ctx context.Context) (bool, error) {
			qc, err := ConnectPG(ctx, pgURL)
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
		kind := fmt.Sprintf("is replicated (R%d)", replicas)
		if replicas <= 1 {
			kind = "takes atomic or fast batches (allow_atomic or allow_batched)"
		}
		return nil, fmt.Errorf("stream %s %s and slot(s) %v are streaming, but there is no position bucket %q through which the relay could hand the stream over: a backfill next to a live relay that chains on the stream's sequence could let one of the relay's events be stored after a gap. Run the relay with a position bucket (the default) and give backfill the same, or stop the relay for the backfill (it resumes from its slot afterwards)",
			scfg.Stream, kind, slots, bucket)
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
