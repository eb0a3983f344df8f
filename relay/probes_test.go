package relay

import (
	"net"
	"net/http"
	"testing"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/testenv/natsembed"
	"github.com/outbox-relay/outbox-relay/sink"
)

// The probe paths of the Kubernetes manifests (deploy/kubernetes), against the relay's HTTP
// server: liveness answers while the process runs; readiness answers ready for a relay standing
// by (connected to NATS), where plain /readyz does not, and not ready for one neither relaying
// nor standing by.
func TestHTTP_ProbePathsOfAStandbyPair(t *testing.T) {
	const liveness, readiness = "/healthz", "/readyz?standby=ok"
	o := newObserver([]string{sink.DefaultStream}, []string{"public.outbox"}, []int{0}, zerolog.Nop(), nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer o.serveHTTP(ln)()
	base := "http://" + ln.Addr().String()
	code, _ := testenv.HTTPGet(t, base+liveness)
	require.Equal(t, http.StatusOK, code)
	code, body := testenv.HTTPGet(t, base+"/metrics")
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, "outbox_relay_")
	o.nc.Store(natsembed.JetStream(t).Connect(t))
	code, _ = testenv.HTTPGet(t, base+readiness)
	require.Equal(t, http.StatusServiceUnavailable, code, "not relaying, not standing by")
	o.standingBy.Store(true)
	code, body = testenv.HTTPGet(t, base+readiness)
	require.Equal(t, http.StatusOK, code, body)
	code, _ = testenv.HTTPGet(t, base+"/readyz")
	require.Equal(t, http.StatusServiceUnavailable, code)
}
