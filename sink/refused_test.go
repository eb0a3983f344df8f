package sink

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
)

// refusalRig is a sink on a JetStream server with a max_payload of maxPayload (0: the
// default 1 MiB), its Run in the background.
type refusalRig struct {
	srv  *natsembed.NATS
	js   jetstream.JetStream
	sink *Publisher
	run  chan error
}

func newRefusalRig(t *testing.T, ctx context.Context, deadLetter bool, maxPayload int32) *refusalRig {
	return newRefusalRigMode(t, ctx, deadLetter, maxPayload, PublishSingle)
}

// newRefusalRigMode is newRefusalRig publishing in mode.
func newRefusalRigMode(t *testing.T, ctx context.Context, deadLetter bool, maxPayload int32, mode PublishMode) *refusalRig {
	t.Helper()
	var opts []natsembed.NATSOption
	if maxPayload > 0 {
		opts = append(opts, natsembed.WithMaxPayload(maxPayload))
	}
	r := &refusalRig{srv: natsembed.JetStream(t, opts...), run: make(chan error, 1)}
	nc, err := Connect(r.srv.URL)
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	r.js, err = jetstream.New(nc)
	require.NoError(t, err)
	cfg := Config{Stream: DefaultStream, SubjectPrefix: "outbox", DeadLetter: deadLetter, Publish: mode}
	_, err = EnsureStream(ctx, r.js, cfg, zerologNop())
	require.NoError(t, err)
	r.sink = NewPublisher(r.js, cfg, func(checkpoint.Ticket) {}, zerologNop())
	go func() { r.run <- r.sink.Run(ctx) }()
	return r
}

func refusalEvent(i int) *decoder.Event {
	return &decoder.Event{ID: []byte(fmt.Sprintf("ev-%d", i)), AggregateType: []byte("a"), AggregateID: []byte("1"), EventType: []byte("E"),
		Subject: []byte("outbox.a.E"), Payload: []byte(`{"i":1}`), CommitLSN: pglogrepl.LSN(0x1000 + i), TxIndex: 0}
}

// A message nats.go refuses synchronously in PublishMsg (nats.ErrMaxPayload,
// nats.ErrBadHeaderMsg), or JetStream refuses for what it is (headers over 64k), is poison: it
// would be refused on every retry. The entries are queued past Publish's own checks, as a
// message that only a later connection refuses would be (a reconnect to a server with a
// smaller max_payload).
func TestJetStream_MessageRefusedForWhatItIsIsPoison(t *testing.T) {
	for _, c := range []struct {
		name       string
		maxPayload int32
		spoil      func(e *entry)
		reason     string
	}{
		{name: "over max_payload", maxPayload: 4096, spoil: func(e *entry) { e.msg.Data = make([]byte, 5000) }, reason: "maximum payload exceeded"},
		{name: "bad header key", maxPayload: 4096, spoil: func(e *entry) { e.header()["content type"] = []string{"json"} }, reason: "could not decode headers"},
		{name: "headers over 64k", spoil: func(e *entry) { e.header()["big"] = []string{strings.Repeat("x", 70000)} }, reason: "header size exceeds maximum allowed of 64k"},
	} {
		for _, v := range []struct {
			deadLetter bool
			mode       PublishMode
		}{{false, PublishSingle}, {true, PublishSingle}, {false, PublishFast}, {true, PublishFast}} {
			deadLetter := v.deadLetter
			t.Run(fmt.Sprintf("%s/dead-letter=%v/%s", c.name, deadLetter, v.mode), func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				r := newRefusalRigMode(t, ctx, deadLetter, c.maxPayload, v.mode)
				j := r.sink
				require.NoError(t, j.Publish(ctx, refusalEvent(1), 1))

				require.NoError(t, j.Wait(ctx))
				j.held = false
				ev := refusalEvent(2)
				e := &entry{ticket: 2, pos: Position{ev.CommitLSN, ev.TxIndex}}
				size := j.msgs.build(e, ev)
				c.spoil(e)
				require.NoError(t, j.enqueue(ctx, e, size))
				require.NoError(t, j.Publish(ctx, refusalEvent(3), 3))

				if !deadLetter {
					select {
					case err := <-r.run:
						var poison *decoder.PoisonError
						require.True(t, errors.As(err, &poison), "got %v", err)
						require.Equal(t, "ev-2", poison.ID)
						require.ErrorContains(t, err, "event ev-2 ")
						require.ErrorContains(t, err, c.reason)
					case <-ctx.Done():
						t.Fatal("the refused message is retried instead of stopping the sink")
					}
					require.Equal(t, []string{"ev-1"}, streamIDs(t, r.srv.URL))
					return
				}
				require.Eventually(t, func() bool { return j.Stats().Published == 3 }, 15*time.Second, 10*time.Millisecond,
					"the refused message is retried instead of being dead-lettered")
				require.Equal(t, []string{"ev-1", "ev-2", "ev-3"}, streamIDs(t, r.srv.URL))
				s, err := r.js.Stream(ctx, DefaultStream)
				require.NoError(t, err)
				dl, err := s.GetMsg(ctx, 2)
				require.NoError(t, err)
				require.Equal(t, "outbox."+DeadLetterToken, dl.Subject)
				require.Contains(t, dl.Header.Get(HeaderPoisonReason), c.reason)
				require.Equal(t, uint64(1), j.Stats().DeadLetter)
			})
		}
	}
}

