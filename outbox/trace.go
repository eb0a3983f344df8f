package outbox

import (
	"context"
	"regexp"
)

// The W3C Trace Context header (https://www.w3.org/TR/trace-context/#traceparent-header).
const HeaderTraceparent = "traceparent"

type traceparentKey struct{}

// traceparentRE matches version 00 traceparent values: version-traceid-parentid-flags.
var traceparentRE = regexp.MustCompile(`^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$`)

// ContextWithTraceparent returns ctx carrying a W3C traceparent, which the default Writer adds
// to every event written with that context. Invalid values are ignored. Code instrumented with
// OpenTelemetry sets Writer.Propagate instead (see there).
func ContextWithTraceparent(ctx context.Context, traceparent string) context.Context {
	if !traceparentRE.MatchString(traceparent) {
		return ctx
	}
	return context.WithValue(ctx, traceparentKey{}, traceparent)
}

// TraceparentFromContext returns the traceparent set with ContextWithTraceparent.
func TraceparentFromContext(ctx context.Context) (string, bool) {
	tp, ok := ctx.Value(traceparentKey{}).(string)
	return tp, ok
}

func propagateTraceparent(ctx context.Context, h map[string]string) {
	if tp, ok := TraceparentFromContext(ctx); ok {
		h[HeaderTraceparent] = tp
	}
}
