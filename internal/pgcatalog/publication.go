// Package pgcatalog reads the Postgres catalog objects the relay depends on, one reader per
// object, for the relay, its preflight and the migrations alike.
package pgcatalog

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// Querier is a connection or a transaction.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// Publication is a publication as the catalog has it.
type Publication struct {
	Name      string   `json:"name"`
	Owner     string   `json:"owner"`
	AllTables bool     `json:"all_tables"`
	Insert    bool     `json:"insert"`
	Update    bool     `json:"update"`
	Delete    bool     `json:"delete"`
	Truncate  bool     `json:"truncate"`
	Tables    []string `json:"tables"` // schema.table, sorted

	tables []PublishedTable
}

// PublishedTable is a table a publication publishes.
type PublishedTable struct {
	Schema, Table string
	// RowFilter: the publication publishes only the rows a WHERE clause selects (Postgres 15+).
	RowFilter bool
}

// Table reports whether the publication publishes schema.table, and how.
func (p Publication) Table(schema, table string) (PublishedTable, bool) {
	for _, t := range p.tables {
		if t.Schema == schema && t.Table == table {
			return t, true
		}
	}
	return PublishedTable{}, false
}

// ReadPublication reads the publication name; ok is false when it does not exist. Its errors
// say which read failed.
func ReadPublication(ctx context.Context, q Querier, name string) (p Publication, ok bool, err error) {
	p = Publication{Name: name, Tables: []string{}}
	err = q.QueryRow(ctx, `SELECT pg_get_userbyid(pubowner)::text, puballtables, pubinsert, pubupdate, pubdelete, pubtruncate
		FROM pg_publication WHERE pubname = $1`, name).Scan(&p.Owner, &p.AllTables, &p.Insert, &p.Update, &p.Delete, &p.Truncate)
	if errors.Is(err, pgx.ErrNoRows) {
		return p, false, nil
	}
	if err != nil {
		return p, false, fmt.Errorf("read publication %q: %w", name, err)
	}
	// rowfilter exists from Postgres 15 on: read through to_jsonb, null before.
	rows, err := q.Query(ctx, `SELECT t.schemaname::text, t.tablename::text, to_jsonb(t) ->> 'rowfilter' IS NOT NULL
		FROM pg_publication_tables t WHERE t.pubname = $1 ORDER BY t.schemaname || '.' || t.tablename`, name)
	if err != nil {
		return p, true, fmt.Errorf("read the tables of publication %q: %w", name, err)
	}
	defer rows.Close()
	for rows.Next() {
		var t PublishedTable
		if err := rows.Scan(&t.Schema, &t.Table, &t.RowFilter); err != nil {
			return p, true, err
		}
		p.tables = append(p.tables, t)
		p.Tables = append(p.Tables, t.Schema+"."+t.Table)
	}
	return p, true, rows.Err()
}
