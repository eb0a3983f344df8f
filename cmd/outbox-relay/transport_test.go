package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"
)

// transportFlags is the subset of run's flags checkTransport reads.
func transportFlags(t *testing.T, args ...string) *flag.FlagSet {
	t.Helper()
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.String("pg-url", "", "")
	fs.String("nats-url", nats.DefaultURL, "")
	for _, name := range []string{"nats-password", "nats-password-file", "nats-token", "nats-token-file", "nats-tls-ca", "nats-tls-cert"} {
		fs.String(name, "", "")
	}
	fs.Bool("embedded-nats", false, "")
	require.NoError(t, fs.Parse(args))
	return fs
}

func TestCheckTransport_WarnsOrRefuses(t *testing.T) {
	noPGEnv := func(string) string { return "" }
	for _, c := range []struct {
		name        string
		args        []string
		pgsslmode   string
		warn, refus string // substrings; "" means none
	}{
		{"no sslmode: prefer", []string{"--pg-url", "postgres://app@db.example:5432/app"}, "", "libpq's default applies: prefer", "--require-tls: the Postgres connection to db.example"},
		{"DSN without sslmode", []string{"--pg-url", "host=db.example user=app"}, "", "libpq's default applies: prefer", "sslmode=verify-full"},
		{"sslmode=require", []string{"--pg-url", "postgres://app@db.example/app?sslmode=require"}, "", "sslmode=require (--pg-url) encrypts without checking", "sslmode=require"},
		{"sslmode=disable", []string{"--pg-url", "host=db.example sslmode = disable"}, "", "plain text", "sslmode=disable"},
		{"PGSSLMODE=require", []string{"--pg-url", "postgres://app@db.example/app"}, "require", "sslmode=require (PGSSLMODE)", "PGSSLMODE"},
		{"PGSSLMODE=verify-full", []string{"--pg-url", "postgres://app@db.example/app"}, "verify-full", "", ""},
		{"verify-full", []string{"--pg-url", "postgres://app@db.example/app?sslmode=verify-full"}, "", "", ""},
		{"verify-ca", []string{"--pg-url", "host=db.example sslmode=verify-ca"}, "", "", ""},
		{"multi-host, one remote", []string{"--pg-url", "postgres://app@127.0.0.1,db.example/app"}, "", "to db.example", "db.example"},
		{"loopback", []string{"--pg-url", "postgres://app@127.0.0.1:5432/app"}, "", "", ""},
		{"localhost", []string{"--pg-url", "host=localhost sslmode=disable"}, "", "", ""},
		{"unix socket", []string{"--pg-url", "host=/var/run/postgresql"}, "", "", ""},
		{"NATS password over nats://", []string{"--pg-url", "postgres://127.0.0.1/app", "--nats-url", "nats://u:pw@nats.example:4222"}, "", "the NATS password or token goes to nats://nats.example:4222", "--require-tls: the NATS connection to nats://nats.example:4222"},
		{"NATS token flag, schemeless", []string{"--pg-url", "postgres://127.0.0.1/app", "--nats-url", "nats.example:4222", "--nats-token", "tok"}, "", "the NATS password or token", "nats.example"},
		{"NATS password file", []string{"--pg-url", "postgres://127.0.0.1/app", "--nats-url", "nats://nats.example", "--nats-password-file", "/f"}, "", "the NATS password or token", "nats.example"},
		{"NATS without secret", []string{"--pg-url", "postgres://127.0.0.1/app", "--nats-url", "nats://nats.example"}, "", "", "--require-tls: the NATS connection"},
		{"NATS tls://", []string{"--pg-url", "postgres://127.0.0.1/app", "--nats-url", "tls://u:pw@nats.example"}, "", "", ""},
		{"NATS --nats-tls-ca", []string{"--pg-url", "postgres://127.0.0.1/app", "--nats-url", "nats://u:pw@nats.example", "--nats-tls-ca", "/ca.pem"}, "", "", ""},
		{"NATS list, one plain", []string{"--pg-url", "postgres://127.0.0.1/app", "--nats-url", "tls://a.example,nats://tok@b.example"}, "", "nats://b.example", "nats://b.example"},
		{"NATS loopback", []string{"--pg-url", "postgres://127.0.0.1/app", "--nats-url", "nats://u:pw@127.0.0.1:4222"}, "", "", ""},
		{"embedded NATS", []string{"--pg-url", "postgres://127.0.0.1/app", "--nats-url", "nats://nats.example", "--embedded-nats"}, "", "", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			getenv := noPGEnv
			if c.pgsslmode != "" {
				getenv = func(k string) string {
					if k == "PGSSLMODE" {
						return c.pgsslmode
					}
					return ""
				}
			}
			r := checkTransport(transportFlags(t, c.args...), false, getenv)
			require.Empty(t, r.refusals)
			if c.warn == "" {
				require.Empty(t, r.warnings)
			} else {
				require.Len(t, r.warnings, 1)
				require.Contains(t, r.warnings[0], c.warn)
				require.Contains(t, r.warnings[0], "Fix:")
				require.NotContains(t, r.warnings[0], ":pw@")
			}
			r = checkTransport(transportFlags(t, c.args...), true, getenv)
			require.Empty(t, r.warnings)
			if c.refus == "" {
				require.Empty(t, r.refusals)
			} else {
				require.Len(t, r.refusals, 1)
				require.Contains(t, r.refusals[0], c.refus)
				require.Contains(t, r.refusals[0], "Fix:")
			}
		})
	}
}

