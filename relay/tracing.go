package relay

import (
	"context"

	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
)

// decodingMarker is a sink.Tracer that wants to know when each WAL message starts decoding,
// so that the span of the event it yields starts there.
type decodingMarker interface {
	Decoding()
}

// handler is p as the replication handler; when t marks decoding starts, each message's
// start is marked first (the sink's Tracer hook starts and ends the span).
func (p *pipeline) handler(t sink.Tracer) replication.Handler {
	m, ok := t.(decodingMarker)
	if !ok {
		return p
	}
	return tracedPipeline{p, m}
}

type tracedPipeline struct {
	*pipeline
	m decodingMarker
}

func (h tracedPipeline) Handle(ctx context.Context, data []byte) error {
	h.m.Decoding()
	return h.pipeline.Handle(ctx, data)
}
