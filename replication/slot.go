package replication

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// ErrSlotMissing: the replication slot does not exist.
var ErrSlotMissing = errors.New("replication slot does not exist")

// Slot is a row of pg_replication_slots, with the lag computed against pg_current_wal_lsn().
type Slot struct {
	Name           string        `json:"name"`
	Plugin         string        `json:"plugin"`
	SlotType       string        `json:"slot_type"`
	Database       string        `json:"database"`
	Temporary      bool          `json:"temporary"`
	Active         bool          `json:"active"`
	ActivePID      int32         `json:"active_pid,omitempty"`
	RestartLSN     pglogrepl.LSN `json:"-"`
	ConfirmedFlush pglogrepl.LSN `json:"-"`
	// LagBytes is pg_current_wal_lsn() - confirmed_flush_lsn: WAL the slot holds back.
	LagBytes    int64  `json:"lag_bytes"`
	WALStatus   string `json:"wal_status"`
	SafeWALSize *int64 `json:"safe_wal_size"`
	// CurrentDatabase reports whether the slot belongs to the database of the connection.
	CurrentDatabase bool `json:"-"`
}

const slotQuery = `SELECT slot_name, coalesce(plugin, ''), slot_type, coalesce(database, ''), temporary, active,
	coalesce(active_pid, 0), coalesce(restart_lsn, '0/0'::pg_lsn)::text, coalesce(confirmed_flush_lsn, '0/0'::pg_lsn)::text,
	coalesce(pg_current_wal_lsn() - confirmed_flush_lsn, 0)::bigint, coalesce(wal_status, ''), safe_wal_size,
	coalesce(database = current_database(), false)
FROM pg_replication_slots`

func scanSlot(row pgx.Row) (Slot, error) {
	var s Slot
	var restart, confirmed string
	err := row.Scan(&s.Name, &s.Plugin, &s.SlotType, &s.Database, &s.Temporary, &s.Active, &s.ActivePID,
		&restart, &confirmed, &s.LagBytes, &s.WALStatus, &s.SafeWALSize, &s.CurrentDatabase)
	if err != nil {
		return s, err
	}
	if s.RestartLSN, err = pglogrepl.ParseLSN(restart); err != nil {
		return s, err
	}
	s.ConfirmedFlush, err = pglogrepl.ParseLSN(confirmed)
	return s, err
}

// GetSlot reads one slot; ErrSlotMissing when there is none of that name.
func GetSlot(ctx context.Context, conn *pgx.Conn, name string) (Slot, error) {
	s, err := scanSlot(conn.QueryRow(ctx, slotQuery+` WHERE slot_name = $1`, name))
	if errors.Is(err, pgx.ErrNoRows) {
		return s, fmt.Errorf("%w: %q", ErrSlotMissing, name)
	}
	if err != nil {
		return s, fmt.Errorf("read replication slot %q: %w", name, err)
	}
	return s, nil
}

// ListSlots reads every logical slot.
func ListSlots(ctx context.Context, conn *pgx.Conn) ([]Slot, error) {
	rows, err := conn.Query(ctx, slotQuery+` WHERE slot_type = 'logical' ORDER BY slot_name`)
	if err != nil {
		return nil, fmt.Errorf("list replication slots: %w", err)
	}
	defer rows.Close()
	var out []Slot
	for rows.Next() {
		s, err := scanSlot(rows)
		if err != nil {
			return nil, fmt.Errorf("list replication slots: %w", err)
		}
		out = append(out, s)
	}
	return out, rows.Err()
}

// CreateSlot creates a persistent logical slot using pgoutput. Create the publication first:
// a slot decodes with the catalog as of each WAL position, and a publication created after the
// slot is missing for the changes in between.
func CreateSlot(ctx context.Context, conn *pgx.Conn, name string) (pglogrepl.LSN, error) {
	var lsn string
	err := conn.QueryRow(ctx, `SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')`, name).Scan(&lsn)
	if err != nil {
		return 0, fmt.Errorf("create replication slot %q: %w", name, err)
	}
	return pglogrepl.ParseLSN(lsn)
}

// CreateTemporarySlot creates a slot that lives as long as the replication connection conn.
func CreateTemporarySlot(ctx context.Context, conn *pgconn.PgConn, name string) (pglogrepl.LSN, error) {
	res, err := pglogrepl.CreateReplicationSlot(ctx, conn, name, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Temporary: true, Mode: pglogrepl.LogicalReplication})
	if err != nil {
		return 0, fmt.Errorf("create temporary replication slot %q: %w", name, err)
	}
	return pglogrepl.ParseLSN(res.ConsistentPoint)
}

// DropSlot drops a slot. Postgres refuses to drop an active slot (55006, ErrSlotInUse).
func DropSlot(ctx context.Context, conn *pgx.Conn, name string) error {
	if _, err := conn.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, name); err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42704" {
			return fmt.Errorf("%w: %q", ErrSlotMissing, name)
		}
		return fmt.Errorf("drop replication slot %q: %w", name, classify(err))
	}
	return nil
}
