package main

import (
	"context"
	"net/url"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/sink"
)

// relayNATSPermissions are the README's minimal NATS permissions of the relay's user, for the
// default stream, subject prefix and position bucket.
func relayNATSPermissions() *server.Permissions {
	return &server.Permissions{
		Publish: &server.SubjectPermission{Allow: []string{
			"outbox.>",
			"$JS.API.INFO",
			"$JS.API.STREAM.INFO.OUTBOX",
			"$JS.API.STREAM.CREATE.OUTBOX",
			"$JS.API.STREAM.MSG.GET.OUTBOX",
			"$JS.API.STREAM.INFO.KV_outbox_relay_positions",
			"$JS.API.STREAM.CREATE.KV_outbox_relay_positions",
			"$JS.API.DIRECT.GET.KV_outbox_relay_positions.>",
			"$KV.outbox_relay_positions.>",
		}},
		Subscribe: &server.SubjectPermission{Allow: []string{"_INBOX.>"}},
	}
}

// The README's minimal privileges work end to end: a Postgres role with REPLICATION and SELECT
// on the outbox table only (the table migrated by its owner), and a NATS user allowed exactly
// the subjects the README lists. Everything published arrives once, in order.
func TestMinimalPrivileges(t *testing.T) {
	natsURL := startNATS(t, server.Options{Users: []*server.User{
		{Username: "relay", Password: "relay-pw", Permissions: relayNATSPermissions()},
		{Username: "admin", Password: "admin-pw"},
	}})
	pg := testenv.Postgres(t)
	e := &env{pg: pg}
	e.migrate(t) // as the owner
	pg.Exec(t, `DO $$ BEGIN CREATE ROLE outbox_relay_min LOGIN REPLICATION; EXCEPTION WHEN duplicate_object THEN NULL; END $$`)
	pg.Exec(t, `GRANT CONNECT ON DATABASE `+pg.DBName+` TO outbox_relay_min`)
	pg.Exec(t, `GRANT SELECT ON public.outbox TO outbox_relay_min`)
	u, err := url.Parse(pg.URL)
	require.NoError(t, err)
	u.User = url.User("outbox_relay_min")

	args := []string{"run", "--pg-url", u.String(), "--nats-url", natsURL, "--nats-user", "relay", "--nats-password", "relay-pw", "--create-slot",
		"--log-format", "json", "--log-level", "debug", "--http-addr", "127.0.0.1:0"}
	stop, log := inProcess(t, args)
	waitStreaming(t, pg, "outbox_relay")
	n := workload{Writers: 2, Aggregates: 5, Txs: 10, MaxTx: 5, Seed: 9}.run(t, pg)
	admin := "nats://admin:admin-pw@" + natsURL[len("nats://"):]
	require.Eventually(t, func() bool { return streamCount(t, admin) >= uint64(n) }, 30*time.Second, 50*time.Millisecond)
	require.NoError(t, stop())
	require.NotContains(t, log.String(), "Permissions Violation")
	requireClean(t, check(t, outboxRows(t, pg), readStream(t, admin, sink.DefaultStream)))

	// The relay's user cannot publish outside its subjects: another prefix is refused.
	nc, err := nats.Connect(natsURL, nats.UserInfo("relay", "relay-pw"), nats.ErrorHandler(func(*nats.Conn, *nats.Subscription, error) {}))
	require.NoError(t, err)
	defer nc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = nc.RequestWithContext(ctx, "$JS.API.STREAM.DELETE.OUTBOX", nil)
	require.Error(t, err, "the relay's user may delete the stream")
}
