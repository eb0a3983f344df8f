package replication

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
)

// System is what IDENTIFY_SYSTEM tells of the server: its cluster, the timeline it writes (a
// promotion or a point-in-time recovery starts a new one) and where its WAL ends.
type System struct {
	ID       string
	Timeline int32
	WALEnd   pglogrepl.LSN
	// History lists the ancestors of Timeline and where each ended (empty on timeline 1).
	History []TimelineSwitch
}

// TimelineSwitch is a line of a timeline history file: Timeline ended at SwitchPoint, where
// its child began.
type TimelineSwitch struct {
	Timeline    int32
	SwitchPoint pglogrepl.LSN
}

// Identify runs IDENTIFY_SYSTEM and, past timeline 1, TIMELINE_HISTORY on a replication
// connection.
func Identify(ctx context.Context, conn *pgconn.PgConn) (System, error) {
	r, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		return System{}, fmt.Errorf("identify system: %w", err)
	}
	s := System{ID: r.SystemID, Timeline: r.Timeline, WALEnd: r.XLogPos}
	if r.Timeline > 1 {
		h, err := pglogrepl.TimelineHistory(ctx, conn, r.Timeline)
		if err != nil {
			return s, fmt.Errorf("read the history of timeline %d: %w", r.Timeline, err)
		}
		if s.History, err = ParseTimelineHistory(h.Content); err != nil {
			return s, fmt.Errorf("timeline history %s: %w", h.FileName, err)
		}
	}
	return s, nil
}

// ParseTimelineHistory reads a timeline history file: lines of "parent-timeline<TAB>switch
// point<TAB>reason"; blank lines and lines starting with # are skipped.
func ParseTimelineHistory(content []byte) ([]TimelineSwitch, error) {
	var h []TimelineSwitch
	sc := bufio.NewScanner(bytes.NewReader(content))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			return nil, fmt.Errorf("line %d: %q is not <timeline> <switch point> <reason>", n, line)
		}
		tli, err := strconv.ParseInt(f[0], 10, 32)
		if err != nil || tli < 1 {
			return nil, fmt.Errorf("line %d: bad timeline %q", n, f[0])
		}
		lsn, err := pglogrepl.ParseLSN(f[1])
		if err != nil {
			return nil, fmt.Errorf("line %d: bad switch point %q: %w", n, f[1], err)
		}
		h = append(h, TimelineSwitch{Timeline: int32(tli), SwitchPoint: lsn})
	}
	return h, sc.Err()
}

// EndOf reports where the server's history leaves timeline tli: ok is false when tli is not
// in it (another branch, or a later timeline than the server's); open is true when tli is the
// server's own timeline (it has not ended).
func (s System) EndOf(tli int32) (end pglogrepl.LSN, open, ok bool) {
	if tli == s.Timeline {
		return 0, true, true
	}
	for _, sw := range s.History {
		if sw.Timeline == tli {
			return sw.SwitchPoint, false, true
		}
	}
	return 0, false, false
}

// Holds reports whether the server's history contains pos, a position the relay saw on
// timeline tli (0: not known, taken as the server's own). It does not when tli is not an
// ancestor of the server's timeline, when tli ended before pos (a promotion or a recovery
// branched off earlier), or when the WAL ends before pos (a restore, a standby that lacked the
// latest WAL). forkAt is then the last position the server's history can share with the one
// pos came from, as far as the server tells: the switch point, or its WAL end (an upper bound:
// a restored history may have left the old one earlier).
func (s System) Holds(pos pglogrepl.LSN, tli int32) (forkAt pglogrepl.LSN, ok bool) {
	if tli != 0 {
		end, open, known := s.EndOf(tli)
		if !known {
			return 0, false
		}
		if !open && pos > end {
			return end, false
		}
	}
	if pos > s.WALEnd {
		return s.WALEnd, false
	}
	return pos, true
}
