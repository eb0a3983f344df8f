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
	pos, seq, ok, _, err = lastStored(ctx, js, cfg)
	return pos, seq, ok, err
}

// lastStored is LastStored, also returning the stream's info (read before the last message).
func lastStored(ctx context.Context, js jetstream.JetStream, cfg Config) (pos Position, seq uint64, ok bool, info *jetstream.StreamInfo, err error) {
	cfg.fill()
	s, err := js.Stream(ctx, cfg.Stream)
	if err != nil {
		return Position{}, 0, false, nil, fmt.Errorf("look up stream %s: %w", cfg.Stream, err)
	}
	info = s.CachedInfo()
	pos, seq, ok, err = lastStoredIn(ctx, s, cfg)
	return pos, seq, ok, info, err
}

func lastStoredIn(ctx context.Context, s jetstream.Stream, cfg Config) (pos Position, seq uint64, ok bool, err error) {
	m, err := s.GetLastMsgForSubject(ctx, cfg.SubjectPrefix+".>")
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return Position{}, 0, false, nil
	}
	if err != nil {
		return Position{}, 0, false, fmt.Errorf("read the last message of stream %s: %w", cfg.Stream, err)
	}
	lsn, idx := m.Header.Get(HeaderCommitLSN), m.Header.Get(HeaderTxIndex)
	if lsn == "" || idx == "" {
		return Position{}, 0, false, fmt.Errorf("%w: the last message of stream %s (sequence %d, subject %s) has no %s/%s headers: another publisher writes to the relay's subjects; give the relay its own --subject-prefix or stream",
			ErrForeignPublisher, cfg.Stream, m.Sequence, m.Subject, HeaderCommitLSN, HeaderTxIndex)
	}
	if pos.CommitLSN, err = pglogrepl.ParseLSN(lsn); err != nil {
		return Position{}, 0, false, fmt.Errorf("stream %s sequence %d: bad %s %q: %w", cfg.Stream, m.Sequence, HeaderCommitLSN, lsn, err)
	}
	if pos.TxIndex, err = strconv.Atoi(idx); err != nil {
		return Position{}, 0, false, fmt.Errorf("stream %s sequence %d: bad %s %q: %w", cfg.Stream, m.Sequence, HeaderTxIndex, idx, err)
	}
	return pos, m.Sequence, true, nil
}
