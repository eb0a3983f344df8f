package relay

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/sink"
)

// A position record that cannot be written (here: its bucket deleted under the running relay)
// while events still flow: nothing newer is confirmed, and /readyz says why instead of 200.
func TestSlotGap_RecordFailuresReachReadyz(t *testing.T) {
	old := recordFailingReady
	recordFailingReady = time.Second
	defer func() { recordFailingReady = old }()
	e := newTestEnv(t)
	r := start(t, e.config())
	base := r.httpAddr(t)
	r.streaming(t)
	e.insert(t, "one", 1)
	e.waitStream(t, 1)
	require.Eventually(t, func() bool { code, _ := testenv.HTTPGet(t, base+"/readyz"); return code == http.StatusOK }, 10*time.Second, 20*time.Millisecond)

	js := e.js(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, js.DeleteKeyValue(ctx, sink.DefaultPositionBucket))
	e.insert(t, "two", 1)
	e.waitStream(t, 2)
	var body string
	require.Eventually(t, func() bool {
		var code int
		code, body = testenv.HTTPGet(t, base+"/readyz")
		return code == http.StatusServiceUnavailable
	}, 20*time.Second, 50*time.Millisecond, "/readyz stayed ready while the record could not be written")
	require.Contains(t, body, "the position record cannot be written")
	require.NoError(t, r.stop())
}
