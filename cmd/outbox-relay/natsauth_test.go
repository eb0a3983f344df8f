package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/stretchr/testify/require"
)

func TestRelay_NATSUserPasswordFlags(t *testing.T) {
	url := startNATS(t, server.Options{Username: "relay", Password: "s3cret-pw"})

	// A wrong password stops preflight with the fix, and the password is nowhere in the output.
	msg, log := runPreflight(t, "--pg-url", newEnvPG(t).URL, "--nats-url", url, "--create-slot", "--nats-user", "relay", "--nats-password", "wrong-pw")
	require.Contains(t, msg, "NATS refused the credentials. Fix: check --nats-user/--nats-password")
	require.NotContains(t, msg+log, "wrong-pw")

	// The password from the environment, the way the README recommends.
	pg := newEnvPG(t)
	var out bytes.Buffer
	env := func(k string) (string, bool) {
		if k == envName("nats-password") {
			return "wrong-env-pw", true
		}
		return "", false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := dispatch(ctx, []string{"run", "--pg-url", pg.URL, "--nats-url", url, "--create-slot", "--http-addr", "off", "--nats-user", "relay"}, &out, &out, env)
	require.ErrorContains(t, err, "NATS refused the credentials")
	require.NotContains(t, err.Error()+out.String(), "wrong-env-pw")

	log2, _ := relayThrough(t, url, []string{"--nats-user", "relay", "--nats-password", "s3cret-pw"}, nats.UserInfo("relay", "s3cret-pw"))
	require.NotContains(t, log2.String(), "s3cret-pw")
}

func TestRelay_NATSTokenFlag(t *testing.T) {
	url := startNATS(t, server.Options{Authorization: "tok-3f9a1c"})
	msg, log := runPreflight(t, "--pg-url", newEnvPG(t).URL, "--nats-url", url, "--create-slot", "--nats-token", "tok-wrong-77")
	require.Contains(t, msg, "NATS refused the credentials")
	require.NotContains(t, msg+log, "tok-wrong-77")

	rlog, _ := relayThrough(t, url, []string{"--nats-token", "tok-3f9a1c"}, nats.Token("tok-3f9a1c"))
	require.NotContains(t, rlog.String(), "tok-3f9a1c")
}

func TestRelay_NATSNkeyFlag(t *testing.T) {
	kp, err := nkeys.CreateUser()
	require.NoError(t, err)
	pub, err := kp.PublicKey()
	require.NoError(t, err)
	seed, err := kp.Seed()
	require.NoError(t, err)
	seedFile := filepath.Join(t.TempDir(), "relay.nk")
	require.NoError(t, os.WriteFile(seedFile, seed, 0o600))
	url := startNATS(t, server.Options{Nkeys: []*server.NkeyUser{{Nkey: pub}}})

	// Another user's seed is refused.
	other, err := nkeys.CreateUser()
	require.NoError(t, err)
	otherSeed, err := other.Seed()
	require.NoError(t, err)
	otherFile := filepath.Join(t.TempDir(), "other.nk")
	require.NoError(t, os.WriteFile(otherFile, otherSeed, 0o600))
	msg, log := runPreflight(t, "--pg-url", newEnvPG(t).URL, "--nats-url", url, "--create-slot", "--nats-nkey", otherFile)
	require.Contains(t, msg, "NATS refused the credentials")
	require.NotContains(t, msg+log, string(otherSeed))

	opt, err := nats.NkeyOptionFromSeed(seedFile)
	require.NoError(t, err)
	rlog, _ := relayThrough(t, url, []string{"--nats-nkey", seedFile}, opt)
	require.NotContains(t, rlog.String(), string(seed))
}

// TestRelay_NATSCredsFlag runs the server in operator mode (trusted operator key, the
// account's JWT in a memory resolver, JetStream enabled in the account's limits) and the relay
// with a .creds file holding the user's JWT and seed.
func TestRelay_NATSCredsFlag(t *testing.T) {
	okp, err := nkeys.CreateOperator()
	require.NoError(t, err)
	opub, err := okp.PublicKey()
	require.NoError(t, err)
	akp, err := nkeys.CreateAccount()
	require.NoError(t, err)
	apub, err := akp.PublicKey()
	require.NoError(t, err)
	ac := jwt.NewAccountClaims(apub)
	ac.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: -1}
	ajwt, err := ac.Encode(okp)
	require.NoError(t, err)
	resolver := &server.MemAccResolver{}
	require.NoError(t, resolver.Store(apub, ajwt))

	creds := func(name string) string {
		ukp, err := nkeys.CreateUser()
		require.NoError(t, err)
		upub, err := ukp.PublicKey()
		require.NoError(t, err)
		useed, err := ukp.Seed()
		require.NoError(t, err)
		ujwt, err := jwt.NewUserClaims(upub).Encode(akp)
		require.NoError(t, err)
		b, err := jwt.FormatUserConfig(ujwt, useed)
		require.NoError(t, err)
		f := filepath.Join(t.TempDir(), name+".creds")
		require.NoError(t, os.WriteFile(f, b, 0o600))
		return f
	}
	// Operator mode needs a system account.
	skp, err := nkeys.CreateAccount()
	require.NoError(t, err)
	spub, err := skp.PublicKey()
	require.NoError(t, err)
	sjwt, err := jwt.NewAccountClaims(spub).Encode(okp)
	require.NoError(t, err)
	require.NoError(t, resolver.Store(spub, sjwt))
	url := startNATS(t, server.Options{TrustedKeys: []string{opub}, AccountResolver: resolver, SystemAccount: spub})

	good := creds("relay")
	rlog, pg := relayThrough(t, url, []string{"--nats-creds", good}, nats.UserCredentials(good))
	b, err := os.ReadFile(good)
	require.NoError(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "SU") {
			require.NotContains(t, rlog.String(), line, "the seed must not be logged")
		}
	}

	// A user signed by an account the operator does not know is refused.
	stranger, err := nkeys.CreateAccount()
	require.NoError(t, err)
	akp = stranger
	msg, _ := runPreflight(t, "--pg-url", pg.URL, "--nats-url", url, "--nats-creds", creds("stranger"))
	require.Contains(t, msg, "preflight check failed")
	require.Contains(t, msg, "NATS refused the credentials")
}

