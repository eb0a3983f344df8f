package main

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/rs/zerolog"
)

// embeddedNATS is the --embedded-nats configuration: a nats-server with JetStream inside the
// relay process, for development and the demo.
type embeddedNATS struct {
	enabled bool
	dir     string // JetStream store directory; "" = a temporary one, removed at exit
	listen  string // host:port; port 0 picks a free one
}

// start runs the server and returns its client URL and a stop function that shuts it down
// (after the relay stopped publishing) and removes a temporary store.
func (e embeddedNATS) start(log zerolog.Logger) (url string, stop func(), err error) {
	host, portStr, err := net.SplitHostPort(e.listen)
	if err != nil {
		return "", nil, usageError{fmt.Errorf("--embedded-nats-listen %q: use host:port, e.g. 127.0.0.1:4222", e.listen)}
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		return "", nil, usageError{fmt.Errorf("--embedded-nats-listen %q: bad port", e.listen)}
	}
	if port == 0 {
		port = server.RANDOM_PORT
	}
	dir, temp := e.dir, false
	if dir == "" {
		if dir, err = os.MkdirTemp("", "outbox-relay-nats-"); err != nil {
			return "", nil, fmt.Errorf("create a JetStream store directory: %w (or set --embedded-nats-dir)", err)
		}
		temp = true
		log.Warn().Str("dir", dir).Msg("embedded NATS uses a temporary JetStream store, deleted at exit: set --embedded-nats-dir to keep the stream")
	}
	s, err := server.NewServer(&server.Options{
		ServerName: "outbox-relay-embedded",
		Host:       host,
		Port:       port,
		JetStream:  true,
		StoreDir:   dir,
		NoSigs:     true,
		NoLog:      true,
	})
	if err != nil {
		return "", nil, fmt.Errorf("embedded NATS: %w", err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		return "", nil, fmt.Errorf("embedded NATS did not start listening on %s within 10s (port in use? choose another --embedded-nats-listen)", e.listen)
	}
	url = s.ClientURL()
	log.Info().Str("url", url).Str("store_dir", dir).Msg("embedded NATS JetStream started")
	return url, func() {
		s.Shutdown()
		s.WaitForShutdown()
		if temp {
			_ = os.RemoveAll(dir)
		}
	}, nil
}
