package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/migrations"
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
		lf                        logFlags
		pgURL, publication, table string
		output                    = "table"
		ifExists                  bool
	)
	fs.StringVar(&pgURL, "pg-url", "", "Postgres connection URL or DSN (required)")
	fs.StringVar(&publication, "publication", "outbox_pub", "publication name")
	switch sub {
	case "create":
		fs.StringVar(&table, "table", "public.outbox", "table whose inserts are published, schema.table")
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
	pub := pgx.Identifier{publication}.Sanitize()
	switch sub {
	case "create":
		schema, tbl, err := splitTable(table)
		if err != nil {
			return usageError{err}
		}
		return publicationCreate(ctx, conn, stdout, publication, schema, tbl)
	case "drop":
		if _, err := conn.Exec(ctx, `DROP PUBLICATION `+pub); err != nil {
			if isPgCode(err, "42704") {
				if ifExists {
					fmt.Fprintf(stdout, "publication %s does not exist\n", publication)
					return nil
				}
				return fmt.Errorf("publication %q does not exist (pass --if-exists to accept that)", publication)
			}
			return fmt.Errorf("drop publication %s: %w", pub, err)
		}
		fmt.Fprintf(stdout, "dropped publication %s; a relay reading it stops with an error naming it\n", publication)
		return nil
	default:
		p, err := readPublication(ctx, conn, publication)
		if err != nil {
			return err
		}
		return printPublication(stdout, p, output)
	}
}

// publicationCreate creates the publication of schema.table's inserts, or adds the table to an
// existing one. It changes nothing when both are in place.
func publicationCreate(ctx context.Context, conn *pgx.Conn, stdout io.Writer, publication, schema, table string) error {
	qt := pgx.Identifier{schema, table}.Sanitize()
	var exists bool
	if err := conn.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, qt).Scan(&exists); err != nil {
		return fmt.Errorf("look up table %s: %w", qt, err)
	}
	if !exists {
		return fmt.Errorf("table %s does not exist: create it first (outbox-relay migrate creates the default outbox table)", qt)
	}
	p, err := readPublication(ctx, conn, publication)
	pub := pgx.Identifier{publication}.Sanitize()
	switch {
	case errors.Is(err, errNoPublication):
		if _, err := conn.Exec(ctx, migrations.PublicationSQL(migrations.Options{Schema: schema, Table: table, Publication: publication})); err != nil {
			return fmt.Errorf("create publication %s: %w (run it as the table's owner)", pub, err)
		}
		fmt.Fprintf(stdout, "created publication %s of the inserts into %s\n", publication, qt)
		return nil
	case err != nil:
		return err
	}
	for _, t := range p.Tables {
		if t == schema+"."+table || p.AllTables {
			if !p.Insert {
				return fmt.Errorf("publication %q includes %s but does not publish inserts: ALTER PUBLICATION %s SET (publish = 'insert');", publication, qt, pub)
			}
			fmt.Fprintf(stdout, "publication %s already publishes %s\n", publication, qt)
			return nil
		}
	}
	if _, err := conn.Exec(ctx, fmt.Sprintf(`ALTER PUBLICATION %s ADD TABLE %s`, pub, qt)); err != nil {
		return fmt.Errorf("add %s to publication %s: %w (run it as the owner of both)", qt, pub, err)
	}
	fmt.Fprintf(stdout, "added %s to publication %s\n", qt, publication)
	return nil
}

var errNoPublication = errors.New("publication does not exist")

type publicationView struct {
	Name      string   `json:"name"`
	Owner     string   `json:"owner"`
	AllTables bool     `json:"all_tables"`
	Insert    bool     `json:"insert"`
	Update    bool     `json:"update"`
	Delete    bool     `json:"delete"`
	Truncate  bool     `json:"truncate"`
	Tables    []string `json:"tables"`
}

func readPublication(ctx context.Context, conn *pgx.Conn, name string) (publicationView, error) {
	p := publicationView{Name: name, Tables: []string{}}
	err := conn.QueryRow(ctx, `SELECT pg_get_userbyid(pubowner)::text, puballtables, pubinsert, pubupdate, pubdelete, pubtruncate
		FROM pg_publication WHERE pubname = $1`, name).Scan(&p.Owner, &p.AllTables, &p.Insert, &p.Update, &p.Delete, &p.Truncate)
	if errors.Is(err, pgx.ErrNoRows) {
		return p, fmt.Errorf("%w: %q (create it with outbox-relay publication create)", errNoPublication, name)
	}
	if err != nil {
		return p, fmt.Errorf("read publication %q: %w", name, err)
	}
	rows, err := conn.Query(ctx, `SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1`, name)
	if err != nil {
		return p, fmt.Errorf("read the tables of publication %q: %w", name, err)
	}
	defer rows.Close()
	for rows.Next() {
		var t string
		if err := rows.Scan(&t); err != nil {
			return p, err
		}
		p.Tables = append(p.Tables, t)
	}
	return p, rows.Err()
}

func printPublication(w io.Writer, p publicationView, output string) error {
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

func isPgCode(err error, code string) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == code
}
