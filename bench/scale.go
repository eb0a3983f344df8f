package main

import "context"

// runScale compares one relay with o.partitions relays, each on its own slot and partitioned
// publication, draining the same events.
func (e *env) runScale(ctx context.Context, o opts, rep int) (figures, error) {
	return figures{}, nil
}
