package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/faultproxy"
)

// noByteBound is a --max-in-flight-bytes no window of -large-events reaches: the relay is
// then bounded by --max-in-flight alone (events), as before the byte bound existed.
const noByteBound = 1 << 40

// runLarge drains o.largeEvents events of o.largePayload bytes (committed 10 per transaction
// before the relay starts) twice, with the default --max-in-flight-bytes and with the byte
// bound out of reach, and reports each drain's rate and the relay's peak RSS. The server's
// max_payload (1 MiB by default) must hold a payload plus the relay's headers.
//
// The relay reaches NATS through a proxy that holds the server's replies for o.largeHold once
// the relay publishes (with --ack-timeout 60s, so that it does not re-publish meanwhile; keep
// the hold under 10 s, when nats.go declares a connection without PONGs stale) (the server stores every publish, the acks arrive late: a slow disk, a
// replicated stream waiting for a follower), so that the window fills. Without it the relay
// waits for Postgres, which decodes such events more slowly than JetStream stores them, and the
// window stays nearly empty whatever its bound.
func (e *env) runLarge(ctx context.Context, o opts, _ int) (figures, error) {
	proxy, err := faultproxy.Start(strings.TrimPrefix(e.nats.URL, "nats://"))
	if err != nil {
		return nil, err
	}
	defer proxy.Close()
	d, err := e.newDB(ctx)
	if err != nil {
		return nil, err
	}
	defer e.drop(context.Background(), d)
	if err := d.createSlots(ctx, "relay", "relay_nobound"); err != nil {
		return nil, err
	}
	if err := d.insert(ctx, o.largeEvents, 10, o.largePayload); err != nil {
		return nil, err
	}
	f := figures{}
	for _, r := range []struct {
		slot, stream, prefix, label string
		extra                       []string
	}{
		{"relay", "LARGE", "large", "large:", nil},
		{"relay_nobound", "LARGENB", "largenb", "large, no byte bound:", []string{"--max-in-flight-bytes", strconv.Itoa(noByteBound)}},
	} {
		if _, err := e.newStream(ctx, r.stream, r.prefix); err != nil {
			return nil, err
		}
		args := append([]string{"--slot", r.slot, "--stream", r.stream, "--subject-prefix", r.prefix, "--nats-url", "nats://" + proxy.Addr(),
			"--ack-timeout", "60s"}, r.extra...)
		p, err := e.startRelayBin(e.relayBin, d, args, o.relayEnv...)
		if err != nil {
			return nil, err
		}
		// Hold once the relay publishes (its start-up needs replies: the position record).
		if _, err := e.waitMsgs(ctx, r.stream, 1, time.Minute); err != nil {
			_, _ = p.stop()
			return nil, fmt.Errorf("%w; relay log:\n%s", err, tailLog(p.log.String()))
		}
		proxy.HoldReplies()
		n0, _ := e.streamMsgs(ctx, r.stream)
		time.Sleep(o.largeHold)
		n1, _ := e.streamMsgs(ctx, r.stream)
		proxy.Pass()
		// What the relay sent while no ack came back: at most its window.
		f[r.label+" MiB sent during the hold"] = float64(n1-n0) * float64(o.largePayload) / mib
		end, werr := e.waitMsgs(ctx, r.stream, uint64(o.largeEvents), 5*time.Minute)
		u, err := p.stop()
		_ = e.js.DeleteStream(context.Background(), r.stream)
		if werr != nil {
			return nil, fmt.Errorf("%w; relay log:\n%s", werr, tailLog(p.log.String()))
		}
		if err != nil {
			return nil, err
		}
		f[r.label+" relay, events/s (with the hold)"] = float64(o.largeEvents) / end.Sub(p.start).Seconds()
		addUsage(f, r.label, u, 0)
	}
	return f, nil
}
