package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/outbox-relay/outbox-relay/migrations"
)

// runTables drains o.events events committed to two outbox tables (public.outbox and
// public.billing_outbox, transactions of 100 alternating between them) twice: by one relay
// serving both tables from one slot and one publication, and by two relays, one per table,
// each with its own slot, publication and stream. Besides events/s it reports the Postgres
// side: the CPU time of the walsender processes (each decodes the whole WAL, whatever its
// publication holds) per 100k events.
func (e *env) runTables(ctx context.Context, o opts, _ int) (figures, error) {
	d, err := e.newDB(ctx)
	if err != nil {
		return nil, err
	}
	defer e.drop(context.Background(), d)
	if err := d.migrate(ctx,
		migrations.Options{Table: "billing_outbox"},                             // both tables in outbox_pub
		migrations.Options{Table: "outbox", Publication: "orders_pub"},          // one table each
		migrations.Options{Table: "billing_outbox", Publication: "billing_pub"}, //
	); err != nil {
		return nil, err
	}
	if err := d.createSlots(ctx, "both", "orders", "billing"); err != nil {
		return nil, err
	}
	billingSQL := strings.Replace(insertSQL, "INSERT INTO outbox", "INSERT INTO billing_outbox", 1)
	for n := 0; n < o.events; n += 100 {
		sql := insertSQL
		if n/100%2 == 1 {
			sql = billingSQL
		}
		if _, err := d.pool.Exec(ctx, sql, n, payloadPad(o.payload), min(100, o.events-n)); err != nil {
			return nil, fmt.Errorf("insert events: %w", err)
		}
	}
	f := figures{}
	one, err := e.relaysDrain(ctx, d, o.events, []relayRun{{slot: "both", stream: "TABLES_ONE", prefix: "both",
		args: []string{"--table", "public.outbox", "--table", "public.billing_outbox"}}})
	if err != nil {
		return nil, err
	}
	two, err := e.relaysDrain(ctx, d, o.events, []relayRun{
		{slot: "orders", stream: "TABLES_ORDERS", prefix: "orders", args: []string{"--publication", "orders_pub"}},
		{slot: "billing", stream: "TABLES_BILLING", prefix: "billing", args: []string{"--table", "public.billing_outbox", "--publication", "billing_pub"}},
	})
	if err != nil {
		return nil, err
	}
	per100k := func(c time.Duration) float64 { return c.Seconds() * 100000 / float64(o.events) }
	f["tables: 1 relay on 2 tables, events/s"] = one.rate
	f["tables: 2 relays (1 table each), events/s"] = two.rate
	f["tables: 1 relay / 2 relays, events/s"] = one.rate / two.rate
	f["tables: 1 relay: Postgres walsender CPU s per 100k events"] = per100k(one.walsender)
	f["tables: 2 relays: Postgres walsender CPU s per 100k events (sum)"] = per100k(two.walsender)
	f["tables: 1 relay: relay CPU s per 100k events"] = per100k(one.relay)
	f["tables: 2 relays: relay CPU s per 100k events (sum)"] = per100k(two.relay)
	f["tables: 1 relay: relay peak RSS MiB"] = float64(one.maxRSS) / mib
	return f, nil
}

// relayRun is one relay of relaysDrain: its slot, stream, subject prefix and further flags.
type relayRun struct {
	slot, stream, prefix string
	args                 []string
}

type drained struct {
	rate      float64       // events/s from the first relay's start to the last event stored
	relay     time.Duration // CPU of the relays (sum)
	walsender time.Duration // CPU of their walsenders (sum)
	maxRSS    int64         // largest peak RSS of the relays
}

// relaysDrain starts every relay of runs at once on slots holding n events between them, waits
// until their streams hold n, and reads the CPU time of each relay and of its walsender.
func (e *env) relaysDrain(ctx context.Context, d *db, n int, runs []relayRun) (drained, error) {
	var res drained
	procs := make([]*relayProc, len(runs))
	for _, r := range runs {
		if _, err := e.newStream(ctx, r.stream, r.prefix); err != nil {
			return res, err
		}
		defer e.js.DeleteStream(context.Background(), r.stream)
	}
	for i, r := range runs {
		p, err := e.startRelayArgs(d, append([]string{"--slot", r.slot, "--stream", r.stream, "--subject-prefix", r.prefix}, r.args...))
		if err != nil {
			return res, err
		}
		procs[i] = p
		defer p.stop() //nolint:errcheck
	}
	walsenders := make([]int, len(runs))
	for i, r := range runs {
		if err := d.waitSlotActive(ctx, r.slot, procs[i]); err != nil {
			return res, err
		}
		if err := d.pool.QueryRow(ctx, `SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1`, r.slot).Scan(&walsenders[i]); err != nil {
			return res, err
		}
	}
	deadline := time.Now().Add(5 * time.Minute)
	for {
		var total uint64
		for _, r := range runs {
			m, err := e.streamMsgs(ctx, r.stream)
			if err != nil {
				return res, err
			}
			total += m
		}
		if total >= uint64(n) {
			if total != uint64(n) {
				return res, fmt.Errorf("%d events stored, want %d", total, n)
			}
			break
		}
		for _, p := range procs {
			if err := p.exited(); err != nil {
				return res, err
			}
		}
		if time.Now().After(deadline) {
			return res, fmt.Errorf("%d of %d events after 5 minutes", total, n)
		}
		time.Sleep(2 * time.Millisecond)
	}
	res.rate = float64(n) / time.Since(procs[0].start).Seconds()
	for _, pid := range walsenders {
		res.walsender += procCPU(pid)
	}
	for _, p := range procs {
		u, err := p.stop()
		if err != nil {
			return res, err
		}
		res.relay += u.cpu
		res.maxRSS = max(res.maxRSS, u.maxRSS)
	}
	return res, nil
}