// The dead-letter copy of an event whose headers column alone is over max_payload leaves
// headers out until it fits, says how many, and is stored; the relay goes on.
func TestJetStream_DeadLetterOfOversizedHeadersFits(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r := newRefusalRig(t, ctx, true, 4096)
	j := r.sink
	require.NoError(t, j.Publish(ctx, refusalEvent(1), 1))
	ev := refusalEvent(2)
	for i := range 10 {
		ev.Headers = append(ev.Headers, decoder.Header{Key: fmt.Sprintf("h%02d", i), Value: strings.Repeat("v", 600)})
	}
	ev.Headers = append(ev.Headers, decoder.Header{Key: "bad key", Value: "x"})
	require.NoError(t, j.Publish(ctx, ev, 2))
	require.NoError(t, j.Publish(ctx, refusalEvent(3), 3))
	require.Eventually(t, func() bool { return j.Stats().Published == 3 }, 15*time.Second, 10*time.Millisecond,
		"the dead-letter copy is refused and retried")
	require.Equal(t, []string{"ev-1", "ev-2", "ev-3"}, streamIDs(t, r.srv.URL))
	s, err := r.js.Stream(ctx, DefaultStream)
	require.NoError(t, err)
	dl, err := s.GetMsg(ctx, 2)
	require.NoError(t, err)
	require.Equal(t, "outbox."+DeadLetterToken, dl.Subject)
	require.Contains(t, dl.Header.Get(HeaderPoisonReason), "max_payload")
	require.Equal(t, "ev-2", dl.Header.Get(HeaderMsgID))
	require.Equal(t, "outbox.a.E", dl.Header.Get(HeaderOriginalSubject))
	require.Equal(t, "a", dl.Header.Get(HeaderAggregateType))
	require.NotEmpty(t, dl.Header.Get(HeaderCommitLSN))
	kept := 0
	for i := range 10 {
		if dl.Header.Get(fmt.Sprintf("h%02d", i)) != "" {
			kept++
		}
	}
	require.Greater(t, kept, 0, "headers are kept while they fit")
	require.Equal(t, fmt.Sprint(10-kept+1), dl.Header.Get(HeaderDroppedHeaders), "the rest and the bad key are counted")
	require.Empty(t, dl.Header.Get("bad key"))
	require.Less(t, msgSize(&nats.Msg{Subject: dl.Subject, Header: dl.Header, Data: dl.Data}), 4096)
}

// nats.go does not refuse header values: it trims them and replaces CR and LF with spaces. An
// event with line breaks in header values (headers column, aggregate type) is published as
// that, and nothing stalls.
func TestJetStream_HeaderValueLineBreaksAreSentAsSpaces(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r := newRefusalRig(t, ctx, false, 0)
	j := r.sink
	ev := refusalEvent(1)
	ev.AggregateType = []byte("a\r\nb")
	ev.Headers = []decoder.Header{{Key: "x", Value: " one\r\ntwo\n"}}
	require.NoError(t, j.Publish(ctx, ev, 1))
	require.NoError(t, j.Publish(ctx, refusalEvent(2), 2))
	require.Eventually(t, func() bool { return j.Stats().Published == 2 }, 15*time.Second, 10*time.Millisecond)
	s, err := r.js.Stream(ctx, DefaultStream)
	require.NoError(t, err)
	m, err := s.GetMsg(ctx, 1)
	require.NoError(t, err)
	require.Equal(t, "one  two", m.Header.Get("x"))
	require.Equal(t, "a  b", m.Header.Get(HeaderAggregateType))
	require.Equal(t, []string{"ev-1", "ev-2"}, streamIDs(t, r.srv.URL))
}
