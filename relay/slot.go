package relay

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/replication"
)

// SlotMismatch says why an existing slot cannot serve the relay on this connection's database,
// or "" when it can.
func SlotMismatch(s replication.Slot) string {
	switch {
	case s.SlotType != "logical" || s.Plugin != "pgoutput":
		return fmt.Sprintf("uses plugin %q (%s slot); the relay needs a logical pgoutput slot", s.Plugin, s.SlotType)
	case !s.CurrentDatabase:
		return fmt.Sprintf("belongs to database %q, not the one in Config.PGURL", s.Database)
	}
	return ""
}

// SlotOptions adjust CreateSlot and DropSlot.
type SlotOptions struct {
	IfNotExists  bool          // CreateSlot: accept an existing slot (it must suit the relay)
	Force        bool          // DropSlot: terminate the session holding an active slot first
	ForceTimeout time.Duration // DropSlot with Force: how long to wait for the holder to let go
}

// SlotExistsError is CreateSlot's refusal of an existing slot without SlotOptions.IfNotExists.
type SlotExistsError struct{ Slot replication.Slot }

func (e *SlotExistsError) Error() string {
	return fmt.Sprintf("replication slot %q already exists (confirmed_flush_lsn %s)", e.Slot.Name, e.Slot.ConfirmedFlush)
}

// CreateSlot creates the logical pgoutput slot name. An existing one is a *SlotExistsError,
// or with o.IfNotExists accepted if it suits the relay (created false, at its confirmed_flush_lsn).
func CreateSlot(ctx context.Context, conn *pgx.Conn, name string, o SlotOptions) (lsn pglogrepl.LSN, created bool, err error) {
	s, err := replication.GetSlot(ctx, conn, name)
	switch {
	case err == nil && !o.IfNotExists:
		return 0, false, &SlotExistsError{Slot: s}
	case err == nil:
		if problem := SlotMismatch(s); problem != "" {
			return 0, false, fmt.Errorf("replication slot %q exists but %s", name, problem)
		}
		return s.ConfirmedFlush, false, nil
	case !errors.Is(err, replication.ErrSlotMissing):
		return 0, false, err
	}
	lsn, err = replication.CreateSlot(ctx, conn, name)
	if err != nil {
		return 0, false, fmt.Errorf("%w (the role needs the REPLICATION attribute: ALTER ROLE ... REPLICATION)", err)
	}
	return lsn, true, nil
}

// DropSlot drops the slot name and returns it as it was. A missing slot is not dropped
// (existed false, no error); an active one is refused, or with o.Force its holder is
// terminated first.
func DropSlot(ctx context.Context, conn *pgx.Conn, name string, o SlotOptions) (s replication.Slot, existed bool, err error) {
	s, err = replication.GetSlot(ctx, conn, name)
	if errors.Is(err, replication.ErrSlotMissing) {
		return s, false, nil
	}
	if err != nil {
		return s, true, err
	}
	if s.Active {
		if !o.Force {
			return s, true, fmt.Errorf("replication slot %q is active (held by the process with pid %d): stop that relay, or pass SlotOptions.Force to terminate it and drop the slot", name, s.ActivePID)
		}
		if err := terminateHolder(ctx, conn, name, s.ActivePID, o.ForceTimeout); err != nil {
			return s, true, err
		}
	}
	if err := replication.DropSlot(ctx, conn, name); err != nil {
		if errors.Is(err, replication.ErrSlotInUse) {
			return s, true, fmt.Errorf("%w: another session took the slot again; stop it or retry with SlotOptions.Force", err)
		}
		return s, true, err
	}
	return s, true, nil
}

// terminateHolder ends the backend holding the slot and waits until the slot is released.
func terminateHolder(ctx context.Context, conn *pgx.Conn, name string, pid int32, wait time.Duration) error {
	var ok bool
	if err := conn.QueryRow(ctx, `SELECT pg_terminate_backend($1)`, pid).Scan(&ok); err != nil {
		return fmt.Errorf("terminate the session holding slot %q (pid %d): %w (needs superuser or pg_signal_backend)", name, pid, err)
	}
	deadline := time.Now().Add(wait)
	for {
		s, err := replication.GetSlot(ctx, conn, name)
		if err != nil || !s.Active {
			return nil // dropped by its holder (temporary) or released
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("replication slot %q still active (pid %d) %s after terminating pid %d: retry, or raise SlotOptions.ForceTimeout", name, s.ActivePID, wait, pid)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
