package redact

import (
	"bytes"
	"errors"
	"fmt"
	"net/url"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestSecrets_EveryForm(t *testing.T) {
	for _, c := range []struct {
		in   string
		want []string
	}{
		{"postgres://app:hunter2pw@db/app?sslpassword=keypass99&sslmode=verify-full", []string{"hunter2pw", "keypass99"}},
		{"postgres://app:p%40ss2pw@db/app", []string{"p%40ss2pw", "p@ss2pw"}},
		{"postgres://app@db/app?password=hunter2pw", []string{"hunter2pw"}},
		{"host=db password = 'hunter 2\\' pw' sslpassword=keypass99", []string{"hunter 2' pw", "keypass99"}},
		{"nats://u:hunter2pw@a:4222,tok2secret@b:4222", []string{"hunter2pw", "tok2secret"}},
		{"nats://a:4222", nil},
		{"host=db user=app", nil},
	} {
		got := Secrets(c.in)
		for _, w := range c.want {
			require.Contains(t, got, w, "Secrets(%q)", c.in)
		}
		if c.want == nil {
			require.Empty(t, got, "Secrets(%q)", c.in)
		}
	}
}

// A library error that echoes the connection string (Go's url.Error quotes it with %q, a JSON
// log escapes it) loses every secret.
func TestText_MasksEchoedSecrets(t *testing.T) {
	raw := `nats://u:pa"ss\w0rd@h:bad`
	_, err := url.Parse(raw)
	require.Error(t, err)
	var set Set
	set.AddURL(raw)
	for _, text := range []string{err.Error(), fmt.Sprintf("%q", raw), `{"err":"` + fmt.Sprintf("%q", err.Error())[1:]} {
		require.NotContains(t, set.Text(text), `w0rd`, text)
	}
	var buf bytes.Buffer
	w := Writer{W: &buf, Set: &set}
	n, werr := fmt.Fprintf(w, "connect: %v\n", err)
	require.NoError(t, werr)
	require.Positive(t, n)
	require.NotContains(t, buf.String(), "w0rd")
	require.Contains(t, buf.String(), Mask)

	masked := set.Error(fmt.Errorf("wrapped: %w", err))
	require.NotContains(t, masked.Error(), "w0rd")
	var ue *url.Error
	require.True(t, errors.As(masked, &ue), "the masked error still unwraps")

	set.Add("ab") // too short to search for in free text
	require.Equal(t, "abc", set.Text("abc"))
}

func TestEchoed_MasksShortSecretsInAnEchoedConnString(t *testing.T) {
	dsn := "host=db port=x password = ab"
	err := Echoed(fmt.Errorf("cannot parse `%s`: invalid port", dsn), dsn)
	require.Equal(t, "cannot parse `host=db port=x password = xxxxx`: invalid port", err.Error())
	list := "nats://a:1,nats://u:pw@h:bad"
	_, perr := url.Parse("nats://u:pw@h:bad")
	err = Echoed(perr, list)
	require.NotContains(t, err.Error(), ":pw@")
	require.ErrorIs(t, err, perr)
}
