package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func writeConfig(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "relay.yaml")
	require.NoError(t, os.WriteFile(p, []byte(content), 0o600))
	return p
}

// Precedence: flag > environment > config file > default.
func TestConfigFile_PrecedenceFlagEnvFileDefault(t *testing.T) {
	e := newEnv(t)
	path := writeConfig(t, `
pg-url: `+e.pg.URL+`
nats_url: [`+e.nats.URL+`]
create-slot: true
stream: FROMFILE
subject-prefix: fromfile
max-in-flight: 8
http-addr: "off"
log-format: json
`)
	env := func(k string) (string, bool) {
		if k == "OUTBOX_RELAY_STREAM" {
			return "FROMENV", true
		}
		return "", false
	}
	log := &testLog{}
	dumpOnFailure(t, "relay", log)
	ctx, cancel := context.WithCancel(context.Background())
	var runErr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		runErr = dispatch(ctx, []string{"run", "--config", path, "--subject-prefix", "fromflag"}, log, log, env)
	}()
	t.Cleanup(func() { cancel(); <-done })
	waitStreaming(t, e.pg, "outbox_relay")
	insertEvents(t, e, "cfg", 1)
	require.Eventually(t, func() bool { return streamMsgs(t, e.nats.URL, "FROMENV") == 1 }, 30*time.Second, 20*time.Millisecond,
		"the environment overrides the file's stream")
	recs := readStream(t, e.nats.URL, "FROMENV")
	require.Equal(t, "fromflag.o.E", recs[0].Subject, "the flag overrides the file's subject prefix")
	require.Zero(t, streamMsgs(t, e.nats.URL, "FROMFILE"))
	cancel()
	<-done
	require.NoError(t, runErr)
}

func TestConfigFile_Errors(t *testing.T) {
	_, err := runCmd("run", "--config", writeConfig(t, "pg-url: postgres://x\nmax-in-fligth: 3\n"))
	require.ErrorContains(t, err, `unknown key "max-in-fligth"`)
	_, err = runCmd("run", "--config", writeConfig(t, "pg-url: postgres://x\nmax-in-flight: lots\n"))
	require.ErrorContains(t, err, "key max-in-flight")
	_, err = runCmd("run", "--config", filepath.Join(t.TempDir(), "missing.yaml"))
	require.ErrorContains(t, err, "--config")
	_, err = runCmd("run", "--config", writeConfig(t, "- just\n- a list\n"))
	require.ErrorContains(t, err, "not a YAML mapping")
	// Other commands skip the run-only keys of a shared file.
	_, err = runCmd("slot", "list", "--config", writeConfig(t, "nats-url: nats://x\n"))
	require.ErrorContains(t, err, "--pg-url is required")
}