// localIP returns an address of this host that is not loopback (nothing listens on it: a
// connection is refused at once), or skips the test.
func localIP(t *testing.T) string {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	require.NoError(t, err)
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && !ipn.IP.IsLoopback() && ipn.IP.To4() != nil {
			return ipn.IP.String()
		}
	}
	t.Skip("no non-loopback IPv4 address")
	return ""
}

// The relay warns at start, naming the fix, and goes on; with --require-tls it refuses
// before connecting (usage error, exit 2).
func TestRun_TransportWarningAndRequireTLS(t *testing.T) {
	ip := localIP(t)
	pgURL := "postgres://app:pw-warn-1234@" + ip + ":1/app"
	natsURL := "nats://relay:natspw-5678@" + ip + ":1"
	var out bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := dispatch(ctx, []string{"run", "--pg-url", pgURL, "--nats-url", natsURL, "--http-addr", "off", "--log-format", "json"}, &out, &out, noEnv)
	var pe *PreflightError
	require.ErrorAs(t, err, &pe, "the relay went on to connect; log: %s", out.String())
	log := out.String()
	require.Contains(t, log, `"level":"warn"`)
	require.Contains(t, log, "libpq's default applies: prefer")
	require.Contains(t, log, "the NATS password or token goes to nats://"+ip+":1")
	require.Contains(t, log, "Fix: add sslmode=verify-full")
	require.NotContains(t, log+err.Error(), "pw-warn-1234")
	require.NotContains(t, log+err.Error(), "natspw-5678")

	out.Reset()
	err = dispatch(ctx, []string{"run", "--pg-url", pgURL, "--nats-url", natsURL, "--http-addr", "off", "--require-tls"}, &out, &out, noEnv)
	var ue usageError
	require.ErrorAs(t, err, &ue, "%v", err)
	require.Contains(t, err.Error(), "--require-tls: the Postgres connection to "+ip)
	require.Contains(t, err.Error(), "--require-tls: the NATS connection to nats://"+ip+":1")
	require.NotContains(t, out.String(), "connect to", "refused before connecting")

	// Every command has the flag.
	for _, cmd := range [][]string{{"migrate"}, {"slot", "list"}, {"publication", "show"}, {"prune", "--older-than", "1h"}, {"backfill", "--since", "2020-01-01T00:00:00Z"}} {
		out.Reset()
		err := dispatch(ctx, append(cmd, "--pg-url", pgURL, "--require-tls"), &out, &out, noEnv)
		require.ErrorAs(t, err, &ue, "%v: %v", cmd, err)
		require.Contains(t, err.Error(), "--require-tls: the Postgres connection", "%v", cmd)
	}
}

