// Package migrations creates the outbox table and its publication, and the outbox_emit
// function of table-less mode. The SQL files are embedded into the binary and applied by
// `outbox-relay migrate`; every statement is idempotent, so running migrate again changes
// nothing.
package migrations

import (
	"context"
	"embed"
	"fmt"
	"io/fs"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/pgcatalog"
)

//go:embed *.sql
var files embed.FS

// Options name the objects to create.
type Options struct {
	Schema, Table string // default public.outbox
	Publication   string // default outbox_pub
	// Messages: table-less mode. Create only the outbox_emit function (in Schema) and, if
	// missing, a publication without tables (pgoutput needs one to start); no table.
	Messages bool
	// Partitions > 1 also creates that many publications for horizontal scale-out, one per
	// relay: PartitionPublication(Publication, i, Partitions) with the row filter
	// PartitionFilter(Partitions, i), so that every row is in exactly one of them and all of
	// an aggregate's rows are in the same one (Postgres 15 or later).
	Partitions int
	// AggregateIDColumn is the column the partitions hash (default aggregate_id): the table's
	// column mapped to the aggregate id.
	AggregateIDColumn string
}

// PartitionPublication names partition i of n of publication pub: outbox_pub_p0of2.
func PartitionPublication(pub string, i, n int) string { return fmt.Sprintf("%s_p%dof%d", pub, i, n) }

// PartitionFilter is the row filter of partition i of n: a hash of aggregate_id modulo n.
// hashtext is an immutable built-in, as row filters require. The sign bit is masked rather
// than taking abs(): abs(hashtext(x)) fails with "integer out of range" for the one hash
// value -2147483648, which would stop replication at that row.
func PartitionFilter(n, i int) string { return PartitionFilterOn("aggregate_id", n, i) }

// PartitionFilterOn is PartitionFilter hashing column (the table's aggregate id column).
func PartitionFilterOn(column string, n, i int) string {
	if column != "aggregate_id" {
		column = pgx.Identifier{column}.Sanitize()
	}
	return fmt.Sprintf("(hashtext(%s) & 2147483647) %% %d = %d", column, n, i)
}

// CheckIdentifier refuses a name with a control character (bytes 0-31 and 127) for an
// identifier of kind what ("table", "--publication", ...). Identifiers are quoted wherever
// they reach SQL, but a line break in one has no business in a name and, in text run as
// several statements, is one quoting mistake away from running what follows it.
func CheckIdentifier(what, name string) error {
	for i := 0; i < len(name); i++ {
		if c := name[i]; c < 0x20 || c == 0x7f {
			return fmt.Errorf("%s %q: contains a control character (byte 0x%02x); identifiers may not", what, name, c)
		}
	}
	return nil
}

func (o *Options) fill() {
	if o.Schema == "" {
		o.Schema = "public"
	}
	if o.Table == "" {
		o.Table = "outbox"
	}
	if o.Publication == "" {
		o.Publication = "outbox_pub"
	}
	if o.AggregateIDColumn == "" {
		o.AggregateIDColumn = "aggregate_id"
	}
}

// Result says what Apply changed.
type Result struct {
	CreatedTable       bool
	CreatedPublication bool
	AddedToPublication bool
	// CreatedPartitions lists the partition publications created (Options.Partitions > 1).
	CreatedPartitions []string
}

// emitFile creates the outbox_emit function; the table migrations are the 0*.sql files.
const emitFile = "emit.sql"

