package sink

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
)

// Fast mode: the events go out in one fast batch, are confirmed once flow acks (or the
// commit's PubAck when the relay stops sending) report them stored, and the stream holds
// each once, in order.
func TestJetStream_FastPublishesOneBatchConfirmedByFlowAcks(t *testing.T) {
	r := newSinkRig(t, Config{Publish: PublishFast, Window: 256})
	r.publish(t, 2000)
	r.waitConfirmed(t, 2000)
	ids := streamIDs(t, r.nats.URL)
	require.Len(t, ids, 2000)
	for i, id := range ids {
		require.Equal(t, fmt.Sprintf("ev-%05d", i), id)
	}
	st := r.sink.Stats()
	require.Equal(t, uint64(2000), st.Published)
	require.Zero(t, st.Retries)
	require.Less(t, r.sink.fastN, uint64(2000/64), "few batches: %d", r.sink.fastN)
}

// An event is confirmed only once the server reported it stored: with every reply held back,
// the stream stores the events and none is confirmed; once replies pass, all are.
func TestJetStream_FastConfirmsNothingBeforeTheServerReportsIt(t *testing.T) {
	r := newSinkRig(t, Config{Publish: PublishFast, Window: 256, AckTimeout: 2 * time.Second})
	// One event first: the chain starts (the sink reads the stream) while replies come through.
	r.publishFrom(t, 0, 1)
	r.waitConfirmed(t, 1)
	r.proxy.HoldReplies()
	r.publishFrom(t, 1, 100)
	require.Eventually(t, func() bool { return len(streamIDs(t, r.nats.URL)) == 100 }, 10*time.Second, 20*time.Millisecond)
	time.Sleep(300 * time.Millisecond)
	r.mu.Lock()
	require.Len(t, r.confirmed, 1, "confirmed before any ack came")
	r.mu.Unlock()
	r.proxy.Pass()
	r.waitConfirmed(t, 100)
	require.Len(t, streamIDs(t, r.nats.URL), 100)
}

// fastProbe publishes raw fast batch messages to a stream with allow_batched on an embedded
// server and collects the server's answers: what the sink's fast mode relies on, found on the
// real server (nats-server v2.15.2).
type fastProbe struct {
	t       *testing.T
	nc      *nats.Conn
	js      jetstream.JetStream
	inbox   string
	answers chan string
}

func newFastProbe(t *testing.T, opts ...natsembed.NATSOption) *fastProbe {
	t.Helper()
	ns := natsembed.JetStream(t, opts...)
	nc := ns.Connect(t)
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	_, err = js.CreateStream(context.Background(), jetstream.StreamConfig{Name: DefaultStream, Subjects: []string{"outbox.>"},
		Duplicates: time.Minute, AllowBatchPublish: true})
	require.NoError(t, err)
	p := &fastProbe{t: t, nc: nc, js: js, inbox: nc.NewInbox(), answers: make(chan string, 4096)}
	_, err = nc.Subscribe(p.inbox+".>", func(m *nats.Msg) { p.answers <- string(m.Data) })
	require.NoError(t, err)
	return p
}

// send publishes message seq of batch with operation op (flow: ack every flow messages), with
// Nats-Msg-Id id (none if empty) and the extra headers hdr (key, value pairs).
func (p *fastProbe) send(batch string, flow, seq, op int, id string, hdr ...string) {
	p.t.Helper()
	m := nats.NewMsg("outbox.a.E")
	m.Reply = fmt.Sprintf("%s.%s.%d.fail.%d.%d.$FI", p.inbox, batch, flow, seq, op)
	if id != "" {
		m.Header.Set(HeaderMsgID, id)
		m.Data = []byte(id)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		m.Header.Set(hdr[i], hdr[i+1])
	}
	require.NoError(p.t, p.nc.PublishMsg(m))
}

// expect waits for the next answer and requires it to contain every part.
func (p *fastProbe) expect(parts ...string) string {
	p.t.Helper()
	select {
	case a := <-p.answers:
		for _, part := range parts {
			require.Contains(p.t, a, part, "answer %s", a)
		}
		return a
	case <-time.After(5 * time.Second):
		p.t.Fatalf("no answer; expected %v", parts)
		return ""
	}
}

// quiet requires no answer for d.
func (p *fastProbe) quiet(d time.Duration) {
	p.t.Helper()
	select {
	case a := <-p.answers:
		p.t.Fatalf("unexpected answer %s", a)
	case <-time.After(d):
	}
}

func (p *fastProbe) ids() []string { return streamIDs(p.t, p.nc.ConnectedUrl()) }

