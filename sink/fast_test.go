package sink

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
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
