package main

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// figures of one scenario run, by figure name.
type figures map[string]float64

const mib = 1 << 20

func addUsage(f figures, prefix string, u usage, events int) {
	f[prefix+" relay CPU s"] = u.cpu.Seconds()
	if events > 0 {
		f[prefix+" relay CPU s per 100k events"] = u.cpu.Seconds() * 100000 / float64(events)
	}
	f[prefix+" relay peak RSS MiB"] = float64(u.maxRSS) / mib
}

// runDrain measures ceilings A, B, D, D-atomic, D-fast and the relay's drain (--publish
// single, atomic and fast) on the same 200,000 committed events in transactions of 100: the slots are created
// before the events are inserted, one for each consumer.
func (e *env) runDrain(ctx context.Context, o opts, rep int) (figures, error) {
	return e.drainTxs(ctx, o, rep, o.events, 100, "")
}

// runDrain1 is runDrain with single-event transactions (a tenth of -events: each is a commit):
// D and the relay in each mode.
func (e *env) runDrain1(ctx context.Context, o opts, rep int) (figures, error) {
	return e.drainTxs(ctx, o, rep, o.events/10, 1, "1-event tx ")
}

func (e *env) drainTxs(ctx context.Context, o opts, rep, events, perTx int, label string) (figures, error) {
	full := perTx > 1
	d, err := e.newDB(ctx)
	if err != nil {
		return nil, err
	}
	defer e.drop(context.Background(), d)
	slots := []string{"ceil_d", "ceil_datomic", "ceil_dfast", "relay", "relay_atomic", "relay_fast"}
	if full {
		slots = append(slots, "ceil_a", "ceil_dh")
	}
	if o.relayB != "" {
		slots = append(slots, "relay_b")
	}
	if err := d.createSlots(ctx, slots...); err != nil {
		return nil, err
	}
	if err := d.insert(ctx, events, perTx, o.payload); err != nil {
		return nil, err
	}
	f := figures{}
	if full {
		if f["ceiling A: decode, rows/s"], err = ceilingA(ctx, d, "ceil_a", events); err != nil {
			return nil, err
		}
		if f["ceiling B: publish, msgs/s"], err = e.ceilingB(ctx, "CEIL_B", "ceilb", events, o.payload); err != nil {
			return nil, err
		}
	}
	dKey := label + "ceiling D: bare pipe, rows/s"
	cpu0 := selfCPU()
	if f[dKey], err = e.ceilingD(ctx, d, "ceil_d", "CEIL_D", "ceild", events, false); err != nil {
		return nil, err
	}
	f[label+"ceiling D: CPU s per 100k rows (bench process)"] = (selfCPU() - cpu0).Seconds() * 100000 / float64(events)
	daKey := label + "ceiling D-atomic: bare pipe, one atomic batch per transaction, rows/s"
	if full {
		// Not with single-event transactions: the relay publishes those without a batch, and
		// D's loop sending one 1-message batch each fell so far behind the server that
		// Postgres dropped its replication connection (wal_sender_timeout).
		cpu0 = selfCPU()
		if f[daKey], err = e.ceilingDAtomic(ctx, d, "ceil_datomic", "CEIL_DA", "ceilda", events, perTx); err != nil {
			return nil, err
		}
		f[label+"ceiling D-atomic: CPU s per 100k rows (bench process)"] = (selfCPU() - cpu0).Seconds() * 100000 / float64(events)
		f[label+"ceiling D-atomic / D"] = f[daKey] / f[dKey]
		dfKey := label + "ceiling D-fast: bare pipe, one fast batch, rows/s"
		cpu0 = selfCPU()
		if f[dfKey], err = e.ceilingDFast(ctx, d, "ceil_dfast", "CEIL_DF", "ceildf", events); err != nil {
			return nil, err
		}
		f[label+"ceiling D-fast: CPU s per 100k rows (bench process)"] = (selfCPU() - cpu0).Seconds() * 100000 / float64(events)
		f[label+"ceiling D-fast / D"] = f[dfKey] / f[dKey]
		if f["diagnostic D+h: bare pipe with the relay's headers, rows/s"], err = e.ceilingD(ctx, d, "ceil_dh", "CEIL_DH", "ceildh", events, true); err != nil {
			return nil, err
		}
	}
	// The relay in atomic mode, on its own slot and stream.
	rate, u, err := e.relayDrain(ctx, e.relayBin, d, "relay_atomic", "DRAINA", "draina", events, o.relayEnv, append([]string{"--publish", "atomic"}, o.relayArgs...)...)
	if err != nil {
		return nil, err
	}
	f[label+"drain atomic: relay, events/s"] = rate
	f[label+"drain atomic: relay / D"] = rate / f[dKey]
	if full {
		f[label+"drain atomic: relay / D-atomic"] = rate / f[daKey]
	}
	addUsage(f, label+"drain atomic:", u, events)
	// The relay in fast mode, on its own slot and stream.
	profile := "drain1-fast"
	if full {
		profile = "drain-fast"
	}
	rate, u, err = e.relayDrain(ctx, e.relayBin, d, "relay_fast", "DRAINF", "drainf", events, append(o.profileEnv(profile, rep), o.relayEnv...), append([]string{"--publish", "fast"}, o.relayArgs...)...)
	if err != nil {
		return nil, err
	}
	f[label+"drain fast: relay, events/s"] = rate
	f[label+"drain fast: relay / D"] = rate / f[dKey]
	if full {
		f[label+"drain fast: relay / D-fast"] = rate / f[label+"ceiling D-fast: bare pipe, one fast batch, rows/s"]
	}
	addUsage(f, label+"drain fast:", u, events)
	if !full {
		rate, u, err := e.relayDrain(ctx, e.relayBin, d, "relay", "DRAIN", "drain", events, o.relayEnv, o.relayArgs...)
		if err != nil {
			return nil, err
		}
		f[label+"drain: relay, events/s"] = rate
		f[label+"drain: relay / D"] = rate / f[dKey]
		addUsage(f, label+"drain:", u, events)
		return f, nil
	}
	runs := []struct{ bin, slot, stream, prefix, label string }{{e.relayBin, "relay", "DRAIN", "drain", "drain:"}}
	if o.relayB != "" {
		b := struct{ bin, slot, stream, prefix, label string }{o.relayB, "relay_b", "DRAINB", "drainb", "drain B:"}
		if rep%2 == 1 { // alternate which relay drains first
			runs = append(runs[:0:0], b, runs[0])
		} else {
			runs = append(runs, b)
		}
	}
	for _, r := range runs {
		environ := o.relayEnv
		if r.bin == e.relayBin {
			environ = append(o.profileEnv("drain", rep), o.relayEnv...)
		}
		rate, u, err := e.relayDrain(ctx, r.bin, d, r.slot, r.stream, r.prefix, events, environ, o.relayArgs...)
		if err != nil {
			return nil, err
		}
		f[r.label+" relay, events/s"] = rate
		f[r.label+" relay / D"] = rate / f["ceiling D: bare pipe, rows/s"]
		f[r.label+" relay / D+h"] = rate / f["diagnostic D+h: bare pipe with the relay's headers, rows/s"]
		addUsage(f, r.label, u, events)
	}
	return f, nil
}

