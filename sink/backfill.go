package sink

import (
	"fmt"

	"github.com/nats-io/nats.go"

	"github.com/outbox-relay/outbox-relay/decoder"
)

// HeaderBackfill marks a message republished by outbox-relay backfill.
const HeaderBackfill = "Outbox-Backfill"

// BackfillMsg builds the message the relay would publish for ev (same subject, body and
// headers), stamped at pos instead of the event's own position and marked with
// Outbox-Backfill: true. pos is the stream's last stored position when the backfill began, so
// that backfilled messages do not move the position the relay skips replays up to
// (LastStored). An event the relay treats as poison for its header keys is an ErrPoison
// error.
func BackfillMsg(cfg Config, ev *decoder.Event, pos Position) (*nats.Msg, error) {
	cfg.fill()
	ev.CommitLSN, ev.TxIndex = pos.CommitLSN, pos.TxIndex
	j := &JetStream{cfg: cfg}
	e := &entry{}
	j.buildMsg(e, ev)
	if reason := e.headerRefusal(); reason != "" {
		return nil, fmt.Errorf("%w: event %s: %s", ErrPoison, e.id, reason)
	}
	if cfg.CloudEvents {
		addCloudEvents(e.header(), ev, cfg.CloudEventsSource)
	}
	e.header().Set(HeaderBackfill, "true")
	m := e.msg
	return &m, nil
}
