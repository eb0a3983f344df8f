package sink

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go/jetstream"
)

// ErrForeignPublisher: a message under the relay's subjects was not published by a relay.
var ErrForeignPublisher = errors.New("foreign message on the relay's subjects")

// Position orders the relay's events: transactions by commit LSN (BeginMessage.FinalLSN, which
// Postgres sends in commit order), events inside a transaction by their index. Every message
// carries it in the Outbox-Commit-Lsn and Outbox-Tx-Index headers.
type Position struct {
	CommitLSN pglogrepl.LSN
	TxIndex   int
}

// AtOrBefore reports whether p is at or before q.
func (p Position) AtOrBefore(q Position) bool {
	return p.CommitLSN < q.CommitLSN || (p.CommitLSN == q.CommitLSN && p.TxIndex <= q.TxIndex)
}

func (p Position) String() string { return fmt.Sprintf("%s#%d", p.CommitLSN, p.TxIndex) }

// LastStored reads the position of the newest message in cfg.Stream under the relay's subjects
// (<prefix>.>) and its stream sequence. ok is false when there is none.
//
// Because the window is gap-free (a message is stored only after its predecessor), every event
// at or before that position is in the stream, and a replayed event there may be skipped: this
// makes the relay replay-proof past the stream's duplicate window. It holds only while this
// relay is the only publisher on its subjects.
func LastStored(ctx context.Context, js jetstream.JetStream, cfg Config) (pos Position, seq uint64, ok bool, err error) {
	m, ok, err := LastStoredMsg(ctx, js, cfg)
	return m.Position, m.Seq, ok, err
}

// StoredMsg is the relay's newest message in its stream, as LastStoredMsg reads it.
type StoredMsg struct {
	Position Position
	Seq      uint64 // stream sequence
	// ID is the message's Nats-Msg-Id when it is a live event (not a dead letter or a
	// backfilled copy, whose position is a stamp): the row a replay of Position must yield.
	ID string
	// StreamLastSeq is the sequence of the stream's newest message on any subject when it was
	// looked up (set even when the relay's subjects hold none).
	StreamLastSeq uint64
}

// LastStoredMsg is LastStored with the message's id and the stream's last sequence (see
// StoredMsg).
func LastStoredMsg(ctx context.Context, js jetstream.JetStream, cfg Config) (last StoredMsg, ok bool, err error) {
	last, ok, _, err = lastStored(ctx, js, cfg)
	return last, ok, err
}

// lastStored is LastStoredMsg, also returning the stream's info (read before the last
// message).
func lastStored(ctx context.Context, js jetstream.JetStream, cfg Config) (last StoredMsg, ok bool, info *jetstream.StreamInfo, err error) {
	cfg.fill()
	s, err := js.Stream(ctx, cfg.Stream)
	if err != nil {
		return StoredMsg{}, false, nil, fmt.Errorf("look up stream %s: %w", cfg.Stream, err)
	}
	info = s.CachedInfo()
	last, ok, err = lastStoredIn(ctx, s, cfg)
	last.StreamLastSeq = info.State.LastSeq
	return last, ok, info, err
}

// lastStoredIn reads the newest message of s under cfg's prefix.
func lastStoredIn(ctx context.Context, s jetstream.Stream, cfg Config) (last StoredMsg, ok bool, err error) {
	m, err := s.GetLastMsgForSubject(ctx, cfg.SubjectPrefix+".>")
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return last, false, nil
	}
	if err != nil {
		return StoredMsg{}, false, fmt.Errorf("read the last message of stream %s: %w", cfg.Stream, err)
	}
	lsn, idx := m.Header.Get(HeaderCommitLSN), m.Header.Get(HeaderTxIndex)
	if lsn == "" || idx == "" {
		return StoredMsg{}, false, fmt.Errorf("%w: the last message of stream %s (sequence %d, subject %s) has no %s/%s headers: another publisher writes to the relay's subjects; give the relay its own Config.Sink.SubjectPrefix or stream",
			ErrForeignPublisher, cfg.Stream, m.Sequence, m.Subject, HeaderCommitLSN, HeaderTxIndex)
	}
	pos := &last.Position
	if pos.CommitLSN, err = pglogrepl.ParseLSN(lsn); err != nil {
		return StoredMsg{}, false, fmt.Errorf("stream %s sequence %d: bad %s %q: %w", cfg.Stream, m.Sequence, HeaderCommitLSN, lsn, err)
	}
	if pos.TxIndex, err = strconv.Atoi(idx); err != nil {
		return StoredMsg{}, false, fmt.Errorf("stream %s sequence %d: bad %s %q: %w", cfg.Stream, m.Sequence, HeaderTxIndex, idx, err)
	}
	last.Seq = m.Sequence
	if m.Subject != cfg.SubjectPrefix+"."+DeadLetterToken && m.Header.Get(HeaderBackfill) == "" {
		last.ID = m.Header.Get(HeaderMsgID)
	}
	return last, true, nil
}
