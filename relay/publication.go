package relay

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/internal/pgcatalog"
	"github.com/outbox-relay/outbox-relay/migrations"
)

// PublicationChange is what CreatePublication changed.
type PublicationChange int

const (
	PublicationUnchanged  PublicationChange = iota // it already published the table's inserts
	PublicationCreated                             // created, publishing the table's inserts
	PublicationTableAdded                          // the table was added to the existing publication
)

// CreatePublication creates the publication of schema.table's inserts, or adds the table to an
// existing one. It changes nothing when both are in place.
func CreatePublication(ctx context.Context, conn *pgx.Conn, publication, schema, table string) (PublicationChange, error) {
	qt := pgx.Identifier{schema, table}.Sanitize()
	var exists bool
	if err := conn.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, qt).Scan(&exists); err != nil {
		return PublicationUnchanged, fmt.Errorf("look up table %s: %w", qt, err)
	}
	if !exists {
		return PublicationUnchanged, fmt.Errorf("table %s does not exist: create it first (outbox-relay migrate creates the default outbox table)", qt)
	}
	p, err := ReadPublication(ctx, conn, publication)
	pub := pgx.Identifier{publication}.Sanitize()
	switch {
	case errors.Is(err, ErrNoPublication):
		if _, err := conn.Exec(ctx, migrations.PublicationSQL(migrations.Options{Schema: schema, Table: table, Publication: publication})); err != nil {
			return PublicationUnchanged, fmt.Errorf("create publication %s: %w (run it as the table's owner)", pub, err)
		}
		return PublicationCreated, nil
	case err != nil:
		return PublicationUnchanged, err
	}
	for _, t := range p.Tables {
		if t == schema+"."+table || p.AllTables {
			if !p.Insert {
				return PublicationUnchanged, fmt.Errorf("publication %q includes %s but does not publish inserts: ALTER PUBLICATION %s SET (publish = 'insert');", publication, qt, pub)
			}
			return PublicationUnchanged, nil
		}
	}
	if _, err := conn.Exec(ctx, fmt.Sprintf(`ALTER PUBLICATION %s ADD TABLE %s`, pub, qt)); err != nil {
		return PublicationUnchanged, fmt.Errorf("add %s to publication %s: %w (run it as the owner of both)", qt, pub, err)
	}
	return PublicationTableAdded, nil
}

// ErrNoPublication: the publication does not exist.
var ErrNoPublication = errors.New("publication does not exist")

// Publication is a publication as the catalog has it.
type Publication = pgcatalog.Publication

// ReadPublication reads the publication name; ErrNoPublication when it does not exist.
func ReadPublication(ctx context.Context, conn *pgx.Conn, name string) (Publication, error) {
	p, ok, err := pgcatalog.ReadPublication(ctx, conn, name)
	if err == nil && !ok {
		return p, fmt.Errorf("%w: %q (create it with outbox-relay publication create)", ErrNoPublication, name)
	}
	return p, err
}

// DropPublication drops the publication name; existed false when there was none. A relay
// reading it stops with an error naming it.
func DropPublication(ctx context.Context, conn *pgx.Conn, name string) (existed bool, err error) {
	pub := pgx.Identifier{name}.Sanitize()
	if _, err := conn.Exec(ctx, `DROP PUBLICATION `+pub); err != nil {
		if isPgCode(err, "42704") {
			return false, nil
		}
		return true, fmt.Errorf("drop publication %s: %w", pub, err)
	}
	return true, nil
}

func isPgCode(err error, code string) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == code
}
