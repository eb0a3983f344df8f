package sink

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go/jetstream"
)

// DefaultPositionBucket is the JetStream key-value bucket of the relays' position records.
const DefaultPositionBucket = "outbox_relay_positions"

// SourcePosition is the durable record of where the feed of one stream and subject prefix
// stands in its source: the Postgres cluster (system identifier), the slot, and the highest
// position the relay may have confirmed to that slot. The relay writes it before it tells
// Postgres; a slot found ahead of it was moved by someone else.
type SourcePosition struct {
	SystemID string        `json:"system_id"`
	Slot     string        `json:"slot"`
	LSN      pglogrepl.LSN `json:"-"`
	// SeqFloor: stream messages up to this sequence came from an earlier source (another
	// cluster, whose positions do not compare with this one's).
	SeqFloor uint64 `json:"seq_floor,omitempty"`
	// Timeline is the Postgres timeline LSN is on (0 in records written before it was kept):
	// a promotion or a point-in-time recovery starts a new one, whose history may have left
	// this one before LSN.
	Timeline int32 `json:"timeline,omitempty"`
	// StreamSeq is a stream sequence the stream held when LSN was recorded: every event up
	// to LSN was stored by then. A stream found ending before it lost acknowledged messages.
	StreamSeq uint64    `json:"stream_seq,omitempty"`
	UpdatedAt time.Time `json:"updated_at"`
}

// sourcePositionJSON is SourcePosition without its methods (no recursion), with the LSN as text.
type sourcePositionJSON struct {
	plainSourcePosition
	LSN string `json:"lsn"`
}

type plainSourcePosition SourcePosition

// MarshalJSON writes the LSN as Postgres prints it.
func (p SourcePosition) MarshalJSON() ([]byte, error) {
	return json.Marshal(sourcePositionJSON{plainSourcePosition(p), p.LSN.String()})
}

// UnmarshalJSON reads what MarshalJSON wrote.
func (p *SourcePosition) UnmarshalJSON(b []byte) error {
	var v sourcePositionJSON
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	lsn, err := pglogrepl.ParseLSN(v.LSN)
	if err != nil {
		return fmt.Errorf("bad lsn %q: %w", v.LSN, err)
	}
	*p = SourcePosition(v.plainSourcePosition)
	p.LSN = lsn
	return nil
}

// PositionStoreError is an error of the position records' key-value store. Fatal errors
// (the bucket cannot be opened or created: missing rights, a bad name) need an operator;
// others (a read or write that failed) are transient and retried.
type PositionStoreError struct {
	Op    string // "open", "read" or "write"
	Fatal bool
	Err   error
}

func (e *PositionStoreError) Error() string { return e.Err.Error() }
func (e *PositionStoreError) Unwrap() error { return e.Err }

// IsFatalPositionStoreError reports whether err is a fatal PositionStoreError.
func IsFatalPositionStoreError(err error) bool {
	var e *PositionStoreError
	return errors.As(err, &e) && e.Fatal
}

// positionStore is the JetStream key-value bucket that holds the position records: open (or
// create), read and write one key, errors classed as transient or fatal.
type positionStore struct {
	kv     jetstream.KeyValue
	bucket string
}

// openPositionStore opens the bucket; with create, a missing bucket is created (file storage,
// the replica count of stream, one revision per key). ok is false when it is missing and not
// created.
func openPositionStore(ctx context.Context, js jetstream.JetStream, bucket, stream string, create bool) (st *positionStore, ok bool, err error) {
	kv, err := js.KeyValue(ctx, bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		if !create {
			return nil, false, nil
		}
		replicas := 1
		if s, serr := js.Stream(ctx, stream); serr == nil {
			replicas = s.CachedInfo().Config.Replicas
		}
		kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      bucket,
			Description: "outbox-relay position records (one per stream and subject prefix)",
			History:     1,
			Storage:     jetstream.FileStorage,
			Replicas:    replicas,
		})
		if errors.Is(err, jetstream.ErrBucketExists) {
			kv, err = js.KeyValue(ctx, bucket)
		}
	}
	if err != nil {
		return nil, false, err
	}
	return &positionStore{kv: kv, bucket: bucket}, true, nil
}

// read returns key's value and revision; ok is false when there is none.
func (s *positionStore) read(ctx context.Context, key string) (val []byte, rev uint64, ok bool, err error) {
	e, err := s.kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, false, nil
	}
	if err != nil {
		return nil, 0, false, &PositionStoreError{Op: "read", Err: fmt.Errorf("read position record %s: %w", key, err)}
	}
	return e.Value(), e.Revision(), true, nil
}

