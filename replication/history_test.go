package replication

import (
	"testing"

	"github.com/jackc/pglogrepl"
)

func TestParseTimelineHistory(t *testing.T) {
	h, err := ParseTimelineHistory([]byte("1\t0/3000158\tno recovery target specified\n\n# comment\n2\t0/5000000\tbefore 2026-12-04 10:00:00+00\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := []TimelineSwitch{{1, 0x3000158}, {2, 0x5000000}}
	if len(h) != len(want) || h[0] != want[0] || h[1] != want[1] {
		t.Fatalf("got %v, want %v", h, want)
	}
	for _, bad := range []string{"x\t0/1\tr", "1\tnot-an-lsn\tr", "1", "0\t0/1\tr"} {
		if _, err := ParseTimelineHistory([]byte(bad)); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func TestSystemHolds(t *testing.T) {
	const mb = 1 << 20
	tl1 := System{Timeline: 1, WALEnd: 10 * mb}
	tl3 := System{Timeline: 3, WALEnd: 10 * mb, History: []TimelineSwitch{{1, 4 * mb}, {2, 6 * mb}}}
	for _, c := range []struct {
		name   string
		sys    System
		pos    pglogrepl.LSN
		tli    int32
		ok     bool
		forkAt pglogrepl.LSN
	}{
		{"same timeline, below the WAL end", tl1, 9 * mb, 1, true, 9 * mb},
		{"at the WAL end", tl1, 10 * mb, 1, true, 10 * mb},
		{"restored: the WAL ends before the position", tl1, 11 * mb, 1, false, 10 * mb},
		{"timeline unknown (older record), below the WAL end", tl3, 9 * mb, 0, true, 9 * mb},
		{"timeline unknown, past the WAL end", tl3, 12 * mb, 0, false, 10 * mb},
		{"ancestor timeline, before it ended", tl3, 3 * mb, 1, true, 3 * mb},
		{"ancestor timeline, at its switch point", tl3, 4 * mb, 1, true, 4 * mb},
		{"ancestor timeline, past its switch point (promoted a lagging standby)", tl3, 5 * mb, 1, false, 4 * mb},
		{"parent timeline, past its switch point", tl3, 7 * mb, 2, false, 6 * mb},
		{"not an ancestor (another branch, or a later timeline)", tl3, 1 * mb, 4, false, 0},
		{"a later timeline than the server's, restored from an older backup", tl1, 1 * mb, 2, false, 0},
	} {
		forkAt, ok := c.sys.Holds(c.pos, c.tli)
		if ok != c.ok || forkAt != c.forkAt {
			t.Errorf("%s: Holds(%s, %d) = %s, %v; want %s, %v", c.name, c.pos, c.tli, forkAt, ok, c.forkAt, c.ok)
		}
	}
}
