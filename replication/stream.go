// Package replication owns the logical replication connection to Postgres: it starts
// replication on a pgoutput slot, hands every message to a Handler and tells Postgres which
// position the relay has made durable (the standby status update).
//
// One goroutine, the one running Stream.Run, reads and writes the connection: pgconn is not
// safe for a concurrent read and write (a status update written while a read deadline fires can
// corrupt the connection). Other goroutines only hand it a number: the Handler's Flushed
// position, which the loop reads and sends.
//
// Protocol reference: https://www.postgresql.org/docs/15/protocol-replication.html
package replication

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/internal/redact"
)

// Defaults for Config.
const (
	DefaultStatusInterval = 10 * time.Second
	DefaultFlushInterval  = 250 * time.Millisecond
	DefaultIdleTimeout    = 60 * time.Second
)

// Config of a replication stream.
type Config struct {
	// Slot is the logical replication slot (pgoutput) to read.
	Slot string
	// Publication is passed to pgoutput as publication_names.
	Publication string
	// Messages asks pgoutput for logical decoding messages (pg_logical_emit_message) too.
	Messages bool
	// StatusInterval is the longest time between two standby status updates (default 10s).
	// Postgres ends a connection that stays silent for wal_sender_timeout (default 60s).
	StatusInterval time.Duration
	// FlushInterval: once the flushed position moved, it is sent within this long (default
	// 250ms), which keeps the region Postgres re-sends after a crash small.
	FlushInterval time.Duration
	// IdleTimeout: when nothing at all arrives for this long the connection is probed with a
	// reply-requested status update, and declared dead after another IdleTimeout (default 60s).
	IdleTimeout time.Duration
}

func (c *Config) fill() {
	if c.StatusInterval <= 0 {
		c.StatusInterval = DefaultStatusInterval
	}
	if c.FlushInterval <= 0 {
		c.FlushInterval = DefaultFlushInterval
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = DefaultIdleTimeout
	}
}

// Handler consumes the replication stream. All methods are called from the goroutine running
// Stream.Run.
type Handler interface {
	// Ready reports whether the handler can take the next message without blocking.
	Ready() bool
	// Wait blocks until the handler can take the next message, or ctx ends. This is the
	// backpressure point: the loop keeps sending status updates while it waits.
	Wait(ctx context.Context) error
	// Handle processes one pgoutput message (XLogData.WALData). data is reused after it returns.
	Handle(ctx context.Context, data []byte) error
	// Keepalive reports a primary keepalive's server WAL end; an error ends Run.
	Keepalive(walEnd pglogrepl.LSN) error
}

// Sentinel errors for Postgres answers the caller branches on.
var (
	// ErrSlotInUse: another session holds the slot (SQLSTATE 55006).
	ErrSlotInUse = errors.New("replication slot is active in another session")
	// ErrSlotInvalidated: the slot can no longer be read (wal_status lost).
	ErrSlotInvalidated = errors.New("replication slot has been invalidated")
	// ErrPublicationMissing: the publication does not exist at the position being decoded.
	ErrPublicationMissing = errors.New("publication does not exist")
)

// Stream is one replication session on a slot.
type Stream struct {
	conn *pgconn.PgConn
	cfg  Config
	log  zerolog.Logger

	lastSent   pglogrepl.LSN
	lastSentAt time.Time
}

// Connect opens a replication connection (replication=database) from a libpq URL or DSN.
// DateStyle and TimeZone are pinned so timestamps decode the same way on every server.
func Connect(ctx context.Context, connString string) (*pgconn.PgConn, error) {
	cfg, err := pgconn.ParseConfig(connString)
	if err != nil {
		// pgconn echoes the connection string, masking only the password forms it knows.
		return nil, fmt.Errorf("parse Config.PGURL: %w", redact.Echoed(err, connString))
	}
	cfg.RuntimeParams["replication"] = "database"
	cfg.RuntimeParams["DateStyle"] = "ISO, MDY"
	cfg.RuntimeParams["TimeZone"] = "UTC"
	cfg.RuntimeParams["bytea_output"] = "hex"
	if cfg.RuntimeParams["application_name"] == "" {
		cfg.RuntimeParams["application_name"] = "outbox-relay"
	}
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open replication connection to %s:%d: %w", cfg.Host, cfg.Port, err)
	}
	return conn, nil
}

