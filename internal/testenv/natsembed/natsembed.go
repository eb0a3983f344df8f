// Package natsembed runs nats-server with JetStream inside the test binary, for tests that
// need a broker started in milliseconds. It is apart from testenv, which has no dependency on
// the nats-server module, so that the packages whose tests only need Postgres or a nats-server
// process (outbox, inbox) do not bring that module into their importers' module graph.
package natsembed

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

const natsReadyTimeout = 10 * time.Second

// NATS is an in-process nats-server with JetStream enabled. Shutdown and
// Restart replace Server and must not race with other uses of the struct.
type NATS struct {
	URL      string // nats://127.0.0.1:PORT; unchanged by Restart
	Port     int
	StoreDir string
	Server   *server.Server

	opts server.Options // template for (re)starts
}

// NATSOption configures JetStream.
type NATSOption func(*natsConfig)

type natsConfig struct {
	port       int
	storeDir   string
	maxPayload int32
	limits     server.JSLimitOpts
}

// WithPort makes JetStream listen on port instead of a random free port.
func WithPort(port int) NATSOption { return func(c *natsConfig) { c.port = port } }

// WithStoreDir sets JetStream's store directory instead of a t.TempDir().
func WithStoreDir(dir string) NATSOption { return func(c *natsConfig) { c.storeDir = dir } }

// WithMaxPayload sets the server's max_payload in bytes (default 1MB).
func WithMaxPayload(bytes int32) NATSOption { return func(c *natsConfig) { c.maxPayload = bytes } }

// WithBatchLimits sets the server's JetStream batch limits: how long an idle batch lives
// (default 10s) and how many fast batches may be open on one stream (default 1,000).
func WithBatchLimits(timeout time.Duration, inflightPerStream int) NATSOption {
	return func(c *natsConfig) {
		c.limits.MaxBatchTimeout, c.limits.MaxBatchInflightPerStream = timeout, inflightPerStream
	}
}

// JetStream starts an in-process nats-server with JetStream on 127.0.0.1
// and shuts it down in t.Cleanup.
func JetStream(t testing.TB, opts ...NATSOption) *NATS {
	t.Helper()
	cfg := natsConfig{port: server.RANDOM_PORT}
	for _, opt := range opts {
		opt(&cfg)
	}
	if cfg.storeDir == "" {
		cfg.storeDir = t.TempDir() // before our cleanup, so removed after shutdown
	}
	n := &NATS{
		StoreDir: cfg.storeDir,
		opts: server.Options{
			Host:            "127.0.0.1",
			Port:            cfg.port,
			JetStream:       true,
			StoreDir:        cfg.storeDir,
			MaxPayload:      cfg.maxPayload,
			JetStreamLimits: cfg.limits,
			NoLog:           true,
			NoSigs:          true,
		},
	}
	if err := n.start(); err != nil {
		t.Fatalf("natsembed: %v", err)
	}
	t.Cleanup(n.Shutdown)
	return n
}

// Shutdown stops the server and waits until it has shut down. It may be
// called more than once.
func (n *NATS) Shutdown() {
	n.Server.Shutdown()
	n.Server.WaitForShutdown()
}

// Restart shuts the server down (if running) and starts a new one on the
// same port and store directory, replacing n.Server. Streams and their
// messages survive.
func (n *NATS) Restart(t testing.TB) {
	t.Helper()
	n.Shutdown()
	if err := n.start(); err != nil {
		t.Fatalf("natsembed: restart: %v", err)
	}
}

// Connect opens a client connection, closed in t.Cleanup.
func (n *NATS) Connect(t testing.TB, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(n.URL, opts...)
	if err != nil {
		t.Fatalf("natsembed: connect to %s: %v", n.URL, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

func (n *NATS) start() error {
	opts := n.opts // NewServer keeps and mutates its *Options
	if n.Port != 0 {
		opts.Port = n.Port // restart on the port picked at first start
	}
	s, err := server.NewServer(&opts)
	if err != nil {
		return fmt.Errorf("create embedded nats-server: %w", err)
	}
	go s.Start()
	if !s.ReadyForConnections(natsReadyTimeout) {
		s.Shutdown()
		return fmt.Errorf("embedded nats-server on 127.0.0.1:%d not ready within %s", opts.Port, natsReadyTimeout)
	}
	if !s.JetStreamEnabled() {
		s.Shutdown()
		return fmt.Errorf("embedded nats-server on %s started without JetStream", s.ClientURL())
	}
	n.Server = s
	n.Port = s.Addr().(*net.TCPAddr).Port
	n.URL = s.ClientURL()
	return nil
}
