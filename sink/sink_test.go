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

func TestRedactURL(t *testing.T) {
	require.Equal(t, "nats://u:xxxxx@h:4222", RedactURL("nats://u:secret@h:4222"))
	require.Equal(t, "postgres://app:xxxxx@db/app?sslmode=verify-full", RedactURL("postgres://app:p@ss@db/app?sslmode=verify-full"))
	require.Equal(t, "nats://h:4222", RedactURL("nats://h:4222"))
	require.Equal(t, "nats://token@h", RedactURL("nats://token@h"))
}

func TestReservedHeaders(t *testing.T) {
	for _, k := range []string{"Nats-Msg-Id", "Nats-Expected-Last-Msg-Id", "nats-rollup", HeaderCommitLSN} {
		require.True(t, reservedHeader(k), k)
	}
	require.False(t, reservedHeader("traceparent"))
}