// Start starts streaming from slot at start. start must be the slot's confirmed_flush_lsn or
// a position the relay itself confirmed (never IDENTIFY_SYSTEM's XLogPos, which would skip
// committed transactions).
func Start(ctx context.Context, conn *pgconn.PgConn, cfg Config, start pglogrepl.LSN, log zerolog.Logger) (*Stream, error) {
	cfg.fill()
	args := []string{"proto_version '1'", fmt.Sprintf("publication_names '%s'", quoteLiteral(cfg.Publication))}
	if cfg.Messages {
		args = append(args, "messages 'true'")
	}
	if err := pglogrepl.StartReplication(ctx, conn, cfg.Slot, start, pglogrepl.StartReplicationOptions{PluginArgs: args}); err != nil {
		return nil, fmt.Errorf("start replication on slot %q at %s: %w", cfg.Slot, start, classify(err))
	}
	s := &Stream{conn: conn, cfg: cfg, log: log.With().Str("component", "replication").Str("slot", cfg.Slot).Logger(), lastSent: start}
	s.log.Info().Stringer("lsn", start).Msg("replication started")
	return s, nil
}

func quoteLiteral(s string) string {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		if s[i] == '\'' {
			out = append(out, '\'')
		}
		out = append(out, s[i])
	}
	return string(out)
}

// classify maps server errors to the package's sentinels, keeping the original text.
func classify(err error) error {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return err
	}
	switch {
	case pgErr.Code == "55006":
		return fmt.Errorf("%w: %w", ErrSlotInUse, err)
	case pgErr.Code == "55000" && pgErr.Detail != "":
		return fmt.Errorf("%w: %w (%s)", ErrSlotInvalidated, err, pgErr.Detail)
	case pgErr.Code == "42704" && containsFold(pgErr.Message, "publication"):
		return fmt.Errorf("%w: %w (%s)", ErrPublicationMissing, err, pgErr.Where)
	}
	return err
}

func containsFold(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}

// Run reads the stream until ctx ends (returns nil) or the connection fails. It sends a standby
// status update at least every StatusInterval, within FlushInterval after the flushed position
// moved, and at once when Postgres asks for one; the position sent is always flush.Flushed(),
// as write, flush and apply alike.
func (s *Stream) Run(ctx context.Context, h Handler, flush checkpoint.FlushSource) error {
	var (
		reply   bool
		lastMsg = time.Now()
		probed  time.Time
	)
	// Reads use the socket's deadline, not a context: pgconn watches a context with a timer
	// and a goroutine hand-off per call, which costs more than decoding a message. A timeout
	// leaves the connection usable. Cancellation of ctx is noticed at the next wake-up.
	netConn := s.conn.Conn()
	defer netConn.SetReadDeadline(time.Time{})
	for {
		if ctx.Err() != nil {
			return nil
		}
		now := time.Now()
		flushed, _ := flush.Flushed()
		if reply || now.Sub(s.lastSentAt) >= s.cfg.StatusInterval ||
			(flushed > s.lastSent && now.Sub(s.lastSentAt) >= s.cfg.FlushInterval) {
			if err := s.sendStatus(ctx, flushed, false); err != nil {
				return err
			}
			reply = false
		}
		if idle := now.Sub(lastMsg); idle >= s.cfg.IdleTimeout {
			if probed.IsZero() {
				if err := s.sendStatus(ctx, flushed, true); err != nil {
					return err
				}
				probed = now
			} else if now.Sub(probed) >= s.cfg.IdleTimeout {
				return fmt.Errorf("no message from Postgres for %s, not even an answer to a reply-requested status update: connection presumed dead", idle.Round(time.Second))
			}
		}
		wake := now.Add(s.cfg.FlushInterval)
		if next := s.lastSentAt.Add(s.cfg.StatusInterval); next.Before(wake) {
			wake = next
		}
		if !h.Ready() {
			wctx, cancel := context.WithDeadline(ctx, wake)
			blocked := time.Now()
			err := h.Wait(wctx)
			cancel()
			// Time spent not reading is not Postgres' silence.
			lastMsg = lastMsg.Add(time.Since(blocked))
			if err != nil {
				if errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
					continue
				}
				return err
			}
		}
		if err := netConn.SetReadDeadline(wake); err != nil {
			return fmt.Errorf("set read deadline: %w", err)
		}
		msg, err := s.conn.ReceiveMessage(context.Background())
		if err != nil {
			if pgconn.Timeout(err) {
				continue
			}
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("receive from Postgres: %w", err)
		}
		lastMsg, probed = time.Now(), time.Time{}
		switch msg := msg.(type) {
		case *pgproto3.CopyData:
			if len(msg.Data) == 0 {
				continue
			}
			switch msg.Data[0] {
			case pglogrepl.PrimaryKeepaliveMessageByteID:
				ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(msg.Data[1:])
				if err != nil {
					return fmt.Errorf("parse keepalive: %w", err)
				}
				if err := h.Keepalive(ka.ServerWALEnd); err != nil {
					return err
				}
				reply = reply || ka.ReplyRequested
			case pglogrepl.XLogDataByteID:
				xld, err := pglogrepl.ParseXLogData(msg.Data[1:])
				if err != nil {
					return fmt.Errorf("parse XLogData: %w", err)
				}
				if err := h.Handle(ctx, xld.WALData); err != nil {
					if ctx.Err() != nil {
						return nil // stopping: the message is re-sent after a restart
					}
					return err
				}
			}
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("replication stream: %w", classify(pgconn.ErrorResponseToPgError(msg)))
		case *pgproto3.CopyDone:
			return errors.New("replication stream: server ended the copy (CopyDone)")
		default:
			return fmt.Errorf("replication stream: unexpected message %T", msg)
		}
	}
}

