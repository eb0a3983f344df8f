package main

import (
	"context"
	"fmt"

	"github.com/outbox-relay/outbox-relay/migrations"
)

// runScale drains the same o.events committed events with one relay (the whole table) and
// with o.partitions relays (one per row-filtered partition publication, each with its own
// slot and stream), all slots created before the events.
func (e *env) runScale(ctx context.Context, o opts, _ int) (figures, error) {
	n := o.partitions
	d, err := e.newDB(ctx)
	if err != nil {
		return nil, err
	}
	defer e.drop(context.Background(), d)
	if err := d.migrate(ctx, migrations.Options{Partitions: n}); err != nil {
		return nil, err
	}
	if err := d.createSlots(ctx, "one"); err != nil {
		return nil, err
	}
	for i := 0; i < n; i++ {
		if err := d.createSlots(ctx, fmt.Sprintf("part%d", i)); err != nil {
			return nil, err
		}
	}
	if err := d.insert(ctx, o.events, 100, o.payload); err != nil {
		return nil, err
	}
	f := figures{}
	one, u, err := e.relayDrain(ctx, e.relayBin, d, "one", "SCALE_ONE", "one", o.events, nil)
	if err != nil {
		return nil, err
	}
	f["scale: 1 relay, events/s"] = one
	addUsage(f, "scale: 1 relay:", u, o.events)

	runs := make([]relayRun, n)
	for i := range runs {
		runs[i] = relayRun{slot: fmt.Sprintf("part%d", i), stream: fmt.Sprintf("SCALE_P%d", i), prefix: fmt.Sprintf("part%d", i),
			args: []string{"--publication", migrations.PartitionPublication("outbox_pub", i, n)}}
	}
	res, err := e.relaysDrain(ctx, d, o.events, runs)
	if err != nil {
		return nil, fmt.Errorf("scale: %w", err)
	}
	f[fmt.Sprintf("scale: %d relays, events/s", n)] = res.rate
	f[fmt.Sprintf("scale: %d relays / 1 relay", n)] = res.rate / one
	f[fmt.Sprintf("scale: %d relays: relay CPU s per 100k events (sum)", n)] = res.relay.Seconds() * 100000 / float64(o.events)
	return f, nil
}
