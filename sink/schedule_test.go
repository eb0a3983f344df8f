package sink_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/sink"
)

// What a JetStream message schedule (ADR-51, nats-server 2.12+) does to a relay's stream, on
// the real server: the facts behind the relay refusing Nats-Schedule headers (see
// sink.scheduleRefusal). Each would break a guarantee if a row could carry a schedule.
func TestMessageSchedulesBreakTheRelaysStream(t *testing.T) {
	js := newJS(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// 1. A stream as the relay creates it (discard: new) cannot allow schedules at all.
	_, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "NEW", Subjects: []string{"new.>"}, Storage: jetstream.FileStorage,
		Discard: jetstream.DiscardNew, AllowMsgSchedules: true})
	require.ErrorContains(t, err, "message scheduling cannot use discard new")

	s, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: sink.DefaultStream, Subjects: []string{"outbox.>"}, Storage: jetstream.FileStorage,
		Duplicates: time.Minute, AllowMsgSchedules: true})
	require.NoError(t, err)
	require.True(t, s.CachedInfo().Config.AllowRollup, "the server turns roll-ups on with schedules")

	// relayMsg is a message as the relay publishes it: its id and position headers.
	relayMsg := func(subject, id, lsn string, idx string) *nats.Msg {
		m := nats.NewMsg(subject)
		m.Header.Set(sink.HeaderMsgID, id)
		m.Header.Set(sink.HeaderCommitLSN, lsn)
		m.Header.Set(sink.HeaderTxIndex, idx)
		m.Data = []byte(id)
		return m
	}
	for i, id := range []string{"e1", "e2"} {
		_, err := js.PublishMsg(ctx, relayMsg("outbox.order.Reminder", id, "0/100", string(rune('0'+i))))
		require.NoError(t, err)
	}
	schedule := func(id, idx, at string) *nats.Msg {
		m := relayMsg("outbox.order.Reminder", id, "0/200", idx)
		m.Header.Set("Nats-Schedule", "@at "+at)
		m.Header.Set("Nats-Schedule-Target", "outbox.order.Remind")
		return m
	}

	// 2. The schedule is stored on the event's subject with a subject roll-up: every earlier
	// event on that subject is deleted (events confirmed to Postgres that consumers may not
	// have read), and so is an earlier schedule on it (only the newest reminder would fire).
	far := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	_, err = js.PublishMsg(ctx, schedule("s1", "0", far))
	require.NoError(t, err)
	soon := time.Now().Add(3 * time.Second).UTC().Format(time.RFC3339) // whole seconds: 2-3 s from now
	ack, err := js.PublishMsg(ctx, schedule("s2", "1", soon))
	require.NoError(t, err)
	info, err := s.Info(ctx, jetstream.WithSubjectFilter("outbox.>"))
	require.NoError(t, err)
	require.Equal(t, map[string]uint64{"outbox.order.Reminder": 1}, info.State.Subjects, "the roll-up deleted e1, e2 and schedule s1")

	// 3. When it fires, the server stores a message of its own in the relay's stream (the
	// target must be one of the stream's subjects): the relay is no longer its only
	// publisher. It carries the schedule's position headers but no Nats-Msg-Id.
	var fired *jetstream.RawStreamMsg
	require.Eventually(t, func() bool {
		fired, err = s.GetLastMsgForSubject(ctx, "outbox.order.Remind")
		return err == nil
	}, 10*time.Second, 50*time.Millisecond, "the schedule never fired")
	require.Greater(t, fired.Sequence, ack.Sequence)
	require.Equal(t, "outbox.order.Reminder", fired.Header.Get("Nats-Scheduler"))
	require.Empty(t, fired.Header.Get(sink.HeaderMsgID))
	require.Equal(t, "0/200", fired.Header.Get(sink.HeaderCommitLSN))

	// 4. The chain: the stream's last sequence and last message id moved without the relay
	// publishing; both expectations the relay would publish with next are refused. On a
	// replicated stream, a sequence taken under a window in flight is how a later event gets
	// stored before a refused earlier one (see package doc).
	next := relayMsg("outbox.order.Reminder", "e3", "0/300", "0")
	_, err = js.PublishMsg(ctx, next, jetstream.WithExpectLastMsgID("s2"))
	require.ErrorContains(t, err, "wrong last msg ID")
	_, err = js.PublishMsg(ctx, next, jetstream.WithExpectLastSequence(ack.Sequence))
	require.ErrorContains(t, err, "wrong last sequence")

	// 5. The replay skip and the position record read the relay's newest message: now the
	// scheduler's copy, with the schedule's (older) position, not a live event's id. After a
	// relay outage longer than the duplicate window, the events after the schedule would be
	// published again; a repeating schedule keeps moving the tail under the relay.
	last, ok, err := sink.LastStoredMsg(ctx, js, sink.Config{})
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, fired.Sequence, last.Seq)
	require.Equal(t, "0/200#1", last.Position.String())
	require.Empty(t, last.ID)

	// 6. The fired schedule purges its schedule message; the stream's last sequence does not
	// go back, so the lost-acknowledged-messages check (the stream ending before a recorded
	// sequence) is not tripped by it.
	require.Eventually(t, func() bool {
		_, err := s.GetLastMsgForSubject(ctx, "outbox.order.Reminder")
		return err != nil
	}, 10*time.Second, 50*time.Millisecond, "the schedule message was not purged")
	info, err = s.Info(ctx)
	require.NoError(t, err)
	require.Equal(t, fired.Sequence, info.State.LastSeq)
}
