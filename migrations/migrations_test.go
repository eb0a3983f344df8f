package migrations

import (
	"context"
	"io/fs"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// A placeholder in a -- comment would put the (quoted) name into the comment, where a line
// break in it ends the comment and runs the rest as SQL. Placeholders stay in code.
func TestTemplates_PlaceholdersOutsideComments(t *testing.T) {
	names, err := fs.Glob(files, "*.sql")
	require.NoError(t, err)
	require.NotEmpty(t, names)
	for _, name := range names {
		b, err := files.ReadFile(name)
		require.NoError(t, err)
		for i, line := range strings.Split(string(b), "\n") {
			if c := strings.Index(line, "--"); c >= 0 {
				require.NotContains(t, line[c:], "{{", "%s:%d: placeholder in a comment", name, i+1)
			}
			if c := strings.Index(line, "/*"); c >= 0 {
				require.NotContains(t, line[c:], "{{", "%s:%d: placeholder in a comment", name, i+1)
			}
		}
	}
}

func TestCheckIdentifier(t *testing.T) {
	for _, ok := range []string{"outbox", "public", "Outbox Table", "ünïcode", `a"b`, "x--y"} {
		require.NoError(t, CheckIdentifier("table", ok), ok)
	}
	for _, bad := range []string{"x\nDROP TABLE victim;\n--", "a\rb", "a\tb", "a\x00b", "a\x7fb"} {
		require.ErrorContains(t, CheckIdentifier("table", bad), "control character", "%q", bad)
	}
}

// The library entry point refuses the names too, against a real Postgres: the victim table
// survives.
func TestApply_RefusesControlCharacters(t *testing.T) {
	pg := testenv.Postgres(t)
	pg.Exec(t, `CREATE TABLE victim (x int)`)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, pg.URL)
	require.NoError(t, err)
	defer conn.Close(ctx)
	const inject = "\nDROP TABLE victim;\n--"
	for _, o := range []Options{
		{Table: "x" + inject},
		{Schema: "s" + inject},
		{Publication: "p" + inject},
		{Schema: "s" + inject, Messages: true},
	} {
		_, err := Apply(ctx, conn, o)
		require.ErrorContains(t, err, "control character")
		var n int
		require.NoError(t, conn.QueryRow(ctx, `SELECT count(*) FROM victim`).Scan(&n))
	}
	_, err = Apply(ctx, conn, Options{Table: "x y\"z"}) // odd but printable names still work
	require.NoError(t, err)
}

func TestMain(m *testing.M) { testenv.Main(m) }
