package relay

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"syscall"
	"time"
)

// HTTP server timeouts: a scrape or probe is one small GET answered in milliseconds, so a
// client that trickles its request or idles cannot hold a connection (or a goroutine) for long.
const (
	httpReadHeaderTimeout = 5 * time.Second
	httpReadTimeout       = 10 * time.Second
	httpWriteTimeout      = 30 * time.Second // above Prometheus' default scrape timeout (10 s)
	httpIdleTimeout       = 60 * time.Second
	httpMaxHeaderBytes    = 16 << 10
)

func newHTTPServer(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: httpReadHeaderTimeout,
		ReadTimeout:       httpReadTimeout,
		WriteTimeout:      httpWriteTimeout,
		IdleTimeout:       httpIdleTimeout,
		MaxHeaderBytes:    httpMaxHeaderBytes,
	}
}

// listenHTTP binds Config.HTTPAddr. The relay binds it before it checks or changes anything
// (the preflight checks, Config.CreateSlot), so a taken port stops it at once.
func listenHTTP(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	switch {
	case err == nil:
		return ln, nil
	case errors.Is(err, syscall.EADDRINUSE):
		return nil, fatalError{fmt.Errorf("Config.HTTPAddr %s: the address is already in use (another relay or exporter listens there); the relay did not start. Fix: pass a free Config.HTTPAddr (e.g. 127.0.0.1:<port>), or Config.HTTPAddr off to serve no metrics", addr)}
	}
	return nil, fatalError{fmt.Errorf("Config.HTTPAddr %s: %w; the relay did not start. Fix: pass an address this host has (host:port, :port for every interface), or Config.HTTPAddr off", addr, err)}
}
