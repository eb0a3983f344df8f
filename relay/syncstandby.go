package relay

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"
)

// standbyGate holds each transaction's events until a physical standby has flushed the
// transaction's commit (Config.SyncStandbySlot): a failover to that standby can then never
// un-commit an event consumers saw. Postgres 17 does this for logical slots with
// synchronized_standby_slots; this is the same rule for Postgres 15 and 16.
//
// The logical walsender decodes a commit only once the primary flushed all of it, so the
// primary's flush position read after a transaction's Begin arrived is at or past its commit.
// The gate counts Begins (request), reads the primary's flush position and the standby's
// (the physical slot's restart_lsn, which the standby's flush reports move), and releases
// every Begin counted before that read once the standby is there. One read serves every
// transaction that arrived before it; an idle outbox costs no query.
type standbyGate struct {
	pgURL string
	slot  string
	poll  time.Duration
	log   zerolog.Logger

	requested atomic.Uint64 // Begins counted (pipeline goroutine)
	released  atomic.Uint64 // Begins whose commit the standby has flushed
	wake      chan struct{}

	mu      sync.Mutex
	changed chan struct{} // closed when released moves
}

func newStandbyGate(pgURL, slot string, log zerolog.Logger) *standbyGate {
	return &standbyGate{pgURL: pgURL, slot: slot, poll: time.Millisecond, log: log.With().Str("sync_standby_slot", slot).Logger(),
		wake: make(chan struct{}, 1), changed: make(chan struct{})}
}

// request counts a Begin; its events may be published once released reaches the ticket.
func (g *standbyGate) request() uint64 {
	n := g.requested.Add(1)
	select {
	case g.wake <- struct{}{}:
	default:
	}
	return n
}

// passed reports whether the transaction of ticket n may be published.
func (g *standbyGate) passed(n uint64) bool { return g.released.Load() >= n }

// wait blocks until ticket n passed or ctx ends.
func (g *standbyGate) wait(ctx context.Context, n uint64) error {
	for {
		g.mu.Lock()
		ch := g.changed
		g.mu.Unlock()
		if g.passed(n) {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (g *standbyGate) release(n uint64) {
	g.released.Store(n)
	g.mu.Lock()
	close(g.changed)
	g.changed = make(chan struct{})
	g.mu.Unlock()
}

// errStandbySlotMissing: the Config.SyncStandbySlot slot does not exist on the server.
var errStandbySlotMissing = errors.New("sync standby slot not found")

// run serves requests until ctx ends or the connection fails.
func (g *standbyGate) run(ctx context.Context) error {
	conn, err := ConnectPG(ctx, g.pgURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if _, _, err := g.read(ctx, conn); err != nil {
		return err
	}
	for {
		select {
		case <-g.wake:
		case <-ctx.Done():
			return nil
		}
		n := g.requested.Load()
		if n <= g.released.Load() {
			continue
		}
		// Read after the Begins up to n arrived: the primary's flush covers their commits.
		primary, standby, err := g.read(ctx, conn)
		if err != nil {
			return err
		}
		waiting, warned := time.Now(), time.Now()
		poll := g.poll
		for standby < primary {
			if time.Since(warned) >= 10*time.Second {
				warned = time.Now()
				g.log.Warn().Stringer("primary_flush", primary).Stringer("standby_flush", standby).Dur("waiting", time.Since(waiting).Round(time.Second)).
					Msg("publishing paused: the standby has not flushed the next transaction's commit (is it running and streaming from this slot?)")
			}
			select {
			case <-time.After(poll):
			case <-ctx.Done():
				return nil
			}
			if poll < 50*time.Millisecond {
				poll *= 2
			}
			if _, standby, err = g.read(ctx, conn); err != nil {
				return err
			}
		}
		g.release(n)
	}
}

// read returns the primary's flush position and the standby slot's restart_lsn (0 while the
// standby never reported one).
func (g *standbyGate) read(ctx context.Context, conn *pgx.Conn) (primary, standby pglogrepl.LSN, err error) {
	var p, restart string
	var exists bool
	err = conn.QueryRow(ctx, `SELECT pg_current_wal_flush_lsn()::text, coalesce(s.restart_lsn, '0/0')::text, s.slot_name IS NOT NULL
		FROM (SELECT) AS one LEFT JOIN pg_replication_slots s ON s.slot_name = $1 AND s.slot_type = 'physical'`, g.slot).Scan(&p, &restart, &exists)
	if err != nil {
		return 0, 0, fmt.Errorf("read the standby's flush position: %w", err)
	}
	if !exists {
		return 0, 0, fatalError{fmt.Errorf("%w: no physical replication slot %q on the server. Create it for the standby (pg_basebackup -C -S %s, or SELECT pg_create_physical_replication_slot('%s')) and set primary_slot_name = '%s' on the standby",
			errStandbySlotMissing, g.slot, g.slot, g.slot, g.slot)}
	}
	if primary, err = pglogrepl.ParseLSN(p); err != nil {
		return 0, 0, err
	}
	standby, err = pglogrepl.ParseLSN(restart)
	return primary, standby, err
}
