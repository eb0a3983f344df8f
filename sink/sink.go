// Package sink publishes outbox events to NATS JetStream and reports which ones the broker
// stored.
//
// Publishing is pipelined: up to Config.Window events (and Config.MaxInFlightBytes bytes) are
// in flight at once, each carrying its event id as Nats-Msg-Id so that JetStream drops a
// re-published copy. A plain async window can
// reorder when one publish is lost while later ones are stored (nats.go says so in the
// PublishMsgAsync doc), so the window is gap-free: every message carries an expectation of the
// stream's tail. On a single-replica stream that is Nats-Expected-Last-Msg-Id with the id of
// the message published just before it; on a replicated stream it is
// Nats-Expected-Last-Sequence with the stream sequence that message gets (the chain starts at
// the stream's last sequence, read before the first publish). If one message is not stored,
// every later one in the window is refused by the server too; the sink then waits for all
// outstanding acks, reads how far the stream got, and re-publishes from the first unstored
// message, in order, with backoff. Re-published copies of stored messages come back as
// duplicates (or, on a replicated stream, are refused for a sequence a duplicate did not take
// and then found stored).
//
// Why two chains: on a replicated stream nats-server v2.15.2 checks Nats-Expected-Last-Msg-Id
// only when the entry is applied on every replica and treats a refusal there as a critical
// write error that leaves the stream without a leader; the stream leader checks the last
// sequence before it proposes a message. The sequence chain needs this relay to be the only
// publisher on the stream (a message stored by another could take the sequence of a refused
// publish of the relay, and the next one would be stored after a gap); EnsureStream refuses a
// stream others can write to. On a single-replica stream another publisher only costs a resync.
//
// The Publisher by concern: publisher.go holds the window and publishing (Publish, send),
// ack.go the ack loop (Run: reply routing, the ack timer, confirms), resync.go the chain's start
// and its recovery after a failure, deadletter.go refusals and dead-letter messages, atomic.go
// atomic batches (PublishAtomic), fast.go fast-ingest batches (PublishFast), message.go the
// message of an event (msgBuilder).
package sink

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/internal/redact"
)

// Defaults for Config.
const (
	DefaultStream          = "OUTBOX"
	DefaultSubjectPrefix   = "outbox"
	DefaultDuplicateWindow = 20 * time.Minute
	DefaultWindow          = 1024
	// DefaultMaxInFlightBytes bounds the window in bytes: 64 times the server's default
	// max_payload (1 MiB), so at defaults events up to 64 KiB are bounded by the event count
	// and the byte bound only stops large events from holding up to Window × max_payload
	// (1 GiB at defaults, 64 GiB at NATS' largest max_payload) in the relay's memory.
	DefaultMaxInFlightBytes = 64 << 20
	DefaultAckTimeout       = 5 * time.Second
	// MinSafeDuplicateWindow: a shorter window is shorter than a plain Postgres restart's
	// replay horizon; the relay warns about it.
	MinSafeDuplicateWindow = 2 * time.Minute
)

// Message headers set on every event.
const (
	HeaderMsgID         = "Nats-Msg-Id"
	HeaderAggregateType = "Outbox-Aggregate-Type"
	HeaderAggregateID   = "Outbox-Aggregate-Id"
	HeaderEventType     = "Outbox-Event-Type"
	HeaderCreatedAt     = "Outbox-Created-At"
	HeaderCommitLSN     = "Outbox-Commit-Lsn"
	HeaderTxIndex       = "Outbox-Tx-Index"
	// HeaderPoisonReason is set on dead-letter messages: why the event could not be published.
	HeaderPoisonReason = "Outbox-Poison-Reason"
	// HeaderOriginalSubject is set on dead-letter messages: the subject the event was meant for.
	HeaderOriginalSubject = "Outbox-Original-Subject"
	// HeaderDroppedHeaders is set on dead-letter messages that leave headers of the event out
	// (a key nats.go refuses, or no room under the server's max_payload): how many.
	HeaderDroppedHeaders = "Outbox-Dropped-Headers"
)

// DeadLetterToken is the subject token after the prefix that dead-letter messages use:
// <prefix>.dead-letter.
const DeadLetterToken = "dead-letter"

