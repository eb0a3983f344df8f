package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// The relay binary, given unreachable or malformed URLs/DSNs with secrets in every form they
// take, exits with an error that names what failed, and no secret appears on stdout or
// stderr (Postgres' and NATS' client libraries echo connection strings in some errors).
func TestBinary_SecretsNeverPrinted(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := relayBinary(t)
	secrets := []string{"PGuserinfoSECRET", "PGquerySECRET", "PGsslSECRET", "DSN spaced SECRET", "DSNparseSECRET",
		"PGparseSECRET", "NATSpwSECRET", "NATStokenSECRET", "SchemelessSECRET", "BadURLSECRET", "ListSECRET", "FlagPwSECRET", "ConfigSECRET"}
	config := filepath.Join(t.TempDir(), "relay.yaml")
	require.NoError(t, os.WriteFile(config, []byte("pg-url: \"host=127.0.0.1 port=1 user=app dbname=app sslmode=disable password = 'ConfigSECRET'\"\n"), 0o600))
	for _, c := range []struct {
		name string
		args []string
		env  []string
		want string // in the output: the failure is reported
	}{
		{"pg URL userinfo, query password and sslpassword; NATS user:pass and token list", []string{"run",
			"--pg-url", "postgres://app:PGuserinfoSECRET@127.0.0.1:1/app?sslpassword=PGsslSECRET&password=PGquerySECRET&sslmode=disable",
			"--nats-url", "nats://natsuser:NATSpwSECRET@127.0.0.1:1,nats://NATStokenSECRET@127.0.0.1:2"}, nil, "preflight"},
		{"DSN with spaces and quotes; schemeless NATS user:pass", []string{"run",
			"--pg-url", "host=127.0.0.1 port=1 user=app password = 'DSN spaced SECRET' dbname=app sslmode=disable",
			"--nats-url", "natsuser:SchemelessSECRET@127.0.0.1:1"}, nil, "preflight"},
		{"unparsable DSN and NATS URL", []string{"run",
			"--pg-url", "host=127.0.0.1 port=notaport password = DSNparseSECRET",
			"--nats-url", "nats://u:BadURLSECRET@127.0.0.1:notaport"}, nil, "--pg-url"},
		{"unparsable Postgres URL, json log", []string{"run", "--log-format", "json",
			"--pg-url", "postgres://app:PGparseSECRET@127.0.0.1:notaport/app",
			"--nats-url", "127.0.0.1:1,u:ListSECRET@127.0.0.1:2"}, nil, "--pg-url"},
		{"migrate, unparsable URL", []string{"migrate", "--pg-url", "postgres://app:PGparseSECRET@127.0.0.1:notaport/app"}, nil, "--pg-url"},
		{"migrate, unreachable", []string{"migrate", "--pg-url", "postgres://app@127.0.0.1:1/app?password=PGquerySECRET&sslmode=disable"}, nil, "connect"},
		{"backfill", []string{"backfill", "--since", "2020-01-01T00:00:00Z",
			"--pg-url", "host=127.0.0.1 port=notaport password = DSNparseSECRET", "--nats-url", "NATStokenSECRET@127.0.0.1:1"}, nil, "--pg-url"},
		{"environment and flag password", []string{"run", "--nats-user", "u", "--nats-password", "FlagPwSECRET", "--nats-url", "nats://127.0.0.1:1"},
			[]string{"OUTBOX_RELAY_PG_URL=postgres://app:PGuserinfoSECRET@127.0.0.1:1/app?sslmode=disable"}, "preflight"},
		{"config file", []string{"run", "--config", config, "--nats-url", "nats://NATStokenSECRET@127.0.0.1:1"}, nil, "preflight"},
	} {
		t.Run(c.name, func(t *testing.T) {
			cmd := exec.Command(bin, append(c.args, "--http-addr", "off")...)
			if c.args[0] != "run" {
				cmd = exec.Command(bin, c.args...)
			}
			cmd.Env = append(os.Environ(), c.env...)
			out, err := cmd.CombinedOutput()
			require.Error(t, err, "%s", out)
			require.Contains(t, string(out), c.want)
			for _, s := range secrets {
				assert.False(t, strings.Contains(string(out), s), "output shows %q:\n%s", s, out)
			}
		})
	}
}

// After a reconnect the relay logs the server's URL without its token, also a token too short
// for the output filter (nats.go's ConnectedUrlRedacted hides only a password).
func TestRelay_ReconnectLogHidesTheToken(t *testing.T) {
	e := &env{pg: newEnvPG(t)}
	port := testenv.FreePort(t)
	opts := server.Options{Host: "127.0.0.1", Port: port, JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true, Authorization: "t0k"}
	start := func() *server.Server {
		o := opts
		s, err := server.NewServer(&o)
		require.NoError(t, err)
		go s.Start()
		require.True(t, s.ReadyForConnections(10*time.Second))
		return s
	}
	s := start()
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	url := fmt.Sprintf("nats://t0k@127.0.0.1:%d", port)
	_, log := inProcess(t, []string{"run", "--pg-url", e.pg.URL, "--nats-url", url, "--create-slot", "--log-format", "json"})
	waitStreaming(t, e.pg, "outbox_relay")
	s.Shutdown()
	s.WaitForShutdown()
	s = start()
	require.Eventually(t, func() bool { return strings.Contains(log.String(), "reconnected to NATS") }, 30*time.Second, 20*time.Millisecond)
	for _, line := range strings.Split(log.String(), "\n") {
		if strings.Contains(line, "reconnected to NATS") {
			require.Contains(t, line, fmt.Sprintf("nats://xxxxx@127.0.0.1:%d", port))
		}
	}
	require.NotContains(t, log.String(), "t0k@")
}