// Apply creates the table (if missing) and a publication of its INSERTs (if missing, or adds
// the table to an existing publication). It runs in one transaction under an advisory lock, so
// concurrent runs do not race.
func Apply(ctx context.Context, conn *pgx.Conn, o Options) (Result, error) {
	o.fill()
	var res Result
	for _, id := range [][2]string{{"schema", o.Schema}, {"table", o.Table}, {"publication", o.Publication}, {"aggregate id column", o.AggregateIDColumn}} {
		if err := CheckIdentifier(id[0], id[1]); err != nil {
			return res, err
		}
	}
	table := pgx.Identifier{o.Schema, o.Table}.Sanitize()
	pub := pgx.Identifier{o.Publication}.Sanitize()
	tx, err := conn.Begin(ctx)
	if err != nil {
		return res, fmt.Errorf("begin migration: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // no-op after commit
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('outbox-relay migrate'))`); err != nil {
		return res, fmt.Errorf("take migration lock: %w", err)
	}
	names, err := fs.Glob(files, "0*.sql")
	if err != nil {
		return res, err
	}
	sort.Strings(names)
	if o.Messages {
		names = nil
	}
	names = append(names, emitFile)
	var exists bool
	if err := tx.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, table).Scan(&exists); err != nil {
		return res, fmt.Errorf("look up table %s: %w", table, err)
	}
	repl := strings.NewReplacer("{{table}}", table, "{{publication}}", pub, "{{schema}}", pgx.Identifier{o.Schema}.Sanitize())
	for _, name := range names {
		b, err := files.ReadFile(name)
		if err != nil {
			return res, err
		}
		if _, err := tx.Exec(ctx, repl.Replace(string(b))); err != nil {
			return res, fmt.Errorf("apply migration %s: %w", name, err)
		}
	}
	if o.Messages {
		_, pubExists, err := pgcatalog.ReadPublication(ctx, tx, o.Publication)
		if err != nil {
			return res, fmt.Errorf("look up publication %s: %w", pub, err)
		}
		if !pubExists {
			// pgoutput sends logical decoding messages whatever the publication holds.
			if _, err := tx.Exec(ctx, fmt.Sprintf(`CREATE PUBLICATION %s`, pub)); err != nil {
				return res, fmt.Errorf("create publication %s: %w", pub, err)
			}
			res.CreatedPublication = true
		}
		if err := tx.Commit(ctx); err != nil {
			return res, fmt.Errorf("commit migration: %w", err)
		}
		return res, nil
	}
	res.CreatedTable = !exists

	p, pubExists, err := pgcatalog.ReadPublication(ctx, tx, o.Publication)
	_, pubHasTable := p.Table(o.Schema, o.Table)
	if err != nil {
		return res, fmt.Errorf("look up publication %s: %w", pub, err)
	}
	switch {
	case !pubExists:
		if _, err := tx.Exec(ctx, fmt.Sprintf(`CREATE PUBLICATION %s FOR TABLE %s WITH (publish = 'insert')`, pub, table)); err != nil {
			return res, fmt.Errorf("create publication %s: %w", pub, err)
		}
		res.CreatedPublication = true
	case !pubHasTable:
		if _, err := tx.Exec(ctx, fmt.Sprintf(`ALTER PUBLICATION %s ADD TABLE %s`, pub, table)); err != nil {
			return res, fmt.Errorf("add %s to publication %s: %w", table, pub, err)
		}
		res.AddedToPublication = true
	}
	if o.Partitions > 1 {
		if res.CreatedPartitions, err = createPartitions(ctx, tx, o, table); err != nil {
			return res, err
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return res, fmt.Errorf("commit migration: %w", err)
	}
	return res, nil
}

// createPartitions creates the missing partition publications. An existing one must publish
// the table with a row filter; its filter is not compared (changing the number of partitions
// means new publication names, see PartitionPublication).
func createPartitions(ctx context.Context, tx pgx.Tx, o Options, table string) ([]string, error) {
	var version int
	if err := tx.QueryRow(ctx, `SELECT current_setting('server_version_num')::int`).Scan(&version); err != nil {
		return nil, fmt.Errorf("read server version: %w", err)
	}
	if version < 150000 {
		return nil, fmt.Errorf("--partitions needs publication row filters, which Postgres %d.%d lacks: upgrade to Postgres 15 or later, or run one relay", version/10000, version%10000/100)
	}
	var created []string
	for i := 0; i < o.Partitions; i++ {
		name := PartitionPublication(o.Publication, i, o.Partitions)
		p, exists, err := pgcatalog.ReadPublication(ctx, tx, name)
		t, published := p.Table(o.Schema, o.Table)
		filtered := published && t.RowFilter
		if err != nil {
			return nil, fmt.Errorf("look up publication %s: %w", name, err)
		}
		switch {
		case exists && filtered:
			continue
		case exists:
			return nil, fmt.Errorf("publication %s exists but does not publish %s with a row filter: drop it (DROP PUBLICATION %s) and run migrate again", name, table, pgx.Identifier{name}.Sanitize())
		}
		sql := fmt.Sprintf(`CREATE PUBLICATION %s FOR TABLE %s WHERE (%s) WITH (publish = 'insert')`,
			pgx.Identifier{name}.Sanitize(), table, PartitionFilterOn(o.AggregateIDColumn, o.Partitions, i))
		if _, err := tx.Exec(ctx, sql); err != nil {
			return nil, fmt.Errorf("create publication %s: %w", name, err)
		}
		created = append(created, name)
	}
	return created, nil
}

// PublicationSQL is the statement that creates the publication the relay reads.
func PublicationSQL(o Options) string {
	o.fill()
	return fmt.Sprintf(`CREATE PUBLICATION %s FOR TABLE %s WITH (publish = 'insert');`,
		pgx.Identifier{o.Publication}.Sanitize(), pgx.Identifier{o.Schema, o.Table}.Sanitize())
}
