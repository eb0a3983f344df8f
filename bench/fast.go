package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Ceiling D-fast's flow: the server acks every fastFlow messages, and at most fastWindows acks
// are outstanding (the best of the settings measured for the issue on this machine kind).
const (
	fastFlow    = 500
	fastWindows = 8
)

// ceilingDFast: ceiling D with every row published in one JetStream fast-ingest batch (stream
// allow_batched; batch state in the reply subject, gap mode fail): the server acks every
// fastFlow messages, the loop stalls while fastWindows acks are outstanding, and at the end an
// end-of-batch commit's PubAck confirms the last messages. rows/s from the start until that
// PubAck.
func (e *env) ceilingDFast(ctx context.Context, d *db, slot, stream, prefix string, n int) (float64, error) {
	if _, err := e.newStream(ctx, stream, prefix); err != nil {
		return 0, err
	}
	defer e.js.DeleteStream(context.Background(), stream)
	start := time.Now()
	if err := e.barePipeFast(ctx, d, slot, prefix, n); err != nil {
		return 0, fmt.Errorf("ceiling D-fast: %w", err)
	}
	el := time.Since(start)
	if got, _ := e.streamMsgs(ctx, stream); got != uint64(n) {
		return 0, fmt.Errorf("ceiling D-fast: stream has %d of %d messages", got, n)
	}
	return float64(n) / el.Seconds(), nil
}

// fastAcks follows the server's answers to fast batches: the highest flow-acked batch
// sequence, the PubAcks that end batches (commits, done: at least one), and the first error.
type fastAcks struct {
	mu      sync.Mutex
	cond    *sync.Cond
	acked   uint64
	done    bool
	commits int
	err     error
	closed  bool
}

// subscribeFastAcks follows the answers on inbox.> until ctx ends or stop is called.
func (e *env) subscribeFastAcks(ctx context.Context) (acks *fastAcks, inbox string, stop func(), err error) {
	acks = &fastAcks{}
	acks.cond = sync.NewCond(&acks.mu)
	inbox = e.nc.NewInbox()
	sub, err := e.nc.Subscribe(inbox+".>", acks.handle)
	if err != nil {
		return nil, "", nil, err
	}
	stopClose := context.AfterFunc(ctx, func() {
		acks.mu.Lock()
		acks.closed = true
		acks.cond.Broadcast()
		acks.mu.Unlock()
	})
	return acks, inbox, func() { stopClose(); _ = sub.Unsubscribe() }, nil
}

func (a *fastAcks) handle(m *nats.Msg) {
	var r struct {
		Type   string              `json:"type"`
		Seq    uint64              `json:"seq"`
		Stream string              `json:"stream"`
		Count  uint64              `json:"count"`
		Error  *jetstream.APIError `json:"error"`
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	defer a.cond.Broadcast()
	if err := json.Unmarshal(m.Data, &r); err != nil {
		a.err = fmt.Errorf("fast batch answer %q: %w", m.Data, err)
		return
	}
	switch {
	case r.Type == "ack":
		a.acked = max(a.acked, r.Seq)
	case r.Type == "gap" || r.Type == "err" || r.Error != nil:
		if a.err == nil {
			a.err = fmt.Errorf("fast batch: %s", m.Data)
		}
	case r.Stream != "":
		a.acked, a.done = max(a.acked, r.Count), true
		a.commits++
	}
}

// wait blocks until cond holds or an error came.
func (a *fastAcks) wait(cond func() bool) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	for !cond() && a.err == nil && !a.closed {
		a.cond.Wait()
	}
	return a.err
}

func (e *env) barePipeFast(ctx context.Context, d *db, slot, prefix string, n int) error {
	acks, inbox, stop, err := e.subscribeFastAcks(ctx)
	if err != nil {
		return err
	}
	defer stop()
	replyPrefix := inbox + ".b1." + strconv.Itoa(fastFlow) + ".fail."
	var oc outboxCols
	var seq uint64
	subject := ""
	err = drainSlot(ctx, d.url, slot, n, func(rel *pglogrepl.RelationMessage, ins *pglogrepl.InsertMessage) error {
		m := oc.msg(prefix, rel, ins)
		seq++
		op := "1"
		if seq == 1 {
			op = "0"
		}
		m.Reply = replyPrefix + strconv.FormatUint(seq, 10) + "." + op + ".$FI"
		subject = m.Subject
		if err := acks.wait(func() bool { return seq <= acks.acked+fastFlow*fastWindows }); err != nil {
			return err
		}
		return e.nc.PublishMsg(m)
	}, nil)
	if err != nil {
		return err
	}
	// End of batch: commit without a message; its PubAck comes once every message is stored.
	eob := &nats.Msg{Subject: subject, Reply: replyPrefix + strconv.FormatUint(seq+1, 10) + ".3.$FI"}
	if err := e.nc.PublishMsg(eob); err != nil {
		return err
	}
	if err := acks.wait(func() bool { return acks.done }); err != nil {
		return err
	}
	if acks.acked != seq {
		return fmt.Errorf("the batch's PubAck counts %d of %d messages", acks.acked, seq)
	}
	return ctx.Err()
}

// barePipeFastEach is the latency counterpart of barePipeFast: D's loop with every row
// published at once as a fast-ingest batch of its own (its first message is its commit), which
// is what --publish fast does with an event that finds hardly anything in flight. It waits for
// every PubAck at the end. Beside the bare pipe's latency it shows what a fast batch costs on
// the server, apart from the relay.
func (e *env) barePipeFastEach(ctx context.Context, d *db, slot, prefix string, n int) error {
	acks, inbox, stop, err := e.subscribeFastAcks(ctx)
	if err != nil {
		return err
	}
	defer stop()
	var oc outboxCols
	sent := 0
	err = drainSlot(ctx, d.url, slot, n, func(rel *pglogrepl.RelationMessage, ins *pglogrepl.InsertMessage) error {
		m := oc.msg(prefix, rel, ins)
		sent++
		m.Reply = inbox + ".e" + strconv.Itoa(sent) + "." + strconv.Itoa(fastFlow) + ".fail.1.2.$FI"
		return e.nc.PublishMsg(m)
	}, nil)
	if err != nil {
		return err
	}
	if err := acks.wait(func() bool { return acks.commits >= sent }); err != nil {
		return err
	}
	return ctx.Err()
}
