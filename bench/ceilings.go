package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// drainSlot is the bare pglogrepl loop: it streams slot with pgoutput and calls onInsert for
// every INSERT (pglogrepl.Parse, no copying beyond what pglogrepl does) until n inserts were
// seen, and onCommit (when not nil) for every commit. It answers keepalives and confirms
// nothing.
func drainSlot(ctx context.Context, url, slot string, n int, onInsert func(rel *pglogrepl.RelationMessage, ins *pglogrepl.InsertMessage) error, onCommit func() error) error {
	conn, err := pgconn.Connect(ctx, url+"&replication=database")
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	err = pglogrepl.StartReplication(ctx, conn, slot, 0, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names 'outbox_pub'"}})
	if err != nil {
		return fmt.Errorf("start replication: %w", err)
	}
	rels := map[uint32]*pglogrepl.RelationMessage{}
	seen, inTx := 0, false
	for seen < n || inTx {
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		raw, err := conn.ReceiveMessage(rctx)
		cancel()
		if err != nil {
			return fmt.Errorf("receive after %d inserts: %w", seen, err)
		}
		cd, ok := raw.(*pgproto3.CopyData)
		if !ok {
			if e, ok := raw.(*pgproto3.ErrorResponse); ok {
				return errors.New(e.Message)
			}
			continue
		}
		switch cd.Data[0] {
		case pglogrepl.PrimaryKeepaliveMessageByteID:
			ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(cd.Data[1:])
			if err != nil {
				return err
			}
			if ka.ReplyRequested {
				if err := pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{WALWritePosition: 1, WALFlushPosition: 1, WALApplyPosition: 1}); err != nil {
					return err
				}
			}
		case pglogrepl.XLogDataByteID:
			xld, err := pglogrepl.ParseXLogData(cd.Data[1:])
			if err != nil {
				return err
			}
			m, err := pglogrepl.Parse(xld.WALData)
			if err != nil {
				return err
			}
			switch m := m.(type) {
			case *pglogrepl.RelationMessage:
				rels[m.RelationID] = m
			case *pglogrepl.BeginMessage:
				inTx = onCommit != nil
			case *pglogrepl.CommitMessage:
				inTx = false
				if onCommit != nil {
					if err := onCommit(); err != nil {
						return err
					}
				}
			case *pglogrepl.InsertMessage:
				seen++
				if onInsert != nil {
					if err := onInsert(rels[m.RelationID], m); err != nil {
						return err
					}
				}
			}
		}
	}
	return nil
}

// ceilingA: rows/s of the bare decode loop.
func ceilingA(ctx context.Context, d *db, slot string, n int) (float64, error) {
	start := time.Now()
	if err := drainSlot(ctx, d.url, slot, n, nil, nil); err != nil {
		return 0, fmt.Errorf("ceiling A: %w", err)
	}
	return float64(n) / time.Since(start).Seconds(), nil
}

// ceilingB: msgs/s of bare JetStream async publish with Nats-Msg-Id, waiting for every ack.
func (e *env) ceilingB(ctx context.Context, stream, prefix string, n, payloadBytes int) (float64, error) {
	if _, err := e.newStream(ctx, stream, prefix); err != nil {
		return 0, err
	}
	defer e.js.DeleteStream(context.Background(), stream)
	payload := make([]byte, payloadBytes)
	for i := range payload {
		payload[i] = 'x'
	}
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("00000000-0000-4000-8000-%012d", i)
	}
	subject := prefix + ".order.OrderCreated"
	js, err := jetstream.New(e.nc)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	for i := 0; i < n; i++ {
		m := nats.NewMsg(subject)
		m.Data = payload
		m.Header.Set(jetstream.MsgIDHeader, ids[i])
		if _, err := publishAsync(js, m); err != nil {
			return 0, fmt.Errorf("ceiling B publish: %w", err)
		}
	}
	if err := waitAsync(ctx, js); err != nil {
		return 0, fmt.Errorf("ceiling B: %w", err)
	}
	el := time.Since(start)
	if got, _ := e.streamMsgs(ctx, stream); got != uint64(n) {
		return 0, fmt.Errorf("ceiling B: stream has %d of %d messages", got, n)
	}
	return float64(n) / el.Seconds(), nil
}