// Config of the JetStream sink.
type Config struct {
	// Stream is the JetStream stream the events go to (default OUTBOX).
	Stream string
	// SubjectPrefix: the stream must cover <SubjectPrefix>.> (default outbox).
	SubjectPrefix string
	// DuplicateWindow of a stream the relay creates (default 20m). JetStream's own default of
	// 2 minutes is shorter than the replay after a Postgres restart can be.
	DuplicateWindow time.Duration
	// Replicas of a stream the relay creates; 0: 3 when the server is part of a cluster of 3 or
	// more servers the client knows of, else 1.
	Replicas int
	// Window is the number of events in flight (published, ack not yet received); default 1024.
	Window int
	// MaxInFlightBytes is the number of message bytes (payload, subject, headers) in flight,
	// at most (default DefaultMaxInFlightBytes). An event larger than this alone is sent when
	// nothing else is in flight.
	MaxInFlightBytes int64
	// AckTimeout: a publish without an ack after this long is treated as not stored and
	// re-published (default 5s).
	AckTimeout time.Duration
	// CloudEvents adds CloudEvents binary-mode headers (ce-id, ce-type, ce-source, ce-time,
	// ce-specversion, ce-subject, content-type) to the relay's own.
	CloudEvents bool
	// CloudEventsSource is ce-source (default DefaultCloudEventsSource).
	CloudEventsSource string

	// DeadLetter: an event the broker will never store as it is (too big for max_payload or
	// the stream's max_msg_size, headers over 64k, a header key nats.go refuses, subject over
	// the protocol limit) is replaced by a message to <SubjectPrefix>.dead-letter with the
	// reason in a header, in its place in the order (see deadLetter for what it keeps).
	// Otherwise such an event stops the relay (a *decoder.PoisonError).
	DeadLetter bool
	// SeqFloor: stream messages up to this sequence came from an earlier source (another
	// Postgres cluster, see SourcePosition); their positions are not compared with this
	// source's events.
	SeqFloor uint64
	// Tracer, when set, is told of every event the sink publishes and when the stream stored
	// it (tracing spans). nil: nothing is called and nothing is allocated for it.
	Tracer Tracer

	// Publish is how events are published: PublishSingle (default: each event its own
	// publish and ack), PublishAtomic (each transaction one atomic batch, see PublishAtomic)
	// or PublishFast (one long-lived fast-ingest batch, see PublishFast).
	Publish PublishMode

	// unchained leaves out Nats-Expected-Last-Sequence (tests only: shows what the chain
	// prevents).
	unchained bool
}

// PublishMode is how the sink publishes events (--publish).
type PublishMode string

const (
	// PublishSingle publishes every event on its own and confirms it on its own PubAck.
	PublishSingle PublishMode = "single"
	// PublishAtomic publishes the events of one Postgres transaction as one JetStream atomic
	// batch (nats-server 2.12+, stream allow_atomic): the stream stores all of them or none,
	// and one PubAck confirms them all. A transaction of more than MaxAtomicBatch events (or
	// more than the window, or more bytes than the byte bound) is split into consecutive
	// batches, each stored whole or not at all, in order.
	PublishAtomic PublishMode = "atomic"
	// PublishFast publishes the events as one long-lived JetStream fast-ingest batch
	// (nats-server 2.14+, stream allow_batched): the stream stores each message as it
	// arrives and acknowledges the batch every few hundred messages with a flow ack, which
	// confirms every event up to it. The batch ends when the relay has nothing more to send
	// (or on a failure) and the next event starts a new one. See fast.go.
	PublishFast PublishMode = "fast"
)

// MaxAtomicBatch is the most messages nats-server stores in one atomic batch (its
// max_batch_size default; a larger batch is refused).
const MaxAtomicBatch = 1000

// Tracer follows events through the sink. Start is called on the publishing goroutine when
// Publish or PublishDeadLetter takes ev (ev is reused after the call returns); the function
// it returns (nil: nothing to follow) is called once, from Run, when JetStream acknowledged
// the event as stored (seq: its stream sequence from the ack; duplicate: the ack said the
// stream held it already) or a resync found it stored (seq 0, not known). It is not called
// for an event that is never stored (the relay stopped, or the event is poison).
type Tracer interface {
	Start(ev *decoder.Event) (stored func(seq uint64, duplicate bool))
}

