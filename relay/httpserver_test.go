package relay

import (
	"net/http"
	"testing"

	"github.com/stretchr/testify/require"
)

// The metrics server cannot be held by slow or idle clients.
func TestHTTP_ServerHasTimeouts(t *testing.T) {
	srv := newHTTPServer(http.NotFoundHandler())
	require.NotZero(t, srv.ReadHeaderTimeout)
	require.NotZero(t, srv.ReadTimeout)
	require.NotZero(t, srv.WriteTimeout)
	require.NotZero(t, srv.IdleTimeout)
	require.NotZero(t, srv.MaxHeaderBytes)
}
