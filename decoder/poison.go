package decoder

import (
	"fmt"

	"github.com/jackc/pglogrepl"
)

// PoisonError is an outbox row or event that can never be published as it is: the decoder
// cannot turn the row into an event (a NULL id, invalid headers...), or the broker will never
// store the event (too large for the server's max_payload or the stream's max_msg_size, a header
// key nats.go refuses...). Retrying cannot help: the relay fails closed on it (nothing from it
// on is confirmed) unless poison events are dead-lettered. Find it with errors.As.
type PoisonError struct {
	// CommitLSN and TxIndex are the event's position: its transaction's commit LSN and its
	// 0-based index among the transaction's events.
	CommitLSN pglogrepl.LSN
	TxIndex   int
	// ID is the event's id ("" when the row has none).
	ID  string
	msg string
}

// Poisonf returns a PoisonError at the given position whose message is the formatted text.
func Poisonf(commitLSN pglogrepl.LSN, txIndex int, id string, format string, args ...any) *PoisonError {
	return &PoisonError{CommitLSN: commitLSN, TxIndex: txIndex, ID: id, msg: fmt.Sprintf(format, args...)}
}

func (e *PoisonError) Error() string { return e.msg }
