package main

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

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
	conn, err := pgx.Connect(ctx, d.url)
	if err != nil {
		return nil, err
	}
	_, err = migrations.Apply(ctx, conn, migrations.Options{Partitions: n})
	conn.Close(ctx)
	if err != nil {
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

	procs := make([]*relayProc, n)
	streams := make([]string, n)
	for i := range procs {
		streams[i] = fmt.Sprintf("SCALE_P%d", i)
		if _, err := e.newStream(ctx, streams[i], fmt.Sprintf("part%d", i)); err != nil {
			return nil, err
		}
		defer e.js.DeleteStream(context.Background(), streams[i])
	}
	for i := range procs {
		if procs[i], err = e.startRelayArgs(d, []string{"--slot", fmt.Sprintf("part%d", i), "--stream", streams[i],
			"--subject-prefix", fmt.Sprintf("part%d", i), "--publication", migrations.PartitionPublication("outbox_pub", i, n)}); err != nil {
			return nil, err
		}
		defer procs[i].stop() //nolint:errcheck
	}
	deadline := time.Now().Add(5 * time.Minute)
	var total uint64
	for total < uint64(o.events) {
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("scale: %d of %d events after 5 minutes", total, o.events)
		}
		total = 0
		for _, s := range streams {
			m, err := e.streamMsgs(ctx, s)
			if err != nil {
				return nil, err
			}
			total += m
		}
		time.Sleep(2 * time.Millisecond)
	}
	end := time.Now()
	if total != uint64(o.events) {
		return nil, fmt.Errorf("scale: %d events stored, want %d", total, o.events)
	}
	var cpu time.Duration
	for _, p := range procs {
		u, err := p.stop()
		if err != nil {
			return nil, err
		}
		cpu += u.cpu
	}
	many := float64(o.events) / end.Sub(procs[0].start).Seconds()
	f[fmt.Sprintf("scale: %d relays, events/s", n)] = many
	f[fmt.Sprintf("scale: %d relays / 1 relay", n)] = many / one
	f[fmt.Sprintf("scale: %d relays: relay CPU s per 100k events (sum)", n)] = cpu.Seconds() * 100000 / float64(o.events)
	return f, nil
}
