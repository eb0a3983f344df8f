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
	require.Equal(t, "nats://xxxxx@h", RedactURL("nats://s3cr3t-token@h"), "a bare NATS userinfo is a token")
	require.Equal(t, "postgres://app@db/app", RedactURL("postgres://app@db/app"), "a bare Postgres userinfo is the user name")
	require.Equal(t, "nats://u:xxxxx@a:4222,nats://xxxxx@b:4222", RedactURL("nats://u:p1@a:4222,nats://tok@b:4222"))
	require.Equal(t, "host=db user=app password=xxxxx dbname=app", RedactURL("host=db user=app password=hunter2 dbname=app"))
	require.Equal(t, "host=db password=xxxxx dbname=app", RedactURL("host=db password='a b\\' c' dbname=app"))
}

func TestReservedHeaders(t *testing.T) {
	for _, k := range []string{"Nats-Msg-Id", "Nats-Expected-Last-Msg-Id", "nats-rollup", HeaderCommitLSN} {
		require.True(t, reservedHeader(k), k)
	}
	require.False(t, reservedHeader("traceparent"))
}
