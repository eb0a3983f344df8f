package main

import (
	"bytes"
	"context"
	"flag"
	"net"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/relay"
)

// A taken --http-addr port stops the relay before it changes anything (here: before it
// creates the slot it was asked to create), with an error that names the flag and the way out.
func TestHTTP_PortInUseRefusesBeforeCreatingTheSlot(t *testing.T) {
	e := newEnv(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer taken.Close()
	addr := taken.Addr().String()
	var out bytes.Buffer
	err = dispatch(context.Background(), e.args("--http-addr", addr), &out, &out, noEnv)
	require.Error(t, err)
	msg := err.Error()
	for _, want := range []string{"--http-addr " + addr, "already in use", "did not start", "--http-addr off"} {
		require.Contains(t, msg, want)
	}
	var slots int
	require.NoError(t, e.pg.QueryRow(t, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outbox_relay'`).Scan(&slots))
	require.Zero(t, slots, "the relay created its slot although it could not serve --http-addr")
}

// The default port is not postgres_exporter's 9187 (nor any port of the Prometheus exporter
// range 9100-9999), which the relay often runs next to.
func TestRun_DefaultHTTPAddrIsOutsideTheExporterRange(t *testing.T) {
	var out bytes.Buffer
	err := dispatch(context.Background(), []string{"run", "--help"}, &out, &out, noEnv)
	require.ErrorIs(t, err, flag.ErrHelp)
	require.Contains(t, out.String(), `(default ":`+relay.DefaultHTTPPort+`")`)
	require.False(t, strings.HasPrefix(relay.DefaultHTTPPort, "9") && len(relay.DefaultHTTPPort) == 4, relay.DefaultHTTPPort)
}