// Flow acks: the first message is answered with the ack interval (seq 0), then every flow
// messages with the batch sequence stored so far; the end-of-batch commit's PubAck gives the
// stream sequence of the last message and the count.
func TestFastBatch_FlowAcksReportTheStoredBatchSequence(t *testing.T) {
	p := newFastProbe(t)
	for seq := 1; seq <= 10; seq++ {
		p.send("b1", 3, seq, min(seq-1, fastOpAppend), fmt.Sprint("m", seq))
	}
	p.expect(`"type":"ack"`, `"seq":0`, `"msgs":3`)
	p.expect(`"type":"ack"`, `"seq":3`)
	p.expect(`"type":"ack"`, `"seq":6`)
	p.expect(`"type":"ack"`, `"seq":9`)
	p.quiet(100 * time.Millisecond) // message 10 is stored, but no ack says so yet
	require.Len(t, p.ids(), 10)
	p.send("b1", 3, 11, fastOpCommitEOB, "")
	p.expect(`"stream":"OUTBOX"`, `"seq":10`, `"batch":"b1"`, `"count":10`)
}

// Duplicates: a message the stream holds (Nats-Msg-Id in the duplicate window) is skipped
// inside a batch, first message or not, and the batch goes on (and still acks it: a re-sent
// stored event neither is stored twice nor stalls the batch).
func TestFastBatch_DuplicatesAreSkippedAndEndABatchOnlyAsItsFirst(t *testing.T) {
	p := newFastProbe(t)
	p.send("b1", 2, 1, fastOpStart, "a")
	p.send("b1", 2, 2, fastOpAppend, "b")
	p.send("b1", 2, 3, fastOpCommit, "c")
	p.expect(`"type":"ack"`, `"seq":0`)
	p.expect(`"type":"ack"`, `"seq":2`)
	p.expect(`"seq":3`, `"count":3`)
	// Mid-batch duplicates.
	p.send("b2", 2, 1, fastOpStart, "x")
	p.send("b2", 2, 2, fastOpAppend, "b")
	p.send("b2", 2, 3, fastOpAppend, "c")
	p.send("b2", 2, 4, fastOpAppend, "y")
	p.send("b2", 2, 5, fastOpCommitEOB, "")
	p.expect(`"type":"ack"`, `"seq":0`)
	p.expect(`"type":"ack"`, `"seq":2`)
	p.expect(`"type":"ack"`, `"seq":4`)
	p.expect(`"seq":5`, `"count":4`) // stream sequence 5: x and y stored, b and c not again
	require.Equal(t, []string{"a", "b", "c", "x", "y"}, p.ids())
	// A duplicate first message is skipped as well.
	p.send("b3", 2, 1, fastOpStart, "a")
	p.send("b3", 2, 2, fastOpAppend, "z")
	p.send("b3", 2, 3, fastOpCommitEOB, "")
	p.expect(`"type":"ack"`, `"seq":0`)
	p.expect(`"type":"ack"`, `"seq":2`)
	p.expect(`"seq":6`, `"count":2`)
	// Only a duplicate committing the batch ends it with a duplicate PubAck.
	p.send("b4", 2, 1, fastOpCommit, "z")
	p.expect(`"duplicate": true`, `"count":1`)
	require.Equal(t, []string{"a", "b", "c", "x", "y", "z"}, p.ids())
}

// A gap (a message lost): the server reports it, ends the batch with a PubAck counting the
// messages before the gap, and stores nothing after it.
func TestFastBatch_AGapEndsTheBatch(t *testing.T) {
	p := newFastProbe(t)
	p.send("b1", 10, 1, fastOpStart, "a")
	p.send("b1", 10, 2, fastOpAppend, "b")
	p.send("b1", 10, 4, fastOpAppend, "d")
	p.send("b1", 10, 5, fastOpAppend, "e")
	p.expect(`"type":"ack"`, `"seq":0`)
	p.expect(`"type":"gap"`, `"last_seq":3`, `"seq":4`)
	p.expect(`"count":2`)
	time.Sleep(100 * time.Millisecond)
	require.Equal(t, []string{"a", "b"}, p.ids())
}

// The chain headers inside a fast batch: Nats-Expected-Last-Sequence is checked on every
// message of the batch (a wrong one refuses the message and ends the batch), so the sink puts
// it on a batch's first message only, where it chains the batch to the stream's tail.
// Nats-Expected-Last-Msg-Id is checked as well.
func TestFastBatch_ExpectedLastSequenceIsCheckedInsideTheBatch(t *testing.T) {
	p := newFastProbe(t)
	p.send("b1", 10, 1, fastOpStart, "a", jetstream.ExpectedLastSeqHeader, "0")
	p.send("b1", 10, 2, fastOpAppend, "b", jetstream.ExpectedLastSeqHeader, "1")
	p.send("b1", 10, 3, fastOpAppend, "c", jetstream.ExpectedLastSeqHeader, "7")
	p.send("b1", 10, 4, fastOpAppend, "d")
	p.expect(`"type":"ack"`, `"seq":0`)
	p.expect(`"type":"err"`, `"seq":3`, `"err_code":10071`) // wrong last sequence
	p.expect(`"count":2`)
	p.expect(`"err_code":10208`) // message 4: the batch is gone
	require.Equal(t, []string{"a", "b"}, p.ids())

	// Nats-Expected-Last-Msg-Id is checked only when the message is stored: a wrong one is
	// refused with a plain publish error, and the batch never completes (the commit gets no
	// answer: the batch waits for the refused message, until the batch timeout). The sink
	// never sends it in a fast batch.
	p.send("b2", 10, 1, fastOpStart, "e", jetstream.ExpectedLastMsgIDHeader, "b")
	p.send("b2", 10, 2, fastOpAppend, "f", jetstream.ExpectedLastMsgIDHeader, "nope")
	p.send("b2", 10, 3, fastOpCommitEOB, "")
	p.expect(`"type":"ack"`, `"seq":0`)
	p.expect(`"err_code":10070`) // wrong last msg ID
	p.quiet(300 * time.Millisecond)
	require.Equal(t, []string{"a", "b", "e"}, p.ids())
}