// relayDrain starts the relay on a slot holding n events and returns events/s from the start
// of the process until the stream holds all of them.
func (e *env) relayDrain(ctx context.Context, bin string, d *db, slot, stream, prefix string, n int, environ []string, extra ...string) (float64, usage, error) {
	if _, err := e.newStream(ctx, stream, prefix); err != nil {
		return 0, usage{}, err
	}
	defer e.js.DeleteStream(context.Background(), stream)
	p, err := e.startRelayBin(bin, d, append([]string{"--slot", slot, "--stream", stream, "--subject-prefix", prefix}, extra...), environ...)
	if err != nil {
		return 0, usage{}, err
	}
	end, werr := e.waitMsgs(ctx, stream, uint64(n), 5*time.Minute)
	u, err := p.stop()
	if werr != nil {
		return 0, u, fmt.Errorf("%w; relay log:\n%s", werr, tailLog(p.log.String()))
	}
	if err != nil {
		return 0, u, err
	}
	if got, _ := e.streamMsgs(ctx, stream); got != uint64(n) {
		return 0, u, fmt.Errorf("stream %s has %d messages, want %d", stream, got, n)
	}
	return float64(n) / end.Sub(p.start).Seconds(), u, nil
}

// runLive: 4 producers insert one event per transaction as fast as Postgres accepts while the
// relay runs; the backlog is what the stream lacks when the producers stop.
func (e *env) runLive(ctx context.Context, o opts, _ int) (figures, error) {
	d, err := e.newDB(ctx)
	if err != nil {
		return nil, err
	}
	defer e.drop(context.Background(), d)
	if err := d.createSlots(ctx, "relay", "bare"); err != nil {
		return nil, err
	}
	if _, err := e.newStream(ctx, "LIVE", "live"); err != nil {
		return nil, err
	}
	defer e.js.DeleteStream(context.Background(), "LIVE")
	p, err := e.startRelay(d, "relay", "LIVE", "live")
	if err != nil {
		return nil, err
	}
	defer p.stop() //nolint:errcheck // stopped below; a second stop is a no-op
	if err := d.waitSlotActive(ctx, "relay", p); err != nil {
		return nil, err
	}
	var produced atomic.Int64
	pctx, cancel := context.WithTimeout(ctx, o.liveDuration)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	start := time.Now()
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := produce(pctx, d.pool, w, &produced); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	close(errs)
	for err := range errs {
		return nil, err
	}
	n := produced.Load()
	stored, err := e.streamMsgs(ctx, "LIVE")
	if err != nil {
		return nil, err
	}
	caught, err := e.waitMsgs(ctx, "LIVE", uint64(n), 2*time.Minute)
	if err != nil {
		return nil, err
	}
	u, err := p.stop()
	if err != nil {
		return nil, err
	}
	f := figures{
		"live: producers, events/s":     float64(n) / el.Seconds(),
		"live: backlog at end, events":  float64(n - int64(stored)),
		"live: backlog drained in, ms":  float64(caught.Sub(start.Add(el)).Microseconds()) / 1000,
		"live: relay, events/s overall": float64(n) / caught.Sub(start).Seconds(),
	}
	addUsage(f, "live:", u, int(n))
	// Reference: D's bare loop drains the same one-event transactions afterwards (from its own
	// slot, created with the relay's), which says whether one-event transactions, rather than
	// the relay, limit the rate.
	if _, err := e.newStream(ctx, "LIVED", "lived"); err != nil {
		return nil, err
	}
	defer e.js.DeleteStream(context.Background(), "LIVED")
	t0 := time.Now()
	if err := e.barePipe(ctx, d, "bare", "LIVED", "lived", int(n)); err != nil {
		return nil, err
	}
	f["live: D's loop draining the same events afterwards, rows/s"] = float64(n) / time.Since(t0).Seconds()
	return f, nil
}