// publishAsync is PublishMsgAsync that waits while too many acks are outstanding (nats.go
// gives up after 200 ms by default, which a loaded machine exceeds).
func publishAsync(js jetstream.JetStream, m *nats.Msg) (jetstream.PubAckFuture, error) {
	for {
		f, err := js.PublishMsgAsync(m)
		if !errors.Is(err, jetstream.ErrTooManyStalledMsgs) {
			return f, err
		}
	}
}

func waitAsync(ctx context.Context, js jetstream.JetStream) error {
	select {
	case <-js.PublishAsyncComplete():
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(2 * time.Minute):
		return fmt.Errorf("acks still pending after 2 minutes (%d)", js.PublishAsyncPending())
	}
}

// ceilingD: the bare pipe. Drain the slot, publish each row's payload with its id as
// Nats-Msg-Id (async), wait for every ack; no ordering chain, no checkpoint, no headers beyond
// the id.
//
// With relayHeaders the loop sends the same headers as the relay (its seven Outbox-* and
// Nats-Msg-Id headers plus Nats-Expected-Stream and Nats-Expected-Last-Msg-Id): a diagnostic
// that separates the cost of the message format (bytes on the wire, the server's header checks)
// from the cost of the relay's pipeline.
func (e *env) ceilingD(ctx context.Context, d *db, slot, stream, prefix string, n int, relayHeaders bool) (float64, error) {
	if _, err := e.newStream(ctx, stream, prefix); err != nil {
		return 0, err
	}
	defer e.js.DeleteStream(context.Background(), stream)
	start := time.Now()
	if err := e.barePipeHeaders(ctx, d, slot, stream, prefix, n, relayHeaders); err != nil {
		return 0, fmt.Errorf("ceiling D: %w", err)
	}
	el := time.Since(start)
	if got, _ := e.streamMsgs(ctx, stream); got != uint64(n) {
		return 0, fmt.Errorf("ceiling D: stream has %d of %d messages", got, n)
	}
	return float64(n) / el.Seconds(), nil
}

// barePipe is ceiling D's loop: drain n inserts from slot, publish each, wait for every ack.
func (e *env) barePipe(ctx context.Context, d *db, slot, stream, prefix string, n int) error {
	return e.barePipeHeaders(ctx, d, slot, stream, prefix, n, false)
}

func (e *env) barePipeHeaders(ctx context.Context, d *db, slot, stream, prefix string, n int, relayHeaders bool) error {
	js, err := jetstream.New(e.nc)
	if err != nil {
		return err
	}
	var oc outboxCols
	var lastID string
	txIndex := 0
	err = drainSlot(ctx, d.url, slot, n, func(rel *pglogrepl.RelationMessage, ins *pglogrepl.InsertMessage) error {
		oc.find(rel)
		idCol, payCol, typCol, evCol, aggCol, createdCol := oc.id, oc.payload, oc.typ, oc.event, oc.agg, oc.created
		cols := ins.Tuple.Columns
		m := nats.NewMsg(prefix + "." + string(cols[typCol].Data) + "." + string(cols[evCol].Data))
		m.Data = cols[payCol].Data
		id := string(cols[idCol].Data)
		m.Header.Set(jetstream.MsgIDHeader, id)
		if relayHeaders {
			m.Header.Set("Outbox-Aggregate-Type", string(cols[typCol].Data))
			m.Header.Set("Outbox-Aggregate-Id", string(cols[aggCol].Data))
			m.Header.Set("Outbox-Event-Type", string(cols[evCol].Data))
			m.Header.Set("Outbox-Created-At", string(cols[createdCol].Data))
			m.Header.Set("Outbox-Commit-Lsn", "0/16B3F48")
			m.Header.Set("Outbox-Tx-Index", strconv.Itoa(txIndex%100))
			m.Header.Set(jetstream.ExpectedStreamHeader, stream)
			if lastID != "" {
				m.Header.Set(jetstream.ExpectedLastMsgIDHeader, lastID)
			}
			lastID = id
			txIndex++
		}
		_, err := publishAsync(js, m)
		return err
	}, nil)
	if err != nil {
		return err
	}
	return waitAsync(ctx, js)
}