func (c *Config) fill() {
	if c.Publish == "" {
		c.Publish = PublishSingle
	}
	if c.Stream == "" {
		c.Stream = DefaultStream
	}
	if c.SubjectPrefix == "" {
		c.SubjectPrefix = DefaultSubjectPrefix
	}
	if c.DuplicateWindow == 0 {
		c.DuplicateWindow = DefaultDuplicateWindow
	}
	if c.Window <= 0 {
		c.Window = DefaultWindow
	}
	if c.MaxInFlightBytes <= 0 {
		c.MaxInFlightBytes = DefaultMaxInFlightBytes
	}
	if c.AckTimeout <= 0 {
		c.AckTimeout = DefaultAckTimeout
	}
}

// Connect opens a NATS connection with the settings the relay's guarantees need: reconnect
// forever, no reconnect buffer (a publish while disconnected fails at once instead of being
// replayed late, after the relay already re-published it), and a short ping interval and write
// timeout so a dead or frozen server is noticed in seconds.
func Connect(url string, opts ...nats.Option) (*nats.Conn, error) {
	base := []nats.Option{
		nats.Name("outbox-relay"),
		nats.MaxReconnects(-1),
		nats.ReconnectBufSize(-1),
		nats.ReconnectWait(500 * time.Millisecond),
		nats.PingInterval(5 * time.Second),
		nats.MaxPingsOutstanding(2),
		// A write blocked on a server that stopped reading (frozen, its TCP window full of the
		// window's publishes) holds the connection's lock, so the pings above cannot even be
		// sent: nats.go's default flusher timeout (1 minute) was the detection time. A write
		// making no progress for 10 s ends the connection and reconnects to another server.
		nats.FlusherTimeout(10 * time.Second),
		nats.ReconnectOnFlusherError(),
		nats.Timeout(5 * time.Second),
	}
	nc, err := nats.Connect(url, append(base, opts...)...)
	if err != nil {
		// nats.go echoes a URL it cannot parse (with its password or token).
		return nil, fmt.Errorf("connect to NATS at %s: %w (is nats-server running with JetStream? set Config.NATSURL)", redact.URL(url), redact.Echoed(err, url))
	}
	return nc, nil
}

// EnsureStream checks that cfg.Stream exists and takes the relay's subjects and no others (the
// relay must be its only publisher), creating it (file storage, subjects <prefix>.>,
// cfg.DuplicateWindow) when it is missing.
func EnsureStream(ctx context.Context, js jetstream.JetStream, cfg Config, log zerolog.Logger) (*jetstream.StreamInfo, error) {
	cfg.fill()
	want := cfg.SubjectPrefix + ".>"
	s, err := js.Stream(ctx, cfg.Stream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		s, err = createStream(ctx, js, cfg, want, log)
		if err != nil {
			return nil, err
		}
	} else if err != nil {
		if errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) {
			return nil, fmt.Errorf("look up stream %s: %w (start nats-server with -js)", cfg.Stream, err)
		}
		return nil, fmt.Errorf("look up stream %s: %w", cfg.Stream, err)
	}
	info := s.CachedInfo()
	covered := false
	for _, subj := range info.Config.Subjects {
		if SubjectCovers(subj, want) {
			covered = true
			break
		}
	}
	if !covered {
		return nil, fmt.Errorf("stream %s takes subjects %v, which do not cover %s: add it (nats stream edit %s --subjects '%s') or choose another Config.Sink.Stream / Config.Sink.SubjectPrefix",
			cfg.Stream, info.Config.Subjects, want, cfg.Stream, want)
	}
	// The chain (Nats-Expected-Last-Sequence) is stream-wide: a message another publisher
	// stores between two of the relay's breaks it, and on a busy stream that is nearly every
	// message. Refuse a stream that others can write to.
	var outside []string
	for _, subj := range info.Config.Subjects {
		if !SubjectCovers(want, subj) {
			outside = append(outside, subj)
		}
	}
	if len(outside) > 0 {
		return nil, fmt.Errorf("stream %s also takes subjects %v, outside the relay's %s: the relay chains its publishes on the stream's last sequence and must be the only publisher on its stream (another relay or publisher there breaks the chain on nearly every message). Give this relay a stream of its own (Config.Sink.Stream) with subjects %s, or narrow %s's subjects to %s",
			cfg.Stream, outside, want, want, cfg.Stream, want)
	}
	if cfg.Publish == PublishAtomic && !info.Config.AllowAtomicPublish {
		return nil, fmt.Errorf("stream %s does not allow atomic batch publishing, which Config.Sink.Publish atomic needs: set allow_atomic: true in its config (its JSON config from nats stream info with the field added, applied with nats stream edit %s --config <file>; nats-server 2.12+), or set Config.Sink.Publish to single",
			cfg.Stream, cfg.Stream)
	}
	if cfg.Publish == PublishFast && !info.Config.AllowBatchPublish {
		return nil, fmt.Errorf("stream %s does not allow fast batch publishing, which Config.Sink.Publish fast needs: set allow_batched: true in its config (its JSON config from nats stream info with the field added, applied with nats stream edit %s --config <file>; nats-server 2.14+), or set Config.Sink.Publish to single",
			cfg.Stream, cfg.Stream)
	}
	if len(info.Config.Sources) > 0 {
		return nil, fmt.Errorf("stream %s sources messages from other streams: the relay chains its publishes on the stream's last sequence and must be the only publisher on its stream. Give this relay a stream of its own (Config.Sink.Stream)", cfg.Stream)
	}
	if d := info.Config.Duplicates; d < MinSafeDuplicateWindow {
		log.Warn().Str("stream", cfg.Stream).Stringer("duplicate_window", d).
			Msg("stream duplicate window is under 2 minutes: events re-sent after a relay or Postgres restart may be stored twice; raise it (nats stream edit --dupe-window 20m)")
	}
	return info, nil
}