// sendStatus reports lsn as written, flushed and applied. pglogrepl copies the write position
// into a zero flush position, so all three are always set explicitly.
func (s *Stream) sendStatus(ctx context.Context, lsn pglogrepl.LSN, replyRequested bool) error {
	if lsn < s.lastSent {
		lsn = s.lastSent // never move backwards
	}
	err := pglogrepl.SendStandbyStatusUpdate(ctx, s.conn, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: lsn,
		WALFlushPosition: lsn,
		WALApplyPosition: lsn,
		ClientTime:       time.Now(),
		ReplyRequested:   replyRequested,
	})
	if err != nil {
		return fmt.Errorf("send standby status update at %s: %w", lsn, err)
	}
	if lsn != s.lastSent {
		s.log.Debug().Stringer("lsn", lsn).Msg("confirmed")
	}
	s.lastSent, s.lastSentAt = lsn, time.Now()
	return nil
}

// Confirmed returns the last position sent to Postgres.
func (s *Stream) Confirmed() pglogrepl.LSN { return s.lastSent }

// Drain is the graceful end of a session, called after Run returned because its context
// ended: it waits (until ctx ends) for the events in flight to be stored, sending status
// updates meanwhile, then sends the final position on a fresh short context.
func (s *Stream) Drain(ctx context.Context, flush checkpoint.FlushSource) error {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for flush.Awaited() > 0 {
		select {
		case <-ctx.Done():
			lsn, _ := flush.Flushed()
			s.log.Warn().Int("pending", flush.Awaited()).Stringer("lsn", lsn).
				Msg("drain timed out; events after the confirmed position will be re-published and deduplicated on restart")
			return s.final(flush)
		case <-t.C:
		}
		if time.Since(s.lastSentAt) >= s.cfg.FlushInterval {
			lsn, _ := flush.Flushed()
			if err := s.sendStatus(context.Background(), lsn, false); err != nil {
				return err
			}
		}
	}
	return s.final(flush)
}

func (s *Stream) final(flush checkpoint.FlushSource) error {
	lsn, _ := flush.Flushed()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.sendStatus(ctx, lsn, false); err != nil {
		return fmt.Errorf("final status update not sent; events after %s will be re-published and deduplicated: %w", s.lastSent, err)
	}
	s.log.Info().Stringer("lsn", lsn).Msg("final position confirmed")
	return nil
}
