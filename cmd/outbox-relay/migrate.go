package main

import (
	"context"
	"fmt"
	"io"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/relay"
)

func cmdMigrate(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) (string, bool)) error {
	fs := newFlagSet("migrate", "Create the outbox table and a publication of its inserts. Safe to run again.", stderr)
	var (
		lf                         logFlags
		pgURL, publication, source string
		partitions                 int
		createSlot                 bool
		slot, aggIDColumn          string
	)
	fs.StringVar(&pgURL, "pg-url", "", "Postgres connection URL or DSN (required)")
	table := newTableFlag("public.outbox")
	fs.Var(table, "table", "outbox table, schema.table; give it once per table to create several (each if missing) and put them all in the one publication")
	fs.StringVar(&publication, "publication", "outbox_pub", "publication to create")
	fs.StringVar(&source, "source", "table", "table: the outbox table, its publication and outbox_emit; messages (table-less): outbox_emit and a publication without tables")
	fs.BoolVar(&createSlot, "create-slot", false, "also create the relay's replication slot (after the publication), so that every row committed from now on is relayed, even before the relay first runs; needs the REPLICATION attribute")
	fs.StringVar(&slot, "slot", "outbox_relay", "with --create-slot: the slot's name (with --partitions N: <slot>_p<i>, one per partition)")
	fs.IntVar(&partitions, "partitions", 1, "also create this many row-filtered publications <publication>_p<i>of<N>, one per relay, partitioned by a hash of --column-aggregate-id (Postgres 15+)")
	fs.StringVar(&aggIDColumn, "column-aggregate-id", decoder.DefaultColumns.AggregateID, "with --partitions: the column holding the aggregate id, as for run")
	lf.register(fs)
	log, err := parseCommand(fs, args, env, &lf, stderr, &pgURL)
	if err != nil {
		return err
	}
	if partitions < 1 {
		return usageError{fmt.Errorf("--partitions must be at least 1")}
	}
	if partitions > 1 && source == "messages" {
		return usageError{fmt.Errorf("--partitions filters the outbox table's rows; it does not apply to --source messages")}
	}
	var names [][2]string // schema, table
	for _, t := range table.tables() {
		schema, tbl, err := splitTable(t.name)
		if err != nil {
			return usageError{err}
		}
		names = append(names, [2]string{schema, tbl})
	}
	if len(names) > 1 && (partitions > 1 || source == "messages") {
		return usageError{fmt.Errorf("several --table apply to --source table without --partitions")}
	}
	schema := names[0][0]
	if source != "table" && source != "messages" {
		return usageError{fmt.Errorf("--source %q: use table or messages", source)}
	}
	conn, err := relay.ConnectPG(ctx, pgURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	var res migrations.Result
	// Every table before the slot: it decodes each table's inserts from its creation on.
	for _, n := range names {
		if source == "table" {
			if err := createSchema(ctx, conn, stdout, n[0]); err != nil {
				return err
			}
		}
		if res, err = migrations.Apply(ctx, conn, migrations.Options{Schema: n[0], Table: n[1], Publication: publication, Messages: source == "messages", Partitions: partitions, AggregateIDColumn: aggIDColumn}); err != nil {
			return err
		}
		if source == "table" {
			log.Info().Str("table", n[0]+"."+n[1]).Bool("created_table", res.CreatedTable).
				Str("publication", publication).Bool("created_publication", res.CreatedPublication).
				Bool("added_to_publication", res.AddedToPublication).Msg("migrated")
			fmt.Fprintf(stdout, "table %s.%s and publication %s are in place\n", n[0], n[1], publication)
		}
	}
	if createSlot {
		// After the publication: a slot decodes with the catalog as of each WAL position.
		names := []string{slot}
		if partitions > 1 {
			names = names[:0]
			for i := 0; i < partitions; i++ {
				names = append(names, fmt.Sprintf("%s_p%d", slot, i))
			}
		}
		for _, name := range names {
			if err := slotCreate(ctx, conn, stdout, name, true); err != nil {
				return err
			}
		}
	}
	if source == "messages" {
		log.Info().Str("function", schema+".outbox_emit").Str("publication", publication).
			Bool("created_publication", res.CreatedPublication).Msg("migrated (table-less)")
		fmt.Fprintf(stdout, "function %s.outbox_emit and publication %s are in place\n", schema, publication)
		return nil
	}
	if !createSlot {
		fmt.Fprintf(stdout, "no replication slot yet: rows committed before the relay first runs with --create-slot are not relayed (use migrate --create-slot, or outbox-relay slot create, before the application writes)\n")
	}
	if partitions > 1 {
		log.Info().Strs("created_partitions", res.CreatedPartitions).Msg("partition publications in place")
		fmt.Fprintf(stdout, "%d partition publications are in place; run one relay per partition, each with its own slot and stream:\n", partitions)
		for i := 0; i < partitions; i++ {
			fmt.Fprintf(stdout, "  outbox-relay run --publication %s --slot %s_p%d --stream OUTBOX_P%d --subject-prefix outbox.p%d --create-slot ...\n",
				migrations.PartitionPublication(publication, i, partitions), slot, i, i, i)
		}
	}
	return nil
}

// createSchema creates the schema of an outbox table if it does not exist (a module's schema,
// billing in billing.outbox).
func createSchema(ctx context.Context, conn *pgx.Conn, stdout io.Writer, schema string) error {
	var exists bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)`, schema).Scan(&exists); err != nil {
		return fmt.Errorf("look up schema %s: %w", schema, err)
	}
	if exists {
		return nil
	}
	if _, err := conn.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+pgx.Identifier{schema}.Sanitize()); err != nil {
		return fmt.Errorf("create schema %s: %w (create it, or run migrate as a role with CREATE on the database)", schema, err)
	}
	fmt.Fprintf(stdout, "schema %s created\n", schema)
	return nil
}
