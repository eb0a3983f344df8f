package sink

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestSubjectCovers(t *testing.T) {
	for _, c := range []struct {
		filter, pattern string
		want            bool
	}{
		{"outbox.>", "outbox.>", true},
		{">", "outbox.>", true},
		{"*.>", "outbox.>", true},
		{"outbox.*", "outbox.>", false},
		{"outbox.order.>", "outbox.>", false},
		{"outbox", "outbox.>", false},
		{"other.>", "outbox.>", false},
		{"acme.outbox.>", "acme.outbox.>", true},
	} {
		require.Equal(t, c.want, SubjectCovers(c.filter, c.pattern), "%s covers %s", c.filter, c.pattern)
	}
}

func TestReservedHeaders(t *testing.T) {
	for _, k := range []string{"Nats-Msg-Id", "Nats-Expected-Last-Msg-Id", "nats-rollup", HeaderCommitLSN} {
		require.True(t, reservedHeader(k), k)
	}
	require.False(t, reservedHeader("traceparent"))
	for _, k := range []string{"Nats-Schedule", "Nats-Schedule-Target", "nats-schedule-ttl", "NATS-SCHEDULER"} {
		require.True(t, scheduleHeader(k), k)
		require.True(t, reservedHeader(k), k)
	}
	for _, k := range []string{HeaderTTL, "Nats-Sched", "X-Nats-Schedule"} {
		require.False(t, scheduleHeader(k), k)
	}
}