func TestRun_WarnsAboutSecretFilesOthersCanRead(t *testing.T) {
	dir := t.TempDir()
	pwFile := filepath.Join(dir, "nats-pw")
	require.NoError(t, os.WriteFile(pwFile, []byte("pw-from-file-4242\n"), 0o644))
	config := filepath.Join(dir, "relay.yaml")
	require.NoError(t, os.WriteFile(config, []byte("stream: OUTBOX\n"), 0o640))
	passfile := filepath.Join(dir, "pgpass")
	require.NoError(t, os.WriteFile(passfile, []byte("*:*:*:*:pgpass-pw-99\n"), 0o644))
	if os.Geteuid() == 0 {
		// Group read is accepted on a root-owned file (below): these belong to a user.
		for _, f := range []string{pwFile, config, passfile} {
			require.NoError(t, os.Chown(f, 65534, 65534))
		}
	}
	args := []string{"run", "--pg-url", "postgres://app@127.0.0.1:1/app?sslmode=disable&passfile=" + passfile, "--nats-url", "nats://127.0.0.1:1",
		"--nats-user", "relay", "--nats-password-file", pwFile, "--config", config, "--http-addr", "off", "--log-format", "json"}
	var out bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := dispatch(ctx, args, &out, &out, noEnv)
	require.Error(t, err)
	log := out.String()
	require.Contains(t, log, "--nats-password-file "+pwFile+" is readable by group or others (mode 0644)")
	require.Contains(t, log, "--config "+config+" is readable by group or others (mode 0640)")
	require.Contains(t, log, "the passfile in --pg-url "+passfile+" is readable by group or others")
	require.Contains(t, log, "chmod 600")
	require.NotContains(t, log+err.Error(), "pw-from-file-4242")

	for _, f := range []string{pwFile, config, passfile} {
		require.NoError(t, os.Chmod(f, 0o600))
	}
	out.Reset()
	err = dispatch(ctx, args, &out, &out, noEnv)
	require.Error(t, err)
	require.NotContains(t, out.String(), "readable by group or others")

	// A Kubernetes secret volume with the pod's fsGroup: owned by root, mode 0440. Others
	// still may not read.
	if os.Geteuid() != 0 {
		return // only root can create root-owned files
	}
	for _, f := range []string{pwFile, config, passfile} {
		require.NoError(t, os.Chown(f, 0, 65534))
		require.NoError(t, os.Chmod(f, 0o440))
	}
	out.Reset()
	err = dispatch(ctx, args, &out, &out, noEnv)
	require.Error(t, err)
	require.NotContains(t, out.String(), "readable by group or others")
	require.NoError(t, os.Chmod(pwFile, 0o444))
	out.Reset()
	err = dispatch(ctx, args, &out, &out, noEnv)
	require.Error(t, err)
	require.Contains(t, out.String(), "--nats-password-file "+pwFile+" is readable by group or others (mode 0444)")
}

func TestRun_SecretFileFlagsAreChecked(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	require.NoError(t, os.WriteFile(empty, nil, 0o600))
	pw := filepath.Join(dir, "pw")
	require.NoError(t, os.WriteFile(pw, []byte("p4ssw0rd-file\n"), 0o600))
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--nats-user", "u", "--nats-password", "x", "--nats-password-file", pw}, "--nats-password-file and --nats-password exclude each other"},
		{[]string{"--nats-token", "x", "--nats-token-file", pw}, "--nats-token-file and --nats-token exclude each other"},
		{[]string{"--nats-user", "u", "--nats-password-file", filepath.Join(dir, "missing")}, "--nats-password-file: open"},
		{[]string{"--nats-token-file", empty}, "--nats-token-file " + empty + ": the file is empty"},
		{[]string{"--nats-password-file", pw, "--nats-token-file", pw}, "exclude each other"},
	} {
		var out bytes.Buffer
		err := dispatch(context.Background(), append([]string{"run", "--pg-url", "postgres://127.0.0.1:1/x", "--http-addr", "off"}, c.args...), &out, &out, noEnv)
		var ue usageError
		require.True(t, errors.As(err, &ue), "%v: %v", c.args, err)
		require.Contains(t, err.Error(), c.want)
		require.NotContains(t, err.Error()+out.String(), "p4ssw0rd-file")
	}
}

// The password and the token from a file authenticate against a real server.
func TestRelay_NATSPasswordAndTokenFiles(t *testing.T) {
	dir := t.TempDir()
	t.Run("password file", func(t *testing.T) {
		pwFile := filepath.Join(dir, "pw")
		require.NoError(t, os.WriteFile(pwFile, []byte("s3cret-file-pw\n"), 0o600))
		url := startNATS(t, server.Options{Username: "relay", Password: "s3cret-file-pw"})
		log, _ := relayThrough(t, url, []string{"--nats-user", "relay", "--nats-password-file", pwFile}, nats.UserInfo("relay", "s3cret-file-pw"))
		require.NotContains(t, log.String(), "s3cret-file-pw")
	})
	t.Run("token file", func(t *testing.T) {
		tokFile := filepath.Join(dir, "tok")
		require.NoError(t, os.WriteFile(tokFile, []byte("tok-file-8c2e\r\n"), 0o600))
		url := startNATS(t, server.Options{Authorization: "tok-file-8c2e"})
		log, _ := relayThrough(t, url, []string{"--nats-token-file", tokFile}, nats.Token("tok-file-8c2e"))
		require.False(t, strings.Contains(log.String(), "tok-file-8c2e"))
	})
}
