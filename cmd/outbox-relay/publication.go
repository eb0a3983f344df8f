package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/relay"
)

const publicationUsage = `Manage the publication the relay reads (for your own table; migrate does it for the default one).

  outbox-relay publication create [--publication NAME] [--table schema.table]
  outbox-relay publication drop   [--publication NAME] [--if-exists]
  outbox-relay publication show   [--publication NAME] [--output table|json]`

func cmdPublication(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) (string, bool)) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintln(stdout, publicationUsage)
		if len(args) == 0 {
			return usageError{errors.New("publication: name a subcommand: create, drop or show")}
		}
		return nil
	}
	sub := args[0]
	fs := newFlagSet("publication "+sub, publicationUsage, stderr)
	var (
		lf                 logFlags
		pgURL, publication string
		output             = "table"
		ifExists           bool
		table              = newTableFlag("public.outbox")
	)
	fs.StringVar(&pgURL, "pg-url", "", "Postgres connection URL or DSN (required)")
	fs.StringVar(&publication, "publication", "outbox_pub", "publication name")
	switch sub {
	case "create":
		fs.Var(table, "table", "table whose inserts are published, schema.table; give it once per table to publish several")
	case "drop":
		fs.BoolVar(&ifExists, "if-exists", false, "succeed when the publication does not exist")
	case "show":
		fs.StringVar(&output, "output", "table", "output format: table or json")
	default:
		return usageError{fmt.Errorf("publication: unknown subcommand %q: use create, drop or show", sub)}
	}
	lf.register(fs)
	if _, err := parseCommand(fs, args[1:], env, &lf, stderr, &pgURL); err != nil {
		return err
	}
	if output != "table" && output != "json" {
		return usageError{fmt.Errorf("--output %q: use table or json", output)}
	}
	conn, err := relay.ConnectPG(ctx, pgURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	switch sub {
	case "create":
		for _, t := range table.tables() {
			schema, tbl, err := splitTable(t.name)
			if err != nil {
				return usageError{err}
			}
			if err := publicationCreate(ctx, conn, stdout, publication, schema, tbl); err != nil {
				return err
			}
		}
		return nil
	case "drop":
		existed, err := relay.DropPublication(ctx, conn, publication)
		if err != nil {
			return err
		}
		if !existed {
			if ifExists {
				fmt.Fprintf(stdout, "publication %s does not exist\n", publication)
				return nil
			}
			return fmt.Errorf("publication %q does not exist (pass --if-exists to accept that)", publication)
		}
		fmt.Fprintf(stdout, "dropped publication %s; a relay reading it stops with an error naming it\n", publication)
		return nil
	default:
		p, err := relay.ReadPublication(ctx, conn, publication)
		if err != nil {
			return err
		}
		return printPublication(stdout, p, output)
	}
}

// publicationCreate creates the publication (relay.CreatePublication) and says what it did.
func publicationCreate(ctx context.Context, conn *pgx.Conn, stdout io.Writer, publication, schema, table string) error {
	change, err := relay.CreatePublication(ctx, conn, publication, schema, table)
	if err != nil {
		return err
	}
	qt := pgx.Identifier{schema, table}.Sanitize()
	switch change {
	case relay.PublicationCreated:
		fmt.Fprintf(stdout, "created publication %s of the inserts into %s\n", publication, qt)
	case relay.PublicationTableAdded:
		fmt.Fprintf(stdout, "added %s to publication %s\n", qt, publication)
	default:
		fmt.Fprintf(stdout, "publication %s already publishes %s\n", publication, qt)
	}
	return nil
}

func printPublication(w io.Writer, p relay.Publication, output string) error {
	if output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(p)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	ops := ""
	for _, o := range []struct {
		on   bool
		name string
	}{{p.Insert, "insert"}, {p.Update, "update"}, {p.Delete, "delete"}, {p.Truncate, "truncate"}} {
		if o.on {
			if ops != "" {
				ops += ", "
			}
			ops += o.name
		}
	}
	fmt.Fprintf(tw, "publication\t%s\nowner\t%s\npublishes\t%s\nall tables\t%v\n", p.Name, p.Owner, ops, p.AllTables)
	for _, t := range p.Tables {
		fmt.Fprintf(tw, "table\t%s\n", t)
	}
	return tw.Flush()
}
