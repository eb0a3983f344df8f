package relay

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
)

// observer holds the relay's metrics, readiness and stall state. Every method is safe on a nil
// observer (no metrics), and safe for concurrent use.
type observer struct {
	reg     *prometheus.Registry
	streams []string // the relay's streams (Config.feeds)
	log     zerolog.Logger

	// Per table (index of Config.tables): the event metrics.
	ackLatency    []prometheus.Observer
	commitLatency []prometheus.Observer
	lastEvent     []prometheus.Gauge
	storedN       []atomic.Uint64 // events of the table JetStream stored, duplicates included
	reconnects    prometheus.Counter
	slotLag       prometheus.Gauge
	slotSafeWAL   prometheus.Gauge
	stalledGauge  prometheus.Gauge

	recordFailures prometheus.Counter
	recorders      atomic.Pointer[[]*checkpoint.Recorder] // the session's, one per stream; nil without records

	serverWALEnd atomic.Uint64
	replicating  atomic.Bool
	standingBy   atomic.Bool  // a Config.Standby relay waiting while another holds the slot
	stalled      atomic.Value // string: what is stuck, "" when not stalled
	nc           atomic.Pointer[nats.Conn]

	mu   sync.Mutex
	prev []sink.Stats // per stream: counters of ended sessions
	pubs []*sink.Publisher
	trk  *checkpoint.Tracker
	// times of each table's events published and not yet stored, oldest first (the sink
	// confirms in publish order, except after a retry where an event stored out of turn is
	// attributed the time of the table's oldest one: the histograms are approximate under
	// retries).
	times [][]eventTimes
}

type eventTimes struct{ published, committed time.Time }

