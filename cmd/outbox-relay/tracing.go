package main

import (
	"context"

	"github.com/outbox-relay/outbox-relay/internal/tracing"
	"github.com/outbox-relay/outbox-relay/replication"
)

// handler is p as the replication handler; with a tracer, each message's decoding start is
// marked first, so that the span of the event it yields starts there (the sink's Tracer hook
// starts and ends the span).
func (p *pipeline) handler(t *tracing.Tracer) replication.Handler {
	if t == nil {
		return p
	}
	return tracedPipeline{p, t}
}

type tracedPipeline struct {
	*pipeline
	t *tracing.Tracer
}

func (h tracedPipeline) Handle(ctx context.Context, data []byte) error {
	h.t.Decoding()
	return h.pipeline.Handle(ctx, data)
}
