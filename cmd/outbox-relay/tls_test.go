package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/sink"
)

// pki is a throwaway CA with a server certificate for 127.0.0.1 and localhost and a client
// certificate, written as PEM files into one directory.
type pki struct {
	CA, ServerCert, ServerKey, ClientCert, ClientKey string
}

// newPKI generates the CA and certificates into dir (ECDSA P-256, valid for an hour).
func newPKI(t *testing.T, dir string) pki {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "outbox-relay test CA"},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	require.NoError(t, err)
	ca, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)

	p := pki{
		CA:         filepath.Join(dir, "ca.pem"),
		ServerCert: filepath.Join(dir, "server.pem"),
		ServerKey:  filepath.Join(dir, "server.key"),
		ClientCert: filepath.Join(dir, "client.pem"),
		ClientKey:  filepath.Join(dir, "client.key"),
	}
	writePEM(t, p.CA, "CERTIFICATE", caDER)
	leaf := func(serial int64, cn string, usage x509.ExtKeyUsage, certFile, keyFile string) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			Subject:      pkix.Name{CommonName: cn},
			NotBefore:    now.Add(-time.Minute),
			NotAfter:     now.Add(time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		}
		if usage == x509.ExtKeyUsageServerAuth {
			tmpl.DNSNames = []string{"localhost"}
			tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		require.NoError(t, err)
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		require.NoError(t, err)
		writePEM(t, certFile, "CERTIFICATE", der)
		writePEM(t, keyFile, "PRIVATE KEY", keyDER)
	}
	leaf(2, "127.0.0.1", x509.ExtKeyUsageServerAuth, p.ServerCert, p.ServerKey)
	leaf(3, "outbox-relay", x509.ExtKeyUsageClientAuth, p.ClientCert, p.ClientKey)
	return p
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	require.NoError(t, os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600))
}

// startNATS starts an embedded JetStream server with opts (host, port, store and logging
// filled in) and returns its client URL.
func startNATS(t *testing.T, opts server.Options) string {
	t.Helper()
	opts.Host, opts.Port, opts.JetStream, opts.StoreDir = "127.0.0.1", server.RANDOM_PORT, true, t.TempDir()
	opts.NoLog, opts.NoSigs = true, true
	s, err := server.NewServer(&opts)
	require.NoError(t, err)
	go s.Start()
	require.True(t, s.ReadyForConnections(10*time.Second), "nats-server not ready")
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	return s.ClientURL()
}

// tlsNATS starts a JetStream server that requires TLS with p's server certificate and, with
// verify, a client certificate signed by p's CA.
func tlsNATS(t *testing.T, p pki, verify bool) string {
	t.Helper()
	tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: p.ServerCert, KeyFile: p.ServerKey, CaFile: p.CA, Verify: verify})
	require.NoError(t, err)
	return startNATS(t, server.Options{TLS: true, TLSVerify: verify, TLSConfig: tc, TLSTimeout: 2})
}

// streamCount returns the number of messages in the relay's stream, connecting with opts.
func streamCount(t *testing.T, url string, opts ...nats.Option) uint64 {
	t.Helper()
	nc, err := nats.Connect(url, opts...)
	require.NoError(t, err)
	defer nc.Close()
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, sink.DefaultStream)
	if err != nil {
		return 0
	}
	info, err := s.Info(ctx)
	require.NoError(t, err)
	return info.State.Msgs
}

// relayThrough runs the relay with the extra args against a migrated database, commits three
// events and waits until the stream, read with opts, holds them.
// It returns the relay's log and the database, whose slot preflight runs may reuse.
func relayThrough(t *testing.T, natsURL string, extra []string, opts ...nats.Option) (*testLog, *testenv.PG) {
	t.Helper()
	e := &env{pg: newEnvPG(t)}
	args := append([]string{"run", "--pg-url", e.pg.URL, "--nats-url", natsURL, "--create-slot", "--log-format", "json", "--http-addr", "off"}, extra...)
	stop, log := inProcess(t, args)
	waitStreaming(t, e.pg, "outbox_relay")
	e.pg.Exec(t, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
		SELECT 'order', g::text, 'Created', '{}' FROM generate_series(1, 3) g`)
	require.Eventually(t, func() bool { return streamCount(t, natsURL, opts...) == 3 }, 30*time.Second, 50*time.Millisecond)
	require.NoError(t, stop())
	return log, e.pg
}

func TestRelay_NATSOverTLS(t *testing.T) {
	p := newPKI(t, t.TempDir())
	readOpts := []nats.Option{nats.RootCAs(p.CA), nats.ClientCert(p.ClientCert, p.ClientKey)}

	t.Run("server certificate", func(t *testing.T) {
		url := tlsNATS(t, p, false)
		_, pg := relayThrough(t, url, []string{"--nats-tls-ca", p.CA}, readOpts...)

		// Without the CA the server's certificate is unknown: preflight names the flag.
		msg, _ := runPreflight(t, "--pg-url", pg.URL, "--nats-url", url)
		require.Contains(t, msg, "preflight check failed") // the one problem
		require.Contains(t, msg, "not signed by a CA the relay trusts. Fix: pass the CA's PEM file with --nats-tls-ca")
	})

	t.Run("client certificate required", func(t *testing.T) {
		url := tlsNATS(t, p, true)
		_, pg := relayThrough(t, url, []string{"--nats-tls-ca", p.CA, "--nats-tls-cert", p.ClientCert, "--nats-tls-key", p.ClientKey}, readOpts...)

		msg, _ := runPreflight(t, "--pg-url", pg.URL, "--nats-url", url, "--nats-tls-ca", p.CA)
		require.Contains(t, msg, "preflight check failed")
		require.Contains(t, msg, "--nats-tls-cert and --nats-tls-key")
	})

	t.Run("TLS asked of a plain server", func(t *testing.T) {
		url := startNATS(t, server.Options{})
		msg, _ := runPreflight(t, "--pg-url", newEnvPG(t).URL, "--nats-url", url, "--create-slot", "--nats-tls-ca", p.CA)
		require.Contains(t, msg, "does not offer TLS")
	})
}

// newEnvPG returns a migrated database in the shared cluster.
func newEnvPG(t *testing.T) *testenv.PG {
	t.Helper()
	e := &env{pg: testenv.Postgres(t)}
	e.migrate(t)
	return e.pg
}
