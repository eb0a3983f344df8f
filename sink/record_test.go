package sink

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
)

func TestPositionRecord_RoundTripOnFileStorageOneKeyPerFeed(t *testing.T) {
	n := natsembed.JetStream(t)
	nc := n.Connect(t)
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	_, ok, err := ReadPositionRecord(ctx, js, DefaultPositionBucket, Config{Stream: "S1", SubjectPrefix: "app.events"})
	require.NoError(t, err)
	require.False(t, ok)
	_, err = js.KeyValue(ctx, DefaultPositionBucket)
	require.ErrorIs(t, err, jetstream.ErrBucketNotFound, "reading creates no bucket")
	a, err := OpenPositionRecord(ctx, js, DefaultPositionBucket, Config{Stream: "S1", SubjectPrefix: "app.events"})
	require.NoError(t, err)
	b, err := OpenPositionRecord(ctx, js, DefaultPositionBucket, Config{Stream: "S1", SubjectPrefix: "app.ü"})
	require.NoError(t, err)
	require.Equal(t, "S1.app.events", a.Key())
	require.Equal(t, "S1.app.=C3=BC", b.Key(), "bytes outside the key alphabet are escaped")

	kv, err := js.KeyValue(ctx, DefaultPositionBucket)
	require.NoError(t, err)
	st, err := kv.Status(ctx)
	require.NoError(t, err)
	require.Equal(t, int64(1), st.History())
	require.Equal(t, jetstream.FileStorage, st.(*jetstream.KeyValueBucketStatus).StreamInfo().Config.Storage)

	_, ok, err = a.Get(ctx)
	require.NoError(t, err)
	require.False(t, ok)
	require.NoError(t, a.Put(ctx, SourcePosition{SystemID: "7", Slot: "s", LSN: 0x16B3748, SeqFloor: 9}))
	require.NoError(t, a.Record(ctx, 0x16B3750))
	p, ok, err := a.Get(ctx)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, "7", p.SystemID)
	require.Equal(t, "s", p.Slot)
	require.Equal(t, "0/16B3750", p.LSN.String())
	require.Equal(t, uint64(9), p.SeqFloor, "Record keeps the source fields")
	read, ok, err := ReadPositionRecord(ctx, js, DefaultPositionBucket, Config{Stream: "S1", SubjectPrefix: "app.events"})
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, p.LSN, read.LSN)
	e, err := kv.Get(ctx, a.Key())
	require.NoError(t, err)
	require.Contains(t, string(e.Value()), `"lsn":"0/16B3750"`, "the LSN is stored as Postgres prints it")
	_, ok, err = b.Get(ctx)
	require.NoError(t, err)
	require.False(t, ok, "another prefix has its own record")
}

// The store's errors are classed: a bucket that cannot be opened is fatal (an operator must
// act), a failed write transient (retried); a record that is not valid JSON is neither.
func TestPositionRecord_StoreErrorsTransientOrFatal(t *testing.T) {
	n := natsembed.JetStream(t)
	nc := n.Connect(t)
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	_, err = OpenPositionRecord(ctx, js, "bad bucket name", Config{Stream: "S1"})
	require.Error(t, err)
	require.True(t, IsFatalPositionStoreError(err), "%v", err)
	require.Contains(t, err.Error(), `open the position record bucket "bad bucket name"`)
	_, _, err = ReadPositionRecord(ctx, js, "bad bucket name", Config{Stream: "S1"})
	require.True(t, IsFatalPositionStoreError(err), "%v", err)

	r, err := OpenPositionRecord(ctx, js, DefaultPositionBucket, Config{Stream: "S1"})
	require.NoError(t, err)
	kv, err := js.KeyValue(ctx, DefaultPositionBucket)
	require.NoError(t, err)
	_, err = kv.Put(ctx, r.Key(), []byte("{not json"))
	require.NoError(t, err)
	_, _, err = r.Get(ctx)
	require.ErrorContains(t, err, "is not valid")
	require.False(t, IsFatalPositionStoreError(err))

	require.NoError(t, js.DeleteKeyValue(ctx, DefaultPositionBucket))
	err = r.Put(ctx, SourcePosition{SystemID: "7", Slot: "s", LSN: 0x10})
	require.ErrorContains(t, err, "write position record "+r.Key()+" at 0/10")
	var se *PositionStoreError
	require.ErrorAs(t, err, &se)
	require.Equal(t, "write", se.Op)
	require.False(t, se.Fatal, "a failed write is retried")
}
