package pgcatalog_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/pgcatalog"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func TestReadPublication(t *testing.T) {
	pg := testenv.Postgres(t)
	pg.Exec(t, `CREATE TABLE outbox (id int, k int); CREATE TABLE "a.b" (id int); CREATE SCHEMA a; CREATE TABLE a."b.c" (id int)`)
	pg.Exec(t, `CREATE PUBLICATION plain FOR TABLE outbox, "a.b" WITH (publish = 'insert, delete')`)
	pg.Exec(t, `CREATE PUBLICATION filtered FOR TABLE outbox WHERE (k > 0)`)
	pg.Exec(t, `CREATE PUBLICATION dotted FOR TABLE a."b.c"`)
	conn := pg.Conn(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	_, ok, err := pgcatalog.ReadPublication(ctx, conn, "missing")
	require.NoError(t, err)
	require.False(t, ok)

	p, ok, err := pgcatalog.ReadPublication(ctx, conn, "plain")
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, "postgres", p.Owner)
	require.True(t, p.Insert)
	require.True(t, p.Delete)
	require.False(t, p.Update)
	require.False(t, p.AllTables)
	require.Equal(t, []string{"public.a.b", "public.outbox"}, p.Tables)
	tb, ok := p.Table("public", "outbox")
	require.True(t, ok)
	require.False(t, tb.RowFilter)
	_, ok = p.Table("public.a", "b")
	require.False(t, ok)

	p, _, err = pgcatalog.ReadPublication(ctx, conn, "filtered")
	require.NoError(t, err)
	tb, ok = p.Table("public", "outbox")
	require.True(t, ok)
	require.True(t, tb.RowFilter)

	// Names with dots are told apart: "public"."a.b" is not "public.a"."b" nor "a"."b.c".
	p, _, err = pgcatalog.ReadPublication(ctx, conn, "dotted")
	require.NoError(t, err)
	_, ok = p.Table("a", "b.c")
	require.True(t, ok)
	_, ok = p.Table("public", "a.b")
	require.False(t, ok)

	// Inside a transaction too (the migrations read it there).
	tx, err := conn.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(ctx)
	_, ok, err = pgcatalog.ReadPublication(ctx, tx, "plain")
	require.NoError(t, err)
	require.True(t, ok)
}
