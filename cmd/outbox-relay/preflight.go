package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/replication"
)

// preflight checks what a session needs and names the fix for what is missing.
func preflight(ctx context.Context, cfg runConfig, log zerolog.Logger) error {
	conn, err := connectPG(ctx, cfg.pgURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	var walLevel string
	if err := conn.QueryRow(ctx, `SHOW wal_level`).Scan(&walLevel); err != nil {
		return fmt.Errorf("read wal_level: %w", err)
	}
	if walLevel != "logical" {
		return fatalError{fmt.Errorf("wal_level is %q, logical replication needs 'logical': run ALTER SYSTEM SET wal_level = logical; and restart Postgres", walLevel)}
	}
	var pubExists, pubHasTable bool
	err = conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1),
		EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)`,
		cfg.publication, cfg.schema, cfg.table).Scan(&pubExists, &pubHasTable)
	if err != nil {
		return fmt.Errorf("look up publication %q: %w", cfg.publication, err)
	}
	mo := migrations.Options{Schema: cfg.schema, Table: cfg.table, Publication: cfg.publication}
	if !pubExists {
		return fatalError{fmt.Errorf("publication %q does not exist: run outbox-relay migrate, or: %s", cfg.publication, migrations.PublicationSQL(mo))}
	}
	if cfg.source == "messages" {
		var version int
		if err := conn.QueryRow(ctx, `SELECT current_setting('server_version_num')::int`).Scan(&version); err != nil {
			return fmt.Errorf("read server_version_num: %w", err)
		}
		if version < 140000 {
			return fatalError{fmt.Errorf("--source messages needs PostgreSQL 14 or later (pgoutput's messages option); this server is %d: use --source table", version)}
		}
	} else if !pubHasTable {
		return fatalError{fmt.Errorf("publication %q does not include %s.%s: run ALTER PUBLICATION %q ADD TABLE %s.%s;", cfg.publication, cfg.schema, cfg.table, cfg.publication, cfg.schema, cfg.table)}
	}
	slot, err := replication.GetSlot(ctx, conn, cfg.slot)
	if errors.Is(err, replication.ErrSlotMissing) {
		if !cfg.createSlot {
			return fatalError{fmt.Errorf("replication slot %q does not exist: pass --create-slot to create it", cfg.slot)}
		}
		lsn, err := replication.CreateSlot(ctx, conn, cfg.slot)
		if err != nil {
			return err
		}
		log.Info().Stringer("lsn", lsn).Msg("created replication slot")
		return nil
	}
	if err != nil {
		return err
	}
	switch {
	case slot.SlotType != "logical" || slot.Plugin != "pgoutput":
		return fatalError{fmt.Errorf("replication slot %q uses plugin %q (%s), the relay needs a logical pgoutput slot: choose another --slot", cfg.slot, slot.Plugin, slot.SlotType)}
	case !slot.CurrentDatabase:
		return fatalError{fmt.Errorf("replication slot %q belongs to database %q, not the one in --pg-url: choose another --slot or connect to %q", cfg.slot, slot.Database, slot.Database)}
	case slot.WALStatus == "lost":
		return fatalError{fmt.Errorf("replication slot %q is invalidated (wal_status = lost): the WAL it needed was removed, so events committed while the relay was behind are not in the replication stream any more. Drop and recreate the slot, then republish the rows committed since %s from the table", cfg.slot, slot.ConfirmedFlush)}
	}
	return nil
}
