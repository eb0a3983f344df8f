package main

import (
	"os"
	"os/user"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// sslCluster starts a private cluster with ssl = on and a server certificate signed by a CA
// generated here; it returns the cluster and the PKI.
func sslCluster(t *testing.T) (*testenv.Cluster, pki) {
	t.Helper()
	// Not t.TempDir(): its parent is 0700, and Postgres runs as the postgres user when the
	// tests run as root. The key must belong to the server's user with mode 0600.
	dir, err := os.MkdirTemp("", "outbox-relay-pgtls-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	p := newPKI(t, dir)
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		require.NoError(t, err)
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		for _, f := range []string{p.ServerCert, p.ServerKey, p.CA} {
			require.NoError(t, os.Chown(f, uid, gid))
		}
	}
	c := testenv.NewCluster(t, testenv.WithConfig("ssl = on", "log_connections = on",
		"ssl_cert_file = '"+p.ServerCert+"'", "ssl_key_file = '"+p.ServerKey+"'"))
	return c, p
}

// withSSL replaces testenv's sslmode=disable with the given libpq parameters.
func withSSL(url, params string) string {
	return strings.Replace(url, "sslmode=disable", params, 1)
}

func TestRelay_PostgresVerifyFull(t *testing.T) {
	c, p := sslCluster(t)
	pg := c.NewDatabase(t)
	(&env{pg: pg}).migrate(t)
	url := startNATS(t, server.Options{})
	pgURL := withSSL(pg.URL, "sslmode=verify-full&sslrootcert="+p.CA)

	logFrom := len(c.Log()) // migrate's own connection was not over TLS
	stop, _ := inProcess(t, []string{"run", "--pg-url", pgURL, "--nats-url", url, "--create-slot", "--log-format", "json", "--http-addr", "off"})
	waitStreaming(t, pg, "outbox_relay")
	pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
		SELECT 'order', g::text, 'Created', '{}' FROM generate_series(1, 3) g`)
	require.Eventually(t, func() bool { return streamCount(t, url) == 3 }, 30*time.Second, 50*time.Millisecond)
	require.NoError(t, stop())

	// Both kinds of the relay's connections were encrypted: the walsender (replication.Connect,
	// pgconn.ParseConfig) and the query connections (connectPG, pgx.ParseConfig).
	var repl, query int
	for _, line := range strings.Split(c.Log()[logFrom:], "\n") {
		if !strings.Contains(line, "connection authorized") || !strings.Contains(line, "application_name=outbox-relay") {
			continue
		}
		require.Contains(t, line, "SSL enabled", "a relay connection without TLS")
		if strings.Contains(line, "replication connection") {
			repl++
		} else {
			query++
		}
	}
	require.NotZero(t, repl, "no replication connection logged:\n%s", c.Log())
	require.NotZero(t, query, "no query connection logged")
	t.Logf("relay connections over TLS: %d replication, %d query", repl, query)
	// A CA that did not sign the server's certificate: preflight says which parameter to fix.
	other := newPKI(t, t.TempDir())
	msg, _ := runPreflight(t, "--pg-url", withSSL(pg.URL, "sslmode=verify-full&sslrootcert="+other.CA), "--nats-url", url)
	require.Contains(t, msg, "not signed by the CA in sslrootcert. Fix: set sslrootcert=<CA PEM file> in --pg-url")
}
