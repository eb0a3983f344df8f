package decoder

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The hand parser must agree with time.Parse on every shape Postgres' ISO output takes, and
// hand everything else to it.
func TestToRFC3339_MatchesTimeParse(t *testing.T) {
	slow := func(s string) string {
		for _, layout := range []string{"2006-01-02 15:04:05.999999999Z07:00:00", "2006-01-02 15:04:05.999999999Z07:00", "2006-01-02 15:04:05.999999999Z07", "2006-01-02 15:04:05.999999999"} {
			if tm, err := time.Parse(layout, s); err == nil {
				return tm.UTC().Format(rfc3339Micro)
			}
		}
		return "error"
	}
	for _, in := range []string{
		"2026-11-26 13:50:57.123456+00",
		"2026-11-26 13:50:57+00",
		"2026-11-26 13:50:57.1+02",
		"2026-11-26 00:10:00.5-05:30",
		"2026-11-26 23:59:59.999999+05:45",
		"2026-12-31 23:30:00-01",
		"2024-02-29 12:00:00.000001+00",
		"2026-11-26 13:50:57.123456", // timestamp without time zone
		"2026-11-26 13:50:57",
		"0001-01-01 00:00:00+00",
		"1970-01-01 00:00:00+00",
		"2026-11-26 13:50:57.123456789+00",
		"2026-11-26 13:50:57+05:30:15", // offset with seconds: slow path
		"12026-11-26 13:50:57+00",      // year beyond 9999: slow path
		"2026-02-30 13:50:57+00",       // invalid date: error
		"2026-11-26T13:50:57+00",       // not ISO output: error
		"2026-11-26 13:50:57.+00",
		"2026-11-26 13:50:57 BC",
		"",
	} {
		got, err := toRFC3339(nil, []byte(in))
		want := slow(in)
		if want == "error" {
			require.Error(t, err, in)
			continue
		}
		require.NoError(t, err, in)
		require.Equal(t, want, string(got), in)
	}
}

func TestToRFC3339_NoAllocations(t *testing.T) {
	dst := make([]byte, 0, 64)
	src := []byte("2026-11-26 13:50:57.123456+00")
	allocs := testing.AllocsPerRun(100, func() { dst, _ = toRFC3339(dst[:0], src) })
	require.Zero(t, allocs)
	require.Equal(t, "2026-11-26T13:50:57.123456Z", string(dst))
}