// newObserver registers the metrics in reg; nil: a registry of its own, with the Go and
// process collectors. streams are the relay's streams, the stream label of the sink metrics;
// tables are the outbox tables (schema.name), the table label of the event metrics, and
// tableStream the index in streams of each table's stream.
func newObserver(streams, tables []string, tableStream []int, log zerolog.Logger, reg *prometheus.Registry) *observer {
	own := reg == nil
	if own {
		reg = prometheus.NewRegistry()
	}
	o := &observer{reg: reg, streams: streams, log: log, times: make([][]eventTimes, len(tables)), storedN: make([]atomic.Uint64, len(tables)),
		prev: make([]sink.Stats, len(streams))}
	o.stalled.Store("")
	f := promauto.With(o.reg)
	ackLatency := f.NewHistogramVec(prometheus.HistogramOpts{Name: "outbox_relay_publish_ack_seconds",
		Help: "Time from publishing an event to JetStream's acknowledgement, retries included.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}, []string{"table"})
	commitLatency := f.NewHistogramVec(prometheus.HistogramOpts{Name: "outbox_relay_commit_to_ack_seconds",
		Help: "Time from the transaction's commit in Postgres to JetStream's acknowledgement of its event.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 18)}, []string{"table"})
	lastEvent := f.NewGaugeVec(prometheus.GaugeOpts{Name: "outbox_relay_last_event_timestamp_seconds",
		Help: "Unix time at which JetStream last stored an event of the table."}, []string{"table"})
	for i, t := range tables {
		stored := &o.storedN[i]
		f.NewCounterFunc(prometheus.CounterOpts{Name: "outbox_relay_events_published_total", ConstLabels: prometheus.Labels{"stream": streams[tableStream[i]], "table": t},
			Help: "Events of the table stored by JetStream (acknowledged), duplicates included."}, func() float64 { return float64(stored.Load()) })
		o.ackLatency = append(o.ackLatency, ackLatency.WithLabelValues(t))
		o.commitLatency = append(o.commitLatency, commitLatency.WithLabelValues(t))
		o.lastEvent = append(o.lastEvent, lastEvent.WithLabelValues(t))
	}
	for i, stream := range streams {
		labels := prometheus.Labels{"stream": stream}
		stats := func(pick func(sink.Stats) uint64) func() float64 {
			return func() float64 { return float64(pick(o.stats(i))) }
		}
		f.NewCounterFunc(prometheus.CounterOpts{Name: "outbox_relay_events_duplicate_total", ConstLabels: labels,
			Help: "Acknowledgements JetStream marked duplicate (an event re-sent within the duplicate window)."}, stats(func(s sink.Stats) uint64 { return s.Duplicates }))
		f.NewCounterFunc(prometheus.CounterOpts{Name: "outbox_relay_publish_errors_total", ConstLabels: labels,
			Help: "Failed publish attempts (each is retried)."}, stats(func(s sink.Stats) uint64 { return s.Errors }))
		f.NewCounterFunc(prometheus.CounterOpts{Name: "outbox_relay_stream_full_total", ConstLabels: labels,
			Help: "Publishes the stream refused at a limit with discard: new (the relay retries; nothing after them is confirmed)."}, stats(func(s sink.Stats) uint64 { return s.StreamFull }))
		f.NewCounterFunc(prometheus.CounterOpts{Name: "outbox_relay_publish_retries_total", ConstLabels: labels,
			Help: "Events re-published after a failure."}, stats(func(s sink.Stats) uint64 { return s.Retries }))
	}
	f.NewGaugeFunc(prometheus.GaugeOpts{Name: "outbox_relay_events_in_flight",
		Help: "Events received from Postgres and not yet stored by JetStream."}, func() float64 {
		o.mu.Lock()
		defer o.mu.Unlock()
		if o.trk == nil {
			return 0
		}
		return float64(o.trk.Pending())
	})
	f.NewGaugeFunc(prometheus.GaugeOpts{Name: "outbox_relay_bytes_in_flight",
		Help: "Bytes of messages published and not yet acknowledged by JetStream (bounded by --max-in-flight-bytes)."}, func() float64 {
		o.mu.Lock()
		defer o.mu.Unlock()
		var n int64
		for _, pub := range o.pubs {
			n += pub.InFlightBytes()
		}
		return float64(n)
	})
	f.NewGaugeFunc(prometheus.GaugeOpts{Name: "outbox_relay_acked_lsn",
		Help: "WAL position up to which every event is stored by JetStream (what the relay confirms to Postgres), as a number."}, func() float64 {
		return float64(o.ackedLSN())
	})
	f.NewGaugeFunc(prometheus.GaugeOpts{Name: "outbox_relay_server_wal_end_lsn",
		Help: "Server WAL end reported by the last Postgres keepalive, as a number."}, func() float64 {
		return float64(o.serverWALEnd.Load())
	})
	o.slotLag = f.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_slot_lag_bytes",
		Help: "pg_current_wal_lsn() - confirmed_flush_lsn of the slot: WAL Postgres keeps for the relay (polled)."})
	o.slotSafeWAL = f.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_slot_safe_wal_size_bytes",
		Help: "safe_wal_size of the slot: WAL that may still be written before the slot is invalidated; -1 when max_slot_wal_keep_size is unlimited (polled)."})
	o.reconnects = f.NewCounter(prometheus.CounterOpts{Name: "outbox_relay_replication_reconnects_total",
		Help: "Replication sessions that ended with an error and were started again."})
	o.stalledGauge = f.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_stalled",
		Help: "1 while the relay is stalled (events pending and nothing acknowledged for --stall-timeout, or no replication session for --stall-timeout)."})
	f.NewGaugeFunc(prometheus.GaugeOpts{Name: "outbox_relay_replicating",
		Help: "1 while a replication session is streaming from the slot."}, func() float64 { return b2f(o.replicating.Load()) })
	f.NewGaugeFunc(prometheus.GaugeOpts{Name: "outbox_relay_nats_connected",
		Help: "1 while the NATS connection is up."}, func() float64 {
		nc := o.nc.Load()
		return b2f(nc != nil && nc.IsConnected())
	})
	f.NewGaugeFunc(prometheus.GaugeOpts{Name: "outbox_relay_recorded_lsn",
		Help: "Position held by the relay's position record (the most it may confirm to Postgres), as a number; 0 without a record."}, func() float64 {
		rs := o.recorders.Load()
		if rs == nil || len(*rs) == 0 {
			return 0
		}
		lo := (*rs)[0].Recorded()
		for _, r := range (*rs)[1:] {
			lo = min(lo, r.Recorded())
		}
		return float64(lo)
	})
	o.recordFailures = f.NewCounter(prometheus.CounterOpts{Name: "outbox_relay_position_record_failures_total",
		Help: "Failed writes of the position record (retried; meanwhile nothing newer is confirmed to Postgres)."})
	if own {
		o.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	return o
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// stats are the sink counters of stream i (index of o.streams), over the sessions.
func (o *observer) stats(i int) sink.Stats {
	o.mu.Lock()
	s := o.prev[i]
	var pub *sink.Publisher
	if o.pubs != nil {
		pub = o.pubs[i]
	}
	o.mu.Unlock()
	if pub != nil {
		addStats(&s, pub.Stats())
	}
	return s
}

// addStats adds the counters the metrics export of a session's sink, c, to s.
func addStats(s *sink.Stats, c sink.Stats) {
	s.Published += c.Published
	s.Duplicates += c.Duplicates
	s.Errors += c.Errors
	s.Retries += c.Retries
	s.StreamFull += c.StreamFull
}

// storedTotal is the number of events JetStream stored, of every table.
func (o *observer) storedTotal() uint64 {
	var n uint64
	for i := range o.storedN {
		n += o.storedN[i].Load()
	}
	return n
}

func (o *observer) ackedLSN() pglogrepl.LSN {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.trk == nil {
		return 0
	}
	lsn, _ := o.trk.Flushed()
	return lsn
}

// startSession is called once a session streams: its sinks (one per stream, in the order of
// o.streams) and tracker feed the metrics.
func (o *observer) startSession(pubs []*sink.Publisher, trk *checkpoint.Tracker) {
	if o == nil {
		return
	}
	o.mu.Lock()
	o.pubs, o.trk = pubs, trk
	o.clearTimes()
	o.mu.Unlock()
	o.standingBy.Store(false)
	o.replicating.Store(true)
}

// setRecorders publishes the session's position recorders, one per stream (none: no record).
func (o *observer) setRecorders(rs []*checkpoint.Recorder) {
	if o != nil {
		o.recorders.Store(&rs)
	}
}

// recordFailed counts a failed write of the position record.
func (o *observer) recordFailed() {
	if o != nil {
		o.recordFailures.Inc()
	}
}

// endSession folds the session's counters into the totals.
func (o *observer) endSession() {
	if o == nil {
		return
	}
	o.replicating.Store(false)
	o.mu.Lock()
	defer o.mu.Unlock()
	for i, pub := range o.pubs {
		addStats(&o.prev[i], pub.Stats())
	}
	o.pubs, o.trk = nil, nil
	o.clearTimes()
}

// clearTimes forgets the events in flight (o.mu held).
func (o *observer) clearTimes() {
	for i := range o.times {
		o.times[i] = o.times[i][:0]
	}
}

func (o *observer) reconnected() {
	if o != nil {
		o.reconnects.Inc()
	}
}

func (o *observer) keepalive(walEnd pglogrepl.LSN) {
	if o != nil {
		o.serverWALEnd.Store(uint64(walEnd))
	}
}

// publishing records an event of table about to be published; committed is its
// transaction's commit.
func (o *observer) publishing(table int, committed time.Time) {
	if o == nil {
		return
	}
	o.mu.Lock()
	o.times[table] = append(o.times[table], eventTimes{published: time.Now(), committed: committed})
	o.mu.Unlock()
}

// publishFailed takes back the last publishing call of table (the event was not published).
func (o *observer) publishFailed(table int) {
	if o == nil {
		return
	}
	o.mu.Lock()
	if n := len(o.times[table]); n > 0 {
		o.times[table] = o.times[table][:n-1]
	}
	o.mu.Unlock()
}

// stored records that JetStream stored the oldest event of table in flight.
func (o *observer) stored(table int) {
	if o == nil {
		return
	}
	now := time.Now()
	o.mu.Lock()
	var et eventTimes
	if ts := o.times[table]; len(ts) > 0 {
		et = ts[0]
		o.times[table] = ts[1:]
		if len(ts) == 1 {
			o.times[table] = ts[:0:0]
		}
	}
	o.mu.Unlock()
	o.storedN[table].Add(1)
	if !et.published.IsZero() {
		o.ackLatency[table].Observe(now.Sub(et.published).Seconds())
	}
	if !et.committed.IsZero() {
		o.commitLatency[table].Observe(max(now.Sub(et.committed).Seconds(), 0))
	}
	o.lastEvent[table].Set(float64(now.UnixNano()) / 1e9)
}

// recordFailingReady: failed writes of the position record for this long turn /readyz to 503.
var recordFailingReady = 10 * time.Second

// ready says whether the relay is replicating with the broker connected and not stalled, and
// why not. With standbyOK, a Config.Standby relay standing by while another holds the slot (and
// connected to NATS) is ready too: what a Kubernetes readiness probe of an active/passive
// pair asks (see /readyz?standby=ok).
func (o *observer) ready(standbyOK bool) (bool, string) {
	var why []string
	if !o.replicating.Load() && !(standbyOK && o.standingBy.Load()) {
		why = append(why, "not replicating (connecting to Postgres, or standing by while another relay holds the slot)")
	}
	if nc := o.nc.Load(); nc == nil || !nc.IsConnected() {
		why = append(why, "not connected to NATS")
	}
	if s, _ := o.stalled.Load().(string); s != "" {
		why = append(why, "stalled: "+s)
	}
	if rs := o.recorders.Load(); rs != nil {
		for _, r := range *rs {
			if d := r.FailingFor(); d >= recordFailingReady {
				why = append(why, fmt.Sprintf("the position record cannot be written (for %s): nothing newer is confirmed to Postgres", d.Round(time.Second)))
				break
			}
		}
	}
	return len(why) == 0, strings.Join(why, "; ")
}

// serveHTTP serves /metrics, /healthz and /readyz on ln (see listenHTTP) until stop is
// called; the address is logged.
func (o *observer) serveHTTP(ln net.Listener) (stop func()) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(o.reg, promhttp.HandlerOpts{Registry: o.reg}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		ok, why := o.ready(r.URL.Query().Get("standby") == "ok")
		if !ok {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, why)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	srv := newHTTPServer(mux)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			o.log.Error().Err(err).Msg("http server stopped")
		}
	}()
	o.log.Info().Str("addr", ln.Addr().String()).Msg("serving /metrics, /healthz and /readyz")
	return func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		<-done
	}
}