// SubjectCovers reports whether every subject matching pattern also matches filter.
func SubjectCovers(filter, pattern string) bool {
	f, p := splitTokens(filter), splitTokens(pattern)
	for i, ft := range f {
		if ft == ">" {
			return i < len(p)
		}
		if i >= len(p) {
			return false
		}
		pt := p[i]
		switch {
		case ft == "*":
			if pt == ">" {
				return false
			}
		case ft != pt:
			return false
		}
	}
	return len(f) == len(p)
}

func splitTokens(s string) []string {
	var out []string
	start := 0
	for i := 0; i <= len(s); i++ {
		if i == len(s) || s[i] == '.' {
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return out
}

// createStream creates cfg.Stream taking subjects want (file storage, cfg.DuplicateWindow,
// discard: new) with cfg.Replicas replicas, or when that is 0, 3 on a cluster of 3 or more
// servers the client knows of and 1 otherwise.
func createStream(ctx context.Context, js jetstream.JetStream, cfg Config, want string, log zerolog.Logger) (jetstream.Stream, error) {
	replicas := cfg.Replicas
	if replicas <= 0 {
		replicas = 1
		// The client's server pool holds the URLs it was given and those the cluster
		// advertises.
		if nc := js.Conn(); nc != nil && nc.ConnectedClusterName() != "" && len(nc.Servers()) >= 3 {
			replicas = 3
		}
	}
	// discard: new: a stream at a limit refuses new events (the relay waits, Postgres keeps
	// them) instead of dropping old ones nobody may have read yet.
	s, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name:       cfg.Stream,
		Subjects:   []string{want},
		Storage:    jetstream.FileStorage,
		Duplicates: cfg.DuplicateWindow,
		Replicas:   replicas,
		Discard:    jetstream.DiscardNew,
		// Atomic batches need it (nats-server 2.12+); a server that does not know the
		// field refuses the stream, which the error below names.
		AllowAtomicPublish: cfg.Publish == PublishAtomic,
		// Fast batches need it (nats-server 2.14+).
		AllowBatchPublish: cfg.Publish == PublishFast,
	})
	if err != nil {
		hint := ""
		if replicas > 1 && cfg.Replicas <= 0 {
			hint = " (the relay asks for 3 replicas on a NATS cluster; set Config.Sink.Replicas)"
		}
		return nil, fmt.Errorf("create stream %s for subjects %s with %d replicas: %w%s", cfg.Stream, want, replicas, err, hint)
	}
	log.Info().Str("stream", cfg.Stream).Str("subjects", want).Stringer("duplicate_window", cfg.DuplicateWindow).
		Int("replicas", replicas).Msg("created stream")
	return s, nil
}