// An abandoned batch (its publisher stopped sending) is dropped after the server's batch
// timeout (10s by default, 300ms here): its messages stay stored, and a message sent to it
// afterwards finds no batch. Fast batches open on a stream are limited (1,000 by default, 3
// here): a fourth is refused until one ends.
func TestFastBatch_AbandonedBatchTimesOutAndOpenBatchesAreLimited(t *testing.T) {
	p := newFastProbe(t, natsembed.WithBatchLimits(300*time.Millisecond, 3))
	p.send("b1", 10, 1, fastOpStart, "a")
	p.expect(`"type":"ack"`, `"seq":0`)
	time.Sleep(600 * time.Millisecond)
	p.send("b1", 10, 2, fastOpAppend, "b")
	p.expect(`"err_code":10208`)
	require.Equal(t, []string{"a"}, p.ids())

	p.send("open1", 10, 1, fastOpStart, "o1")
	p.expect(`"type":"ack"`, `"seq":0`, `"msgs":10`)
	for i := 2; i <= 3; i++ {
		// With other fast batches open on the stream, a new one starts with an ack after
		// every message and doubles the interval with each ack.
		p.send(fmt.Sprint("open", i), 10, 1, fastOpStart, fmt.Sprint("o", i))
		p.expect(`"type":"ack"`, `"seq":0`, `"msgs":1`)
		p.expect(`"type":"ack"`, `"seq":1`, `"msgs":2`)
	}
	p.send("open4", 10, 1, fastOpStart, "o4")
	p.expect(`"err_code":10211`) // too many inflight
	p.send("open1", 10, 2, fastOpCommitEOB, "")
	p.expect(`"count":1`)
	p.send("open5", 10, 1, fastOpStart, "o5")
	p.expect(`"type":"ack"`, `"seq":0`)
	require.Equal(t, []string{"a", "o1", "o2", "o3", "o5"}, p.ids())
}

// A relay restarted after storing events re-publishes some of them (Postgres re-sends what
// was not confirmed): in a fast batch the stored ones are skipped as duplicates, the batch
// goes on, every event is confirmed, and the stream holds each once, in order.
func TestJetStream_FastRepublishedStoredEventsAreNotStoredTwice(t *testing.T) {
	r := newSinkRig(t, Config{Publish: PublishFast, Window: 64})
	r.publishFrom(t, 0, 100)
	r.waitConfirmed(t, 100)
	again := NewPublisher(r.js, Config{Publish: PublishFast, Window: 64}, func(checkpoint.Ticket) {
		r.mu.Lock()
		r.confirmed = append(r.confirmed, 0)
		r.mu.Unlock()
	}, zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- again.Run(ctx) }()
	defer func() { cancel(); require.NoError(t, <-done) }()
	r.sink = again
	r.publishFrom(t, 50, 300)
	r.waitConfirmed(t, 350)
	ids := streamIDs(t, r.nats.URL)
	require.Len(t, ids, 300)
	for i, id := range ids {
		require.Equal(t, fmt.Sprintf("ev-%05d", i), id)
	}
	st := again.Stats()
	t.Logf("re-published: %+v", st)
	require.Equal(t, uint64(250), st.Published)
}

// Core NATS subscribers of the stream's subjects see the events and nothing else: the sink
// ends a batch with an event as its commit, never with an end-of-batch commit, which is a
// message without payload on an event subject that every such subscriber receives.
func TestJetStream_FastSendsNoMessageButEvents(t *testing.T) {
	r := newSinkRig(t, Config{Publish: PublishFast, Window: 64})
	nc := r.nats.Connect(t)
	got := make(chan *nats.Msg, 1000)
	_, err := nc.ChanSubscribe("outbox.>", got)
	require.NoError(t, err)
	require.NoError(t, nc.Flush())
	for i := 0; i < 20; i++ { // pauses end batches
		r.publishFrom(t, i*5, i*5+5)
		time.Sleep(5 * time.Millisecond)
	}
	r.waitConfirmed(t, 100)
	time.Sleep(100 * time.Millisecond)
	require.Len(t, got, 100)
	for len(got) > 0 {
		m := <-got
		require.NotEmpty(t, m.Header.Get(HeaderMsgID), "a message that is no event: %+v", m)
	}
	require.Greater(t, r.sink.fastN, uint64(10), "batches ended")
}