// produce inserts one event per transaction until ctx ends.
func produce(ctx context.Context, pool *pgxpool.Pool, w int, n *atomic.Int64) error {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	pad := strings.Repeat("x", payloadPad(400))
	for i := 0; ; i++ {
		_, err := conn.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', $1, 'OrderCreated', jsonb_build_object('n', $2::int, 'pad', $3::text))`,
			fmt.Sprint(w*1000000+i%1000), i, pad)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		n.Add(1)
	}
}

// latencyRun inserts rate events/s, one per transaction, for dur, while a JetStream ordered
// consumer on stream records when each arrives. Latency is arrival minus the moment the
// INSERT's commit returned to the producer. pub is the same for a core NATS subscriber on its
// own connection, which sees each message when the server routes the publish, before the
// stream has stored it: it splits the time into getting to the broker and storing + delivering.
func (e *env) latencyRun(ctx context.Context, d *db, stream string, rate int, dur time.Duration) (lat, pub []time.Duration, err error) {
	s, err := e.js.Stream(ctx, stream)
	if err != nil {
		return nil, nil, err
	}
	c, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverNewPolicy})
	if err != nil {
		return nil, nil, err
	}
	var mu sync.Mutex
	recv := make(map[string]time.Time, rate*int(dur.Seconds()+1))
	routed := make(map[string]time.Time, rate*int(dur.Seconds()+1))
	record := func(m map[string]time.Time, h nats.Header) {
		t := time.Now()
		id := h.Get(jetstream.MsgIDHeader)
		mu.Lock()
		m[id] = t
		mu.Unlock()
	}
	cc, err := c.Consume(func(m jetstream.Msg) { record(recv, m.Headers()) })
	if err != nil {
		return nil, nil, err
	}
	defer cc.Stop()
	cnc, err := nats.Connect(e.nats.URL, nats.Name("bench-core-subscriber"))
	if err != nil {
		return nil, nil, err
	}
	defer cnc.Close()
	for _, subj := range s.CachedInfo().Config.Subjects {
		if _, err := cnc.Subscribe(subj, func(m *nats.Msg) { record(routed, m.Header) }); err != nil {
			return nil, nil, err
		}
	}
	if err := cnc.Flush(); err != nil {
		return nil, nil, err
	}
	conn, err := d.pool.Acquire(ctx)
	if err != nil {
		return nil, nil, err
	}
	defer conn.Release()
	pad := strings.Repeat("x", payloadPad(400))
	total := rate * int(dur/time.Second)
	committed := make(map[string]time.Time, total)
	interval := time.Second / time.Duration(rate)
	start := time.Now()
	for i := 0; i < total; i++ {
		if wait := time.Until(start.Add(time.Duration(i) * interval)); wait > 0 {
			time.Sleep(wait)
		}
		var id string
		err := conn.QueryRow(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', $1, 'OrderCreated', jsonb_build_object('n', $2::int, 'pad', $3::text)) RETURNING id::text`,
			fmt.Sprint(i%1000), i, pad).Scan(&id)
		if err != nil {
			return nil, nil, err
		}
		committed[id] = time.Now()
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		mu.Lock()
		got := min(len(recv), len(routed))
		mu.Unlock()
		if got >= total {
			break
		}
		if time.Now().After(deadline) {
			return nil, nil, fmt.Errorf("latency: received %d of %d events", got, total)
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	lat = make([]time.Duration, 0, total)
	pub = make([]time.Duration, 0, total)
	for id, t := range committed {
		r, ok := recv[id]
		p, okp := routed[id]
		if !ok || !okp {
			return nil, nil, fmt.Errorf("latency: event %s never arrived", id)
		}
		lat = append(lat, max(r.Sub(t), 0))
		pub = append(pub, max(p.Sub(t), 0))
	}
	slices.Sort(lat)
	slices.Sort(pub)
	return lat, pub, nil
}

func quantile(sorted []time.Duration, q float64) float64 {
	i := int(q * float64(len(sorted)-1))
	return float64(sorted[i].Microseconds()) / 1000
}

func latencyFigures(f figures, prefix string, lat []time.Duration, all bool) {
	f[prefix+" p50 ms"] = quantile(lat, 0.50)
	f[prefix+" p99 ms"] = quantile(lat, 0.99)
	if all {
		f[prefix+" p99.9 ms"] = quantile(lat, 0.999)
		f[prefix+" max ms"] = quantile(lat, 1)
	}
}

func (e *env) runLatency(ctx context.Context, o opts, rep int) (figures, error) {
	f := figures{}
	// The same harness on the bare pipe (ceiling D's loop), in the same run: the latency this
	// machine gives a loop with no bookkeeping at all.
	d, err := e.newDB(ctx)
	if err != nil {
		return nil, err
	}
	defer e.drop(context.Background(), d)
	if err := d.createSlots(ctx, "relay", "bare"); err != nil {
		return nil, err
	}
	if err := e.bareLatency(ctx, d, o, f, "latency: bare pipe (D's loop)", "bare", "LATD", "latd", func(ctx context.Context, n int) error {
		return e.barePipe(ctx, d, "bare", "LATD", "latd", n)
	}); err != nil {
		return nil, err
	}

	// D's loop again, every event a fast batch of its own: the server's share of fast mode's
	// latency (an event that finds hardly anything in flight goes out so). Its slot is created
	// now; the relay's holds these events too.
	if err := d.createSlots(ctx, "bare_fast"); err != nil {
		return nil, err
	}
	if err := e.bareLatency(ctx, d, o, f, "latency: bare pipe, a fast batch per event", "bare_fast", "LATDF", "latdf", func(ctx context.Context, n int) error {
		return e.barePipeFastEach(ctx, d, "bare_fast", "latdf", n)
	}); err != nil {
		return nil, err
	}
	total := 2 * o.rate * int(o.latencyDuration/time.Second)

	if _, err := e.newStream(ctx, "LAT", "lat"); err != nil {
		return nil, err
	}
	defer e.js.DeleteStream(context.Background(), "LAT")
	p, err := e.startRelay(d, "relay", "LAT", "lat", o.profileEnv("latency", rep)...)
	if err != nil {
		return nil, err
	}
	defer p.stop() //nolint:errcheck
	if err := d.waitSlotActive(ctx, "relay", p); err != nil {
		return nil, err
	}
	// The relay's slot also holds the bare pipe's events: wait until they are through.
	if _, err := e.waitMsgs(ctx, "LAT", uint64(total), time.Minute); err != nil {
		return nil, err
	}
	if err := e.relayLatency(ctx, d, p, "LAT", o, f, "latency"); err != nil {
		return nil, err
	}

	// --publish atomic and fast, and -relay-b, each on a slot created now: no backlog to drain
	// first.
	if err := e.slotLatency(ctx, d, o, f, e.relayBin, "latency atomic", "relay_atomic", "LATA", "lata",
		[]string{"--publish", "atomic"}, o.profileEnv("latency-atomic", rep)...); err != nil {
		return nil, err
	}
	if err := e.slotLatency(ctx, d, o, f, e.relayBin, "latency fast", "relay_fast", "LATF", "latf",
		[]string{"--publish", "fast"}, o.profileEnv("latency-fast", rep)...); err != nil {
		return nil, err
	}
	if o.relayB == "" {
		return f, nil
	}
	if err := e.slotLatency(ctx, d, o, f, o.relayB, "latency B", "relay_b", "LATB", "latb", nil); err != nil {
		return nil, err
	}
	return f, nil
}

// slotLatency starts relay binary bin (with args) on a slot created now (no backlog to drain
// first) publishing to a new stream, and adds its latency figures under label.
func (e *env) slotLatency(ctx context.Context, d *db, o opts, f figures, bin, label, slot, stream, prefix string, args []string, environ ...string) error {
	if err := d.createSlots(ctx, slot); err != nil {
		return err
	}
	if _, err := e.newStream(ctx, stream, prefix); err != nil {
		return err
	}
	defer e.js.DeleteStream(context.Background(), stream)
	p, err := e.startRelayBin(bin, d, append([]string{"--slot", slot, "--stream", stream, "--subject-prefix", prefix}, args...), environ...)
	if err != nil {
		return err
	}
	defer p.stop() //nolint:errcheck
	if err := d.waitSlotActive(ctx, slot, p); err != nil {
		return err
	}
	return e.relayLatency(ctx, d, p, stream, o, f, label)
}

// bareLatency runs the latency harness against a bare pipe, pipe(ctx, n) draining the n events
// from slot into stream (subjects under prefix), and adds its figures under label.
func (e *env) bareLatency(ctx context.Context, d *db, o opts, f figures, label, slot, stream, prefix string, pipe func(ctx context.Context, n int) error) error {
	if _, err := e.newStream(ctx, stream, prefix); err != nil {
		return err
	}
	defer e.js.DeleteStream(context.Background(), stream)
	bctx, stop := context.WithCancel(ctx)
	defer stop()
	bare := make(chan error, 1)
	go func() { bare <- pipe(bctx, o.rate*int(o.latencyDuration/time.Second)) }()
	if err := d.waitSlotActive(ctx, slot, nil); err != nil {
		return err
	}
	lat, pub, err := e.latencyRun(ctx, d, stream, o.rate, o.latencyDuration)
	if err != nil {
		return err
	}
	select {
	case err = <-bare:
	case <-time.After(30 * time.Second):
		err = fmt.Errorf("%s: the pipe had not finished 30 s after the last event arrived", label)
	}
	if err != nil {
		return err
	}
	latencyFigures(f, label, lat, true)
	latencyFigures(f, label+", published", pub, true)
	return nil
}

// relayLatency runs the latency harness against the running relay p publishing to stream,
// stops p and adds its figures under label ("latency", "latency B").
func (e *env) relayLatency(ctx context.Context, d *db, p *relayProc, stream string, o opts, f figures, label string) error {
	cpu0 := procCPU(p.cmd.Process.Pid)
	lat, pub, err := e.latencyRun(ctx, d, stream, o.rate, o.latencyDuration)
	if err != nil {
		return err
	}
	f[label+": relay CPU s per 100k events during the run"] = (procCPU(p.cmd.Process.Pid) - cpu0).Seconds() * 100000 / float64(len(lat))
	u, err := p.stop()
	if err != nil {
		return err
	}
	latencyFigures(f, label+": relay", lat, true)
	latencyFigures(f, label+": relay, published", pub, true)
	// Against the bare pipe of the same repeat (the targets: p99 at most 1.5 x, p50 at most
	// 1 ms more).
	f[label+": relay p99 / bare pipe p99"] = f[label+": relay p99 ms"] / f["latency: bare pipe (D's loop) p99 ms"]
	f[label+": relay p50 - bare pipe p50, ms"] = f[label+": relay p50 ms"] - f["latency: bare pipe (D's loop) p50 ms"]
	addUsage(f, label+":", u, len(lat))
	return nil
}

// runBigTx: one transaction of o.bigEvents events, committed while the relay runs; time from
// the commit returning until the stream holds every event, and the relay's peak RSS.
func (e *env) runBigTx(ctx context.Context, o opts, _ int) (figures, error) {
	d, err := e.newDB(ctx)
	if err != nil {
		return nil, err
	}
	defer e.drop(context.Background(), d)
	if err := d.createSlots(ctx, "relay"); err != nil {
		return nil, err
	}
	for _, mode := range batchModes {
		if err := d.createSlots(ctx, "relay_"+mode); err != nil {
			return nil, err
		}
	}
	if _, err := e.newStream(ctx, "BIG", "big"); err != nil {
		return nil, err
	}
	defer e.js.DeleteStream(context.Background(), "BIG")
	p, err := e.startRelay(d, "relay", "BIG", "big")
	if err != nil {
		return nil, err
	}
	defer p.stop() //nolint:errcheck
	if err := d.waitSlotActive(ctx, "relay", p); err != nil {
		return nil, err
	}
	if err := d.insert(ctx, o.bigEvents, o.bigEvents, o.payload); err != nil {
		return nil, err
	}
	committed := time.Now()
	end, err := e.waitMsgs(ctx, "BIG", uint64(o.bigEvents), 10*time.Minute)
	if err != nil {
		return nil, err
	}
	u, err := p.stop()
	if err != nil {
		return nil, err
	}
	el := end.Sub(committed).Seconds()
	f := figures{
		"big-tx: commit to last ack, s": el,
		"big-tx: events/s":              float64(o.bigEvents) / el,
	}
	addUsage(f, "big-tx:", u, o.bigEvents)
	// The other modes drain the same transaction afterwards, each from a slot of its own
	// created before the commit: their peak RSS with the whole transaction waiting.
	for _, mode := range batchModes {
		rate, u, err := e.relayDrain(ctx, e.relayBin, d, "relay_"+mode, "BIG_"+strings.ToUpper(mode), "big"+mode, o.bigEvents, nil, "--publish", mode)
		if err != nil {
			return nil, fmt.Errorf("big-tx %s: %w", mode, err)
		}
		f["big-tx "+mode+": drain, events/s"] = rate
		addUsage(f, "big-tx "+mode+":", u, o.bigEvents)
	}
	return f, nil
}

// runPolling measures the polling baseline: drain of o.events pre-committed events, latency
// at o.rate events/s, and statements/s on an idle outbox; and the relay's statements/s on an
// idle outbox for comparison.
func (e *env) runPolling(ctx context.Context, o opts, _ int) (figures, error) {
	f := figures{}
	// Drain.
	d, err := e.newDB(ctx)
	if err != nil {
		return nil, err
	}
	defer e.drop(context.Background(), d)
	if _, err := d.pool.Exec(ctx, pollingSchema); err != nil {
		return nil, err
	}
	if err := d.insert(ctx, o.events, 100, o.payload); err != nil {
		return nil, err
	}
	if _, err := d.pool.Exec(ctx, "VACUUM ANALYZE outbox"); err != nil {
		return nil, err
	}
	if _, err := e.newStream(ctx, "POLL", "poll"); err != nil {
		return nil, err
	}
	defer e.js.DeleteStream(context.Background(), "POLL")
	pl, err := newPoller(d.pool, e.nc, "poll")
	if err != nil {
		return nil, err
	}
	pctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- pl.run(pctx) }()
	end, werr := e.waitMsgs(ctx, "POLL", uint64(o.events), 5*time.Minute)
	stop()
	if err := <-done; err != nil {
		return nil, err
	}
	if werr != nil {
		return nil, werr
	}
	f["polling: drain, events/s"] = float64(o.events) / end.Sub(start).Seconds()

	// Idle: the table is now fully published.
	pctx, stop = context.WithCancel(ctx)
	go func() { done <- pl.run(pctx) }()
	time.Sleep(500 * time.Millisecond)
	s0, t0 := pl.statements.Load(), time.Now()
	time.Sleep(o.idleDuration)
	f["polling: idle outbox, statements/s"] = float64(pl.statements.Load()-s0) / time.Since(t0).Seconds()

	// Latency, with the poller still running.
	lat, _, err := e.latencyRun(ctx, d, "POLL", o.rate, o.latencyDuration)
	stop()
	if err2 := <-done; err == nil {
		err = err2
	}
	if err != nil {
		return nil, err
	}
	latencyFigures(f, "polling: latency", lat, false)

	// The relay on an idle outbox: SQL transactions it causes in its database.
	if err := d.createSlots(ctx, "relay"); err != nil {
		return nil, err
	}
	if _, err := e.newStream(ctx, "IDLE", "idle"); err != nil {
		return nil, err
	}
	defer e.js.DeleteStream(context.Background(), "IDLE")
	d.pool.Reset()
	p, err := e.startRelay(d, "relay", "IDLE", "idle")
	if err != nil {
		return nil, err
	}
	defer p.stop() //nolint:errcheck
	if err := d.waitSlotActive(ctx, "relay", p); err != nil {
		return nil, err
	}
	time.Sleep(time.Second)
	x0, err := e.xacts(ctx, d.name)
	if err != nil {
		return nil, err
	}
	t0 = time.Now()
	time.Sleep(o.idleDuration)
	time.Sleep(time.Second) // statistics are flushed about once a second
	x1, err := e.xacts(ctx, d.name)
	if err != nil {
		return nil, err
	}
	f["relay: idle outbox, SQL transactions/s"] = float64(x1-x0) / time.Since(t0).Seconds()
	if _, err := p.stop(); err != nil {
		return nil, err
	}
	return f, nil
}

// xacts returns committed plus rolled back transactions of database name, read from another
// database so the reading does not count.
func (e *env) xacts(ctx context.Context, name string) (int64, error) {
	admin, err := pgxpool.New(ctx, e.cluster.URL("postgres"))
	if err != nil {
		return 0, err
	}
	defer admin.Close()
	var n int64
	err = admin.QueryRow(ctx, `SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1`, name).Scan(&n)
	return n, err
}

func (o opts) profileEnv(scenario string, rep int) []string {
	if o.profileDir == "" || rep != 0 {
		return nil
	}
	return []string{
		"OUTBOX_RELAY_CPUPROFILE=" + filepath.Join(o.profileDir, scenario+"-cpu.pprof"),
		"OUTBOX_RELAY_MEMPROFILE=" + filepath.Join(o.profileDir, scenario+"-allocs.pprof"),
	}
}
