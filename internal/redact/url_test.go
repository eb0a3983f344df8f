package redact

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Every form a Postgres or NATS URL/DSN takes in a flag, the environment or the config file:
// the secret is replaced by xxxxx and the rest is left readable.
func TestURL_EveryForm(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		// Postgres URLs.
		{"postgres://app:hunter2pw@db:5432/app", "postgres://app:xxxxx@db:5432/app"},
		{"postgresql://app:hunter2pw@db/app?sslmode=verify-full", "postgresql://app:xxxxx@db/app?sslmode=verify-full"},
		{"postgres://app@db/app?password=hunter2pw&sslmode=verify-full", "postgres://app@db/app?password=xxxxx&sslmode=verify-full"},
		{"postgres://app@db/app?sslmode=verify-full&sslpassword=keypass99", "postgres://app@db/app?sslmode=verify-full&sslpassword=xxxxx"},
		{"postgres://app@db/app?pass%77ord=hunter2pw", "postgres://app@db/app?pass%77ord=xxxxx"},
		{"postgres://app:p@ss/w0rd?x@db/app", "postgres://app:xxxxx@db/app"},
		{"postgres://app:hunter2pw@h1:5432,h2:5432/app", "postgres://app:xxxxx@h1:5432,h2:5432/app"},
		{"postgres://app:hun,ter2pw@h1,h2/app", "postgres://app:xxxxx@h1,h2/app"},
		{"postgres://app@db/app", "postgres://app@db/app"},
		// Key/value DSNs.
		{"host=db user=app password=hunter2pw dbname=app", "host=db user=app password=xxxxx dbname=app"},
		{"host=db password = hunter2pw dbname=app", "host=db password = xxxxx dbname=app"},
		{"host=db password= 'hunter 2 pw' dbname=app", "host=db password= xxxxx dbname=app"},
		{"password='a b\\' hunter2pw' host=db", "password=xxxxx host=db"},
		{"host=db\tpassword=hunter2pw\tdbname=app", "host=db\tpassword=xxxxx\tdbname=app"},
		{"host=db sslpassword = keypass99 sslmode=verify-full", "host=db sslpassword = xxxxx sslmode=verify-full"},
		{"host=db user=app", "host=db user=app"},
		// NATS URLs, lists, tokens, schemeless.
		{"nats://u:hunter2pw@h:4222", "nats://u:xxxxx@h:4222"},
		{"nats://u:p%40ss@h:4222", "nats://u:xxxxx@h:4222"},
		{"nats://u:hunter@2pw@h:4222", "nats://u:xxxxx@h:4222"},
		{"nats://s3cr3ttoken@h:4222", "nats://xxxxx@h:4222"},
		{"tls://s3cr3ttoken@h:4222", "tls://xxxxx@h:4222"},
		{"wss://s3cr3ttoken@h:443", "wss://xxxxx@h:443"},
		{"u:hunter2pw@h:4222", "u:xxxxx@h:4222"},
		{"s3cr3ttoken@h:4222", "xxxxx@h:4222"},
		{"nats://u:pw1secret@a:4222, nats://tok2secret@b:4222,c:4222", "nats://u:xxxxx@a:4222, nats://xxxxx@b:4222,c:4222"},
		{"u:pw1secret@a:4222,tok2secret@b:4222", "u:xxxxx@a:4222,xxxxx@b:4222"},
		{"nats://a:4222,u:pw1secret@b:4222", "nats://a:4222,u:xxxxx@b:4222"},
		{"nats://h:4222", "nats://h:4222"},
		{"h1:4222,h2:4222", "h1:4222,h2:4222"},
		{"abc==@h:4222", "xxxxx@h:4222"},
		{"u:p=w2pw@h:4222", "u:xxxxx@h:4222"},
		{"search_path=app password=hunter2pw host=db", "search_path=app password=xxxxx host=db"},
		{"password=hunter2pw", "password=xxxxx"},
	} {
		got := URL(c.in)
		assert.Equal(t, c.want, got, "URL(%q)", c.in)
		for _, secret := range []string{"hunter", "2pw", "keypass99", "s3cr3ttoken", "pw1secret", "tok2secret", "p%40ss", "w0rd"} {
			assert.False(t, strings.Contains(got, secret), "URL(%q) = %q shows %q", c.in, got, secret)
		}
	}
}

func TestURL(t *testing.T) {
	require.Equal(t, "nats://u:xxxxx@h:4222", URL("nats://u:secret@h:4222"))
	require.Equal(t, "postgres://app:xxxxx@db/app?sslmode=verify-full", URL("postgres://app:p@ss@db/app?sslmode=verify-full"))
	require.Equal(t, "nats://h:4222", URL("nats://h:4222"))
	require.Equal(t, "nats://xxxxx@h", URL("nats://s3cr3t-token@h"), "a bare NATS userinfo is a token")
	require.Equal(t, "postgres://app@db/app", URL("postgres://app@db/app"), "a bare Postgres userinfo is the user name")
	require.Equal(t, "nats://u:xxxxx@a:4222,nats://xxxxx@b:4222", URL("nats://u:p1@a:4222,nats://tok@b:4222"))
	require.Equal(t, "host=db user=app password=xxxxx dbname=app", URL("host=db user=app password=hunter2 dbname=app"))
	require.Equal(t, "host=db password=xxxxx dbname=app", URL("host=db password='a b\\' c' dbname=app"))
}
