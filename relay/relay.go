package relay

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/internal/redact"
	"github.com/outbox-relay/outbox-relay/replication"
)

// Option adjusts how Run runs (not what it relays: that is Config).
type Option func(*options)

type options struct {
	log       zerolog.Logger
	reg       *prometheus.Registry
	natsHint  func(error) string
	onSession func(*Session)
}

// WithLogger logs to log (default: nothing).
func WithLogger(log zerolog.Logger) Option { return func(o *options) { o.log = log } }

// WithRegistry registers the relay's metrics in reg, which Config.HTTPAddr then serves (default:
// a registry of the relay's own, with the Go and process collectors).
func WithRegistry(reg *prometheus.Registry) Option { return func(o *options) { o.reg = reg } }

// WithNATSConnectHint explains a failed NATS connection in the caller's terms (a command names
// its flags); "" for no hint.
func WithNATSConnectHint(hint func(error) string) Option {
	return func(o *options) { o.natsHint = hint }
}

// OnSession is called with each replication session before it runs: a test (or a supervisor)
// can follow its lifecycle (Streaming, Done, Err).
func OnSession(f func(*Session)) Option { return func(o *options) { o.onSession = f } }

func newOptions(opts []Option) options {
	o := options{log: zerolog.Nop()}
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

// fatalError marks errors that reconnecting cannot fix.
type fatalError struct{ error }

func (e fatalError) Unwrap() error { return e.error }

// IsFatal reports whether err is one that reconnecting cannot fix (Run returns those).
func IsFatal(err error) bool {
	var f fatalError
	return errors.As(err, &f) ||
		errors.Is(err, replication.ErrSlotInvalidated) ||
		errors.Is(err, replication.ErrPublicationMissing) ||
		errors.Is(err, replication.ErrSlotMissing) ||
		errors.As(err, new(*decoder.PoisonError))
}

// Run checks Postgres and JetStream (Preflight), then runs replication sessions until ctx ends
// (nil) or a fatal error; each session reconnects to Postgres and resumes from the highest
// position confirmed so far.
func Run(ctx context.Context, cfg Config, opts ...Option) error {
	o := newOptions(opts)
	cfg, err := cfg.resolve()
	if err != nil {
		return err
	}
	cfg.natsHintFn = o.natsHint
	log := o.log.With().Str("slot", cfg.Slot).Logger()
	obs := newObserver(cfg.streamNames(), cfg.tableNames(), cfg.tableFeeds(), log, o.reg)
	cfg.obs = obs
	var httpLn net.Listener
	if cfg.HTTPAddr != "" && cfg.HTTPAddr != "off" {
		// Bound first: a taken port must stop the relay before it creates a slot.
		ln, err := listenHTTP(cfg.HTTPAddr)
		if err != nil {
			return err
		}
		httpLn = ln
		defer func() {
			if httpLn != nil {
				httpLn.Close()
			}
		}()
	}
	b, err := preflight(ctx, cfg, log, natsLogHandlers(log)...)
	if err != nil {
		return err
	}
	defer b.nc.Close()
	obs.nc.Store(b.nc)
	if httpLn != nil {
		stopHTTP := obs.serveHTTP(httpLn)
		httpLn = nil // closed by stopHTTP
		defer stopHTTP()
	}
	wctx, stopWatch := context.WithCancel(ctx)
	watched := make(chan struct{})
	go func() { defer close(watched); obs.watch(wctx, cfg) }()
	defer func() { stopWatch(); <-watched }()

	// An operator-chosen start (Config.StartLSN, checked by preflight) is where the first
	// session starts unless the slot is already further.
	resume := resumePoint{lsn: cfg.StartLSN}
	if resume.lsn != 0 {
		log.Warn().Stringer("lsn", resume).Msg("Config.StartLSN: events committed between the slot's confirmed position and this one are skipped")
	}
	rc := reconnect{cfg: cfg, log: log, obs: obs, wait: cfg.ReconnectMin}
	for {
		s := newSession(cfg, b.js, resume, log)
		if o.onSession != nil {
			o.onSession(s)
		}
		started := time.Now()
		err := s.Run(ctx)
		resume = s.resume
		if ctx.Err() != nil {
			if err != nil && !errors.Is(err, context.Canceled) {
				log.Warn().Err(err).Msg("error during shutdown")
			}
			log.Info().Stringer("lsn", resume).Msg("stopped")
			return nil
		}
		if err == nil {
			err = errors.New("replication session ended")
		}
		if IsFatal(err) {
			return err
		}
		if !rc.pause(ctx, err, started, resume) {
			return nil
		}
	}
}

// Preflight runs the checks Run starts with, Postgres and NATS alike, and returns a
// *PreflightError listing every problem with its fix (warnings are logged). When nothing is
// wrong it creates the slot if cfg.CreateSlot asks for it, as Run does.
func Preflight(ctx context.Context, cfg Config, opts ...Option) error {
	o := newOptions(opts)
	cfg, err := cfg.resolve()
	if err != nil {
		return err
	}
	cfg.natsHintFn = o.natsHint
	b, err := preflight(ctx, cfg, o.log)
	if err != nil {
		return err
	}
	b.nc.Close()
	return nil
}

// reconnect paces the sessions: a standby polls for the slot, a failed session is retried
// with an exponential backoff.
type reconnect struct {
	cfg                         Config
	log                         zerolog.Logger
	obs                         *observer
	wait                        time.Duration
	standbySince, standbyLogged time.Time
}

// pause waits before the next session after one that ended with err; false: ctx ended.
func (r *reconnect) pause(ctx context.Context, err error, started time.Time, resume resumePoint) bool {
	if r.cfg.Standby && errors.Is(err, replication.ErrSlotInUse) {
		// Another relay holds the slot: poll until it is released, logging once a minute.
		r.obs.standingBy.Store(true)
		if r.standbySince.IsZero() {
			r.standbySince = time.Now()
		}
		if time.Since(r.standbyLogged) >= time.Minute {
			r.standbyLogged = time.Now()
			r.log.Info().Dur("waiting", time.Since(r.standbySince).Round(time.Second)).
				Msg("standing by: another relay holds the slot; taking over when it is released")
		}
		return sleep(ctx, r.cfg.StandbyPoll)
	}
	if !r.standbySince.IsZero() {
		r.standbySince, r.standbyLogged = time.Time{}, time.Time{}
		r.obs.standingBy.Store(false)
	}
	r.obs.reconnected()
	if time.Since(started) > time.Minute {
		r.wait = r.cfg.ReconnectMin
	}
	r.log.Warn().Err(err).Stringer("lsn", resume).Dur("retry_in", r.wait).Msg("replication interrupted; reconnecting")
	if !sleep(ctx, r.wait) {
		return false
	}
	if r.wait *= 2; r.wait > r.cfg.ReconnectMax {
		r.wait = r.cfg.ReconnectMax
	}
	return true
}

// sleep waits d; false if ctx ended first.
func sleep(ctx context.Context, d time.Duration) bool {
	select {
	case <-time.After(d):
		return true
	case <-ctx.Done():
		return false
	}
}

// natsLogHandlers log the NATS connection's disconnects, reconnects and asynchronous errors.
func natsLogHandlers(log zerolog.Logger) []nats.Option {
	return []nats.Option{
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn().Err(err).Msg("disconnected from NATS; reconnecting")
			}
		}),
		nats.ReconnectHandler(func(c *nats.Conn) {
			// Not ConnectedUrlRedacted: it shows a token (nats://token@host).
			log.Info().Str("url", redact.URL(c.ConnectedUrl())).Msg("reconnected to NATS")
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			// Asynchronous errors: permission violations, slow consumers (a reply dropped:
			// its publish times out and is re-published).
			ev := log.Warn().Err(err)
			if sub != nil {
				ev = ev.Str("subscription", sub.Subject)
			}
			ev.Msg("NATS reported an error")
		}),
	}
}

// natsHint is the caller's hint for a failed NATS connection, or "".
func (c Config) natsHint(err error) string {
	if c.natsHintFn == nil {
		return ""
	}
	return c.natsHintFn(err)
}

// ConnectPG opens a normal (non-replication) connection for queries, named outbox-relay in
// pg_stat_activity unless the URL sets application_name.
func ConnectPG(ctx context.Context, url string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return nil, &ConfigError{fmt.Errorf("parse Config.PGURL %s: %w", redact.URL(url), redact.Echoed(err, url))}
	}
	if cfg.RuntimeParams["application_name"] == "" {
		cfg.RuntimeParams["application_name"] = "outbox-relay"
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to Postgres at %s:%d: %w", cfg.Host, cfg.Port, err)
	}
	return conn, nil
}