// watch polls the slot for the lag gauges and detects stalls, until ctx ends.
func (o *observer) watch(ctx context.Context, cfg Config) {
	tick := min(cfg.StallTimeout/4, time.Second)
	if tick <= 0 {
		tick = time.Second
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	var (
		lastLSN      pglogrepl.LSN
		lastStored   uint64
		lastProgress = time.Now()
		lastPoll     time.Time
		idleSince    = time.Now()
	)
	for first := true; ; first = false {
		if first {
			lastPoll = time.Now()
			o.pollSlot(ctx, cfg)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := time.Now()
		if now.Sub(lastPoll) >= cfg.SlotPollInterval {
			lastPoll = now
			o.pollSlot(ctx, cfg)
		}
		if cfg.StallTimeout <= 0 {
			continue
		}
		o.mu.Lock()
		trk := o.trk
		streams := o.waitingStreams()
		o.mu.Unlock()
		pending := 0
		if trk != nil {
			pending = trk.Pending()
		}
		lsn, stored := o.ackedLSN(), o.storedTotal()
		var stuck string
		switch {
		case !o.replicating.Load():
			if cfg.Standby {
				idleSince = now // waiting for the slot is the job of a standby
			}
			if now.Sub(idleSince) >= cfg.StallTimeout {
				stuck = fmt.Sprintf("no replication session for %s: the Postgres replication connection keeps failing (see the errors above)", now.Sub(idleSince).Round(time.Second))
			}
			lastProgress = now
		case pending == 0 || lsn != lastLSN || stored != lastStored:
			idleSince, lastProgress = now, now
		case now.Sub(lastProgress) >= cfg.StallTimeout:
			idleSince = now
			nc := o.nc.Load()
			broker := "NATS connected"
			if nc == nil || !nc.IsConnected() {
				broker = "NATS disconnected"
			}
			stuck = fmt.Sprintf("%d events waiting for JetStream acknowledgements for %s, acknowledged LSN stuck at %s (%s): check the NATS server, the stream %s and the publish errors above",
				pending, now.Sub(lastProgress).Round(time.Second), lsn, broker, streams)
		default:
			idleSince = now
		}
		lastLSN, lastStored = lsn, stored
		was, _ := o.stalled.Load().(string)
		switch {
		case stuck != "" && was == "":
			o.stalled.Store(stuck)
			o.stalledGauge.Set(1)
			o.log.Error().Str("stuck", stuck).Stringer("lsn", lsn).Int("pending", pending).Msg("relay stalled")
		case stuck != "":
			o.stalled.Store(stuck)
		case was != "":
			o.stalled.Store("")
			o.stalledGauge.Set(0)
			o.log.Info().Stringer("lsn", lsn).Msg("relay moving again")
		}
	}
}

// waitingStreams names the streams with events in flight (all of them when none has), for the
// stall message; o.mu is held.
func (o *observer) waitingStreams() string {
	var names []string
	for i, pub := range o.pubs {
		if pub.InFlight() > 0 {
			names = append(names, o.streams[i])
		}
	}
	if len(names) == 0 {
		names = o.streams
	}
	return strings.Join(names, ", ")
}

// pollSlot updates the slot gauges from pg_replication_slots.
func (o *observer) pollSlot(ctx context.Context, cfg Config) {
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := ConnectPG(pctx, cfg.PGURL)
	if err != nil {
		return // the session reports Postgres being unreachable
	}
	defer conn.Close(context.Background())
	s, err := replication.GetSlot(pctx, conn, cfg.Slot)
	if err != nil {
		return
	}
	o.slotLag.Set(float64(s.LagBytes))
	if s.SafeWALSize != nil {
		o.slotSafeWAL.Set(float64(*s.SafeWALSize))
	} else {
		o.slotSafeWAL.Set(-1)
	}
}
