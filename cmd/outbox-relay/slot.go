package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/replication"
)

const slotUsage = `Manage logical replication slots (in the spirit of pg_recvlogical).

  outbox-relay slot create [--slot NAME] [--if-not-exists]
  outbox-relay slot drop   [--slot NAME] [--if-exists] [--force]
  outbox-relay slot list   [--output table|json]`

func cmdSlot(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) (string, bool)) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintln(stdout, slotUsage)
		if len(args) == 0 {
			return usageError{errors.New("slot: name a subcommand: create, drop or list")}
		}
		return nil
	}
	sub := args[0]
	fs := newFlagSet("slot "+sub, slotUsage, stderr)
	var (
		lf                                 logFlags
		pgURL, slot, output                string
		ifNotExists, ifExists, force, temp bool
		terminateWait                      time.Duration
	)
	fs.StringVar(&pgURL, "pg-url", "", "Postgres connection URL or DSN (required)")
	output = "table"
	switch sub {
	case "create":
		fs.StringVar(&slot, "slot", "outbox_relay", "slot name")
		fs.BoolVar(&ifNotExists, "if-not-exists", false, "succeed when the slot already exists (it must be a pgoutput slot of this database)")
		fs.BoolVar(&temp, "temporary", false, "refused: a temporary slot is dropped when the session that created it ends; use run --temporary-slot")
	case "drop":
		fs.StringVar(&slot, "slot", "outbox_relay", "slot name")
		fs.BoolVar(&ifExists, "if-exists", false, "succeed when the slot does not exist")
		fs.BoolVar(&force, "force", false, "terminate the session holding an active slot, then drop it")
		fs.DurationVar(&terminateWait, "force-timeout", 10*time.Second, "with --force, how long to wait for the terminated holder to release the slot")
	case "list":
		fs.StringVar(&output, "output", "table", "output format: table or json")
	default:
		return usageError{fmt.Errorf("slot: unknown subcommand %q: use create, drop or list", sub)}
	}
	lf.register(fs)
	if _, err := parseCommand(fs, args[1:], env, &lf, stderr, &pgURL); err != nil {
		return err
	}
	if output != "table" && output != "json" {
		return usageError{fmt.Errorf("--output %q: use table or json", output)}
	}
	if temp {
		return usageError{errors.New("slot create --temporary: a temporary slot is dropped as soon as the session that created it ends, which is when this command exits; for a slot that lives only while the relay runs, use outbox-relay run --temporary-slot")}
	}
	conn, err := relay.ConnectPG(ctx, pgURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	switch sub {
	case "create":
		return slotCreate(ctx, conn, stdout, slot, ifNotExists)
	case "drop":
		return slotDrop(ctx, conn, stdout, slot, ifExists, force, terminateWait)
	default:
		slots, err := replication.ListSlots(ctx, conn)
		if err != nil {
			return err
		}
		return printSlots(stdout, slots, output)
	}
}

// slotCreate creates the slot (relay.CreateSlot) and says what it did.
func slotCreate(ctx context.Context, conn *pgx.Conn, stdout io.Writer, name string, ifNotExists bool) error {
	lsn, created, err := relay.CreateSlot(ctx, conn, name, relay.SlotOptions{IfNotExists: ifNotExists})
	var exists *relay.SlotExistsError
	switch {
	case errors.As(err, &exists):
		return fmt.Errorf("%w: pass --if-not-exists to accept it, or drop it first with outbox-relay slot drop --slot %s", err, name)
	case err != nil:
		return err
	case created:
		fmt.Fprintf(stdout, "created replication slot %s at %s\n", name, lsn)
	default:
		fmt.Fprintf(stdout, "replication slot %s exists (confirmed_flush_lsn %s)\n", name, lsn)
	}
	return nil
}

// slotDrop drops the slot (relay.DropSlot) and says what it did.
func slotDrop(ctx context.Context, conn *pgx.Conn, stdout io.Writer, name string, ifExists, force bool, wait time.Duration) error {
	s, existed, err := relay.DropSlot(ctx, conn, name, relay.SlotOptions{Force: force, ForceTimeout: wait})
	if !existed || (errors.Is(err, replication.ErrSlotMissing) && ifExists) {
		if !ifExists {
			return fmt.Errorf("replication slot %q does not exist (pass --if-exists to accept that)", name)
		}
		fmt.Fprintf(stdout, "replication slot %s does not exist\n", name)
		return nil
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "dropped replication slot %s (it had confirmed_flush_lsn %s)\n", name, s.ConfirmedFlush)
	return nil
}

// slotView is a slot as `slot list` prints it.
type slotView struct {
	Name              string `json:"name"`
	Plugin            string `json:"plugin"`
	Database          string `json:"database"`
	Temporary         bool   `json:"temporary"`
	Active            bool   `json:"active"`
	ActivePID         *int32 `json:"active_pid"`
	RestartLSN        string `json:"restart_lsn"`
	ConfirmedFlushLSN string `json:"confirmed_flush_lsn"`
	LagBytes          int64  `json:"lag_bytes"`
	WALStatus         string `json:"wal_status"`
	SafeWALSize       *int64 `json:"safe_wal_size"`
}

func printSlots(w io.Writer, slots []replication.Slot, output string) error {
	views := make([]slotView, 0, len(slots))
	for _, s := range slots {
		v := slotView{Name: s.Name, Plugin: s.Plugin, Database: s.Database, Temporary: s.Temporary, Active: s.Active,
			RestartLSN: s.RestartLSN.String(), ConfirmedFlushLSN: s.ConfirmedFlush.String(), LagBytes: s.LagBytes,
			WALStatus: s.WALStatus, SafeWALSize: s.SafeWALSize}
		if s.Active {
			pid := s.ActivePID
			v.ActivePID = &pid
		}
		views = append(views, v)
	}
	if output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(views)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tPLUGIN\tDATABASE\tACTIVE PID\tRESTART LSN\tCONFIRMED FLUSH LSN\tLAG\tWAL STATUS\tSAFE WAL SIZE")
	for _, v := range views {
		pid, safe := "-", "unlimited"
		if v.ActivePID != nil {
			pid = strconv.Itoa(int(*v.ActivePID))
		}
		if v.SafeWALSize != nil {
			safe = humanBytes(*v.SafeWALSize)
		}
		name := v.Name
		if v.Temporary {
			name += " (temporary)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", name, v.Plugin, v.Database, pid, v.RestartLSN,
			v.ConfirmedFlushLSN, humanBytes(v.LagBytes), v.WALStatus, safe)
	}
	return tw.Flush()
}

// humanBytes formats n in binary units (1.5 MiB).
func humanBytes(n int64) string {
	const unit = 1024
	if n < unit && n > -unit {
		return fmt.Sprintf("%d B", n)
	}
	f, i := float64(n), 0
	for ; (f >= unit || f <= -unit) && i < 5; i++ {
		f /= unit
	}
	return fmt.Sprintf("%.1f %ciB", f, "KMGTP"[i-1])
}
