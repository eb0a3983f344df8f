package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
)

// The relay takes the Postgres password from libpq's password file, for its query and its
// replication connections alike: passfile= in --pg-url, or PGPASSFILE. The server requires a
// SCRAM password from the relay's role.
func TestRelay_PostgresPasswordFile(t *testing.T) {
	dir, err := os.MkdirTemp("", "outbox-relay-pgpass-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	hba := filepath.Join(dir, "pg_hba.conf")
	writeHBA := func(lines string) {
		require.NoError(t, os.WriteFile(hba, []byte(lines), 0o644))
		if os.Geteuid() == 0 {
			u, err := user.Lookup("postgres")
			require.NoError(t, err)
			uid, _ := strconv.Atoi(u.Uid)
			gid, _ := strconv.Atoi(u.Gid)
			require.NoError(t, os.Chown(hba, uid, gid))
		}
	}
	trust := "local all all trust\nhost all all 127.0.0.1/32 trust\n"
	writeHBA(trust)
	cluster := testenv.NewCluster(t, testenv.WithConfig("hba_file = '"+hba+"'", "password_encryption = 'scram-sha-256'"))
	e := &env{pg: cluster.NewDatabase(t), nats: natsembed.JetStream(t)}
	e.migrate(t)
	e.pg.Exec(t, `CREATE ROLE relay_pw LOGIN SUPERUSER PASSWORD 'pgpass-S3cret-77'`)
	writeHBA("host all relay_pw 127.0.0.1/32 scram-sha-256\n" + trust)
	e.pg.Exec(t, `SELECT pg_reload_conf()`)
	time.Sleep(200 * time.Millisecond) // the postmaster reloads asynchronously
	relayURL := strings.Replace(e.pg.URL, "postgres://postgres@", "postgres://relay_pw@", 1)

	// Without a password the server refuses the role.
	var out bytes.Buffer
	err = dispatch(context.Background(), []string{"slot", "list", "--pg-url", relayURL}, &out, &out, noEnv)
	require.Error(t, err)
	require.Contains(t, err.Error(), "password")

	passfile := filepath.Join(dir, "pgpass")
	require.NoError(t, os.WriteFile(passfile, []byte(fmt.Sprintf("127.0.0.1:%d:*:relay_pw:pgpass-S3cret-77\n", e.pg.Port)), 0o600))

	// passfile= in the URL.
	out.Reset()
	require.NoError(t, dispatch(context.Background(), []string{"slot", "list", "--pg-url", relayURL + "&passfile=" + passfile}, &out, &out, noEnv), out.String())

	// PGPASSFILE, for a whole run: both connections authenticate and events flow.
	t.Setenv("PGPASSFILE", passfile)
	stop, log := inProcess(t, []string{"run", "--pg-url", relayURL, "--nats-url", e.nats.URL, "--create-slot", "--log-format", "json"})
	waitStreaming(t, e.pg, "outbox_relay")
	insertEvents(t, e, "pw", 3)
	require.Eventually(t, func() bool { return streamMsgs(t, e.nats.URL, "OUTBOX") == 3 }, 30*time.Second, 20*time.Millisecond)
	require.NoError(t, stop())
	require.NotContains(t, log.String(), "pgpass-S3cret-77")
	require.NotContains(t, log.String(), "readable by group or others")
}