// ceilingDAtomic: ceiling D with each transaction published as one JetStream atomic batch
// (Nats-Batch-Id, -Sequence, -Commit on the last): the messages before the commit without a
// reply, the commit async, waiting for every commit's ack at the end. At most 4,000 messages
// are in flight, as in D (nats.go's default), counted in batches of perTx: messages without a
// reply beyond the server's ingest queue would be dropped, and their batch refused.
func (e *env) ceilingDAtomic(ctx context.Context, d *db, slot, stream, prefix string, n, perTx int) (float64, error) {
	if _, err := e.newStream(ctx, stream, prefix); err != nil {
		return 0, err
	}
	defer e.js.DeleteStream(context.Background(), stream)
	start := time.Now()
	if err := e.barePipeAtomic(ctx, d, slot, prefix, n, max(1, 4000/perTx)); err != nil {
		return 0, fmt.Errorf("ceiling D-atomic: %w", err)
	}
	el := time.Since(start)
	if got, _ := e.streamMsgs(ctx, stream); got != uint64(n) {
		return 0, fmt.Errorf("ceiling D-atomic: stream has %d of %d messages", got, n)
	}
	return float64(n) / el.Seconds(), nil
}

func (e *env) barePipeAtomic(ctx context.Context, d *db, slot, prefix string, n, maxBatches int) error {
	js, err := jetstream.New(e.nc, jetstream.WithPublishAsyncMaxPending(maxBatches))
	if err != nil {
		return err
	}
	var acks []jetstream.PubAckFuture
	var oc outboxCols
	var tx []*nats.Msg
	batches := 0
	err = drainSlot(ctx, d.url, slot, n, func(rel *pglogrepl.RelationMessage, ins *pglogrepl.InsertMessage) error {
		tx = append(tx, oc.msg(prefix, rel, ins))
		return nil
	}, func() error {
		if len(tx) == 0 {
			return nil
		}
		batches++
		id := "b" + strconv.Itoa(batches)
		for i, m := range tx {
			m.Header.Set("Nats-Batch-Id", id)
			m.Header.Set("Nats-Batch-Sequence", strconv.Itoa(i+1))
			if i < len(tx)-1 {
				if err := e.nc.PublishMsg(m); err != nil {
					return err
				}
				continue
			}
			m.Header.Set("Nats-Batch-Commit", "1")
			f, err := publishAsync(js, m)
			if err != nil {
				return err
			}
			acks = append(acks, f)
		}
		tx = tx[:0]
		return nil
	})
	if err != nil {
		return err
	}
	if err := waitAsync(ctx, js); err != nil {
		return err
	}
	for _, f := range acks {
		select {
		case err := <-f.Err():
			return fmt.Errorf("batch refused: %w", err)
		default:
		}
	}
	return nil
}

// outboxCols are the positions of the outbox table's columns in its relation message, found
// once (the first insert) by the bare pipes.
type outboxCols struct {
	found                                 bool
	id, payload, typ, event, agg, created int
}

// msg is the bare pipes' message for ins: subject <prefix>.<aggregate_type>.<event_type>, the
// payload, and the id as Nats-Msg-Id.
func (o *outboxCols) msg(prefix string, rel *pglogrepl.RelationMessage, ins *pglogrepl.InsertMessage) *nats.Msg {
	o.find(rel)
	cols := ins.Tuple.Columns
	m := nats.NewMsg(prefix + "." + string(cols[o.typ].Data) + "." + string(cols[o.event].Data))
	m.Data = cols[o.payload].Data
	m.Header.Set(jetstream.MsgIDHeader, string(cols[o.id].Data))
	return m
}

func (o *outboxCols) find(rel *pglogrepl.RelationMessage) {
	if o.found {
		return
	}
	o.found = true
	for i, c := range rel.Columns {
		switch c.Name {
		case "id":
			o.id = i
		case "payload":
			o.payload = i
		case "aggregate_type":
			o.typ = i
		case "event_type":
			o.event = i
		case "aggregate_id":
			o.agg = i
		case "created_at":
			o.created = i
		}
	}
}