// write puts val under key.
func (s *positionStore) write(ctx context.Context, key string, val []byte) error {
	_, err := s.kv.Put(ctx, key, val)
	return err
}

// PositionRecord is the position record of one feed (stream and subject prefix).
type PositionRecord struct {
	store  *positionStore
	key    string
	cur    SourcePosition
	js     jetstream.JetStream
	stream string
}

// OpenPositionRecord opens (creating if missing: file storage, the stream's replica count,
// one revision per key) the bucket, and the record of cfg's stream and subject prefix. Its
// errors are PositionStoreErrors marked fatal; those that only say JetStream did not answer
// (a timeout, a cluster without a leader) the relay retries (see relay's bucketError).
func OpenPositionRecord(ctx context.Context, js jetstream.JetStream, bucket string, cfg Config) (*PositionRecord, error) {
	cfg.fill()
	st, _, err := openPositionStore(ctx, js, bucket, cfg.Stream, true)
	if err != nil {
		return nil, &PositionStoreError{Op: "open", Fatal: true, Err: fmt.Errorf("open the position record bucket %q (the relay records what it confirmed there; its NATS user needs the JetStream API and $KV.%s.> publish rights, or set Config.PositionBucket to '' to run without slot gap detection): %w", bucket, bucket, err)}
	}
	return &PositionRecord{store: st, key: PositionKey(cfg.Stream, cfg.SubjectPrefix), js: js, stream: cfg.Stream}, nil
}

// ReadPositionRecord reads the record of cfg's stream and subject prefix without creating the
// bucket; ok is false when either is missing.
func ReadPositionRecord(ctx context.Context, js jetstream.JetStream, bucket string, cfg Config) (p SourcePosition, ok bool, err error) {
	cfg.fill()
	st, ok, err := openPositionStore(ctx, js, bucket, cfg.Stream, false)
	if err != nil {
		return p, false, &PositionStoreError{Op: "open", Fatal: true, Err: fmt.Errorf("open the position record bucket %q: %w", bucket, err)}
	}
	if !ok {
		return p, false, nil
	}
	r := &PositionRecord{store: st, key: PositionKey(cfg.Stream, cfg.SubjectPrefix)}
	return r.Get(ctx)
}

// PositionKey is a valid key-value key for a stream and subject prefix: other bytes than
// [-_a-zA-Z0-9.] are written as =XX.
func PositionKey(stream, prefix string) string {
	var b strings.Builder
	for _, c := range []byte(stream + "." + prefix) {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.':
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, "=%02X", c)
		}
	}
	return b.String()
}

// Key is the record's key in its bucket.
func (r *PositionRecord) Key() string { return r.key }

// Get reads the record; ok is false when there is none.
func (r *PositionRecord) Get(ctx context.Context) (p SourcePosition, ok bool, err error) {
	val, rev, ok, err := r.store.read(ctx, r.key)
	if err != nil || !ok {
		return p, false, err
	}
	if err := json.Unmarshal(val, &p); err != nil {
		return p, false, fmt.Errorf("position record %s (revision %d) is not valid: %w", r.key, rev, err)
	}
	r.cur = p
	return p, true, nil
}

// Put writes p as the record; later Record calls keep its source fields.
func (r *PositionRecord) Put(ctx context.Context, p SourcePosition) error {
	p.UpdatedAt = time.Now().UTC()
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	if err := r.store.write(ctx, r.key, b); err != nil {
		return &PositionStoreError{Op: "write", Err: fmt.Errorf("write position record %s at %s: %w", r.key, p.LSN, err)}
	}
	r.cur = p
	return nil
}

// Record moves the record to lsn (checkpoint.Store), with the stream's last sequence read
// now: every event up to lsn was stored before.
func (r *PositionRecord) Record(ctx context.Context, lsn pglogrepl.LSN) error {
	p := r.cur
	p.LSN = lsn
	if r.js != nil {
		s, err := r.js.Stream(ctx, r.stream)
		switch {
		case errors.Is(err, jetstream.ErrStreamNotFound):
			// Nothing is stored while it is gone; the next start finds it behind the record.
		case err != nil:
			return fmt.Errorf("read stream %s for the position record: %w", r.stream, err)
		default:
			p.StreamSeq = max(p.StreamSeq, s.CachedInfo().State.LastSeq)
		}
	}
	return r.Put(ctx, p)
}
