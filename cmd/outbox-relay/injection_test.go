package main

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// Identifiers end up in SQL run as multi-statement simple protocol. A control character in
// one (a newline used to end a comment of the migration SQL and run what follows) is refused
// before anything runs, by every command, and the victim table survives.
func TestMigrate_RefusesControlCharactersInIdentifiers(t *testing.T) {
	pg := testenv.Postgres(t)
	const inject = "\nDROP TABLE victim;\n--"
	for _, c := range []struct {
		name string
		args []string
		flag string
		want string // in the error; "" means "control character"
	}{
		{"migrate table", []string{"migrate", "--table", "public.x" + inject}, "--table", ""},
		{"migrate schema", []string{"migrate", "--table", "s" + inject + ".x"}, "--table", ""},
		{"migrate publication", []string{"migrate", "--publication", "p" + inject}, "--publication", ""},
		{"migrate messages schema", []string{"migrate", "--source", "messages", "--table", "s" + inject + ".x"}, "--table", ""},
		{"run slot", []string{"run", "--slot", "s\tx"}, "--slot", ""},
		{"run slot with SQL", []string{"run", "--slot", "s LOGICAL 0/0; DROP TABLE victim"}, "--slot", "only lower case letters"},
		{"slot create with SQL", []string{"slot", "create", "--slot", "s; DROP TABLE victim"}, "--slot", "only lower case letters"},
		{"run column", []string{"run", "--column-payload", "body\r"}, "--column-payload", ""},
		{"prune table", []string{"prune", "--older-than", "72h", "--table", "x\x00y"}, "--table", ""},
		{"publication create", []string{"publication", "create", "--publication", "p" + inject}, "--publication", ""},
	} {
		if c.want == "" {
			c.want = "control character"
		}
		t.Run(c.name, func(t *testing.T) {
			pg.Exec(t, `CREATE TABLE IF NOT EXISTS victim (x int)`)
			var out bytes.Buffer
			args := append(c.args, "--pg-url", pg.URL, "--log-level", "warn")
			err := dispatch(context.Background(), args, &out, &out, noEnv)
			require.Error(t, err, "output: %s", out.String())
			require.ErrorContains(t, err, c.flag)
			require.ErrorContains(t, err, c.want)
			var n int
			require.NoError(t, pg.QueryRow(t, `SELECT count(*) FROM victim`).Scan(&n), "the victim table survives")
		})
	}
}