func TestRun_NATSAuthFlagsAreChecked(t *testing.T) {
	dir := t.TempDir()
	seed := filepath.Join(dir, "seed.nk")
	require.NoError(t, os.WriteFile(seed, []byte("not a seed"), 0o600))
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--nats-token", "t0k", "--nats-user", "u", "--nats-password", "p4ss"}, "--nats-user/--nats-password and --nats-token exclude each other"},
		{[]string{"--nats-creds", seed, "--nats-nkey", seed}, "--nats-creds and --nats-nkey exclude each other"},
		{[]string{"--nats-user", "u"}, "--nats-user and --nats-password go together"},
		{[]string{"--nats-password", "p4ss"}, "--nats-user and --nats-password go together"},
		{[]string{"--nats-tls-cert", seed}, "--nats-tls-cert and --nats-tls-key go together"},
		{[]string{"--nats-tls-ca", filepath.Join(dir, "missing.pem")}, "--nats-tls-ca: open"},
		{[]string{"--nats-tls-ca", seed}, "no PEM certificate"},
		{[]string{"--nats-creds", filepath.Join(dir, "missing.creds")}, "--nats-creds: stat"},
		{[]string{"--nats-nkey", seed}, "--nats-nkey " + seed},
		{[]string{"--nats-url", "nats://u:p4ss@127.0.0.1:1", "--nats-token", "t0k"}, "--nats-url carries credentials"},
		{[]string{"--embedded-nats", "--nats-token", "t0k"}, "--embedded-nats runs without authentication"},
	} {
		var out bytes.Buffer
		err := dispatch(context.Background(), append([]string{"run", "--pg-url", "postgres://127.0.0.1:1/x", "--http-addr", "off"}, c.args...), &out, &out, noEnv)
		require.Error(t, err, "%v", c.args)
		var ue usageError
		require.ErrorAs(t, err, &ue, "%v: %v", c.args, err)
		require.Contains(t, err.Error(), c.want)
		require.NotContains(t, err.Error()+out.String(), "p4ss")
		require.NotContains(t, err.Error()+out.String(), "t0k")
	}
}
