package relay

import (
	"testing"

	"github.com/jackc/pglogrepl"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
)

// The slot-gap rule, case by case: each case the rule distinguishes, the record it writes
// and the words of its reason.
func TestDecideSlotGap(t *testing.T) {
	sys := replication.System{ID: "7000", Timeline: 1, WALEnd: 0x9000}
	// A server promoted at 0x5000 onto timeline 2.
	sys2 := replication.System{ID: "7000", Timeline: 2, WALEnd: 0x9000,
		History: []replication.TimelineSwitch{{Timeline: 1, SwitchPoint: 0x5000}}}
	rec := sink.SourcePosition{SystemID: "7000", Slot: "outbox", LSN: 0x4000, Timeline: 1, SeqFloor: 2, StreamSeq: 10}
	last := sink.StoredMsg{Position: sink.Position{CommitLSN: 0x3f00, TxIndex: 1}, Seq: 10, ID: "e10", StreamLastSeq: 10}
	base := gapInput{Slot: "outbox", SlotLSN: 0x4000, Start: 0x4000, Stream: "OUTBOX",
		Record: rec, HaveRecord: true, Last: last, HaveLast: true, Sys: sys}
	with := func(f func(*gapInput)) gapInput { in := base; f(&in); return in }

	for _, tc := range []struct {
		name   string
		in     gapInput
		kind   gapKind
		write  bool
		next   sink.SourcePosition // checked when write
		forkAt pglogrepl.LSN
		found  string // a part of Found
		cause  string // a part of Cause
		warn   bool
	}{
		{name: "continuous", in: base, kind: gapNone},
		{name: "slot behind the record (a crash before a checkpoint)", in: with(func(in *gapInput) { in.SlotLSN, in.Start = 0x3800, 0x3800 }), kind: gapNone},
		{name: "start moved ahead on purpose", in: with(func(in *gapInput) { in.Start = 0x6000 }), kind: gapNone, write: true,
			next: sink.SourcePosition{SystemID: "7000", Slot: "outbox", LSN: 0x6000, Timeline: 1, SeqFloor: 2, StreamSeq: 10}},
		{name: "later timeline holding the record", in: with(func(in *gapInput) { in.Sys = sys2 }), kind: gapNone, write: true,
			next: sink.SourcePosition{SystemID: "7000", Slot: "outbox", LSN: 0x4000, Timeline: 2, SeqFloor: 2, StreamSeq: 10}},
		{name: "first start", in: with(func(in *gapInput) { in.HaveRecord, in.Record, in.SlotLSN = false, sink.SourcePosition{}, 0x3f00 }), kind: gapFirstStart, write: true,
			next: sink.SourcePosition{SystemID: "7000", Slot: "outbox", LSN: 0x4000, Timeline: 1, StreamSeq: 10}},
		{name: "first start, slot past the stream's last event", in: with(func(in *gapInput) {
			in.HaveRecord, in.Record, in.SlotLSN = false, sink.SourcePosition{}, 0x5000
		}), kind: gapFirstStart, write: true, warn: true,
			next: sink.SourcePosition{SystemID: "7000", Slot: "outbox", LSN: 0x4000, Timeline: 1, StreamSeq: 10}},
		{name: "record missing while another stream of the relay has one", in: with(func(in *gapInput) {
			in.HaveRecord, in.Record, in.SlotLSN, in.OtherRecorded = false, sink.SourcePosition{}, 0x5000, true
		}), kind: gapRecordMissing, write: true, warn: true,
			next:  sink.SourcePosition{SystemID: "7000", Slot: "outbox", LSN: 0x4000, Timeline: 1, StreamSeq: 10},
			found: "stream OUTBOX holds the relay's events up to 0/3F00#1", cause: "the record was deleted"},
		{name: "record missing next to another's, the replay reaching the stream's last event", in: with(func(in *gapInput) {
			in.HaveRecord, in.Record, in.SlotLSN, in.OtherRecorded = false, sink.SourcePosition{}, 0x3f00, true
		}), kind: gapFirstStart, write: true,
			next: sink.SourcePosition{SystemID: "7000", Slot: "outbox", LSN: 0x4000, Timeline: 1, StreamSeq: 10}},
		{name: "another cluster", in: with(func(in *gapInput) { in.Sys.ID = "8000" }), kind: gapOtherCluster, write: true,
			next:  sink.SourcePosition{SystemID: "8000", Slot: "outbox", LSN: 0x4000, Timeline: 1, SeqFloor: 10, StreamSeq: 10},
			found: `replication slot "outbox" is on Postgres cluster 8000 (system identifier)`, cause: "the database was replaced"},
		{name: "WAL ends before the record", in: with(func(in *gapInput) { in.Sys.WALEnd = 0x3000 }), kind: gapForkedRecord, write: true, forkAt: 0x3000,
			next:  sink.SourcePosition{SystemID: "7000", Slot: "outbox", LSN: 0x4000, Timeline: 1, SeqFloor: 10, StreamSeq: 10},
			found: "no longer holds the recorded position 0/4000 (timeline 1)"},
		{name: "timeline left before the record", in: with(func(in *gapInput) {
			in.Sys = sys2
			in.Sys.History = []replication.TimelineSwitch{{Timeline: 1, SwitchPoint: 0x3500}}
		}), kind: gapForkedRecord, write: true, forkAt: 0x3500,
			next:  sink.SourcePosition{SystemID: "7000", Slot: "outbox", LSN: 0x4000, Timeline: 2, SeqFloor: 10, StreamSeq: 10},
			found: "which began at 0/3500 when timeline 1 ended"},
		{name: "record on a timeline the server does not descend from", in: with(func(in *gapInput) { in.Record.Timeline = 3 }), kind: gapForkedRecord, write: true,
			next:  sink.SourcePosition{SystemID: "7000", Slot: "outbox", LSN: 0x4000, Timeline: 1, SeqFloor: 10, StreamSeq: 10},
			found: "(timeline 3)"},
		{name: "stream's last event past the server's history", in: with(func(in *gapInput) {
			in.Last.Position.CommitLSN = 0x9500
		}), kind: gapForkedLast, write: true, forkAt: 0x9000,
			next:  sink.SourcePosition{SystemID: "7000", Slot: "outbox", LSN: 0x4000, Timeline: 1, SeqFloor: 10, StreamSeq: 10},
			found: "no longer holds the stream's last event 0/9500#1 (stream sequence 10)"},
		{name: "last event from an earlier history (at the floor) is not checked", in: with(func(in *gapInput) {
			in.Last.Position.CommitLSN, in.Record.SeqFloor = 0x9500, 10
		}), kind: gapNone},
		{name: "stream lost acknowledged messages", in: with(func(in *gapInput) { in.Last.StreamLastSeq, in.Last.Seq = 7, 7 }), kind: gapStreamLost, write: true,
			next:  sink.SourcePosition{SystemID: "7000", Slot: "outbox", LSN: 0x4000, Timeline: 1, SeqFloor: 2, StreamSeq: 7},
			found: "stream OUTBOX ends at sequence 7, before sequence 10", cause: "the broker lost messages it had acknowledged"},
		{name: "stream lost messages below the floor", in: with(func(in *gapInput) {
			in.Last.StreamLastSeq, in.Last.Seq, in.HaveLast, in.Record.SeqFloor = 1, 0, false, 5
		}), kind: gapStreamLost, write: true,
			next:  sink.SourcePosition{SystemID: "7000", Slot: "outbox", LSN: 0x4000, Timeline: 1, SeqFloor: 1, StreamSeq: 1},
			found: "ends at sequence 1, before sequence 10"},
		{name: "another slot", in: with(func(in *gapInput) { in.Slot = "other" }), kind: gapOtherSlot, write: true,
			next:  sink.SourcePosition{SystemID: "7000", Slot: "other", LSN: 0x4000, Timeline: 1, SeqFloor: 2, StreamSeq: 10},
			found: `the stream is now fed from slot "other" at 0/4000`, cause: "pointed at another slot"},
		{name: "slot ahead of the record", in: with(func(in *gapInput) { in.SlotLSN, in.Start = 0x4100, 0x4100 }), kind: gapSlotAhead, write: true,
			next:  sink.SourcePosition{SystemID: "7000", Slot: "outbox", LSN: 0x4100, Timeline: 1, SeqFloor: 2, StreamSeq: 10},
			found: `replication slot "outbox" is at 0/4100`, cause: "dropped and recreated, or advanced by someone else"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := decideSlotGap(tc.in)
			require.Equal(t, tc.kind, d.Kind)
			require.Equal(t, tc.write, d.Write, "write the record")
			if tc.write {
				require.Equal(t, tc.next, d.Next)
			}
			require.Equal(t, tc.forkAt, d.ForkAt)
			require.Contains(t, d.Found, tc.found)
			require.Contains(t, d.Cause, tc.cause)
			require.Equal(t, tc.warn, d.UnknownContinuity)
			require.Equal(t, tc.kind != gapNone && tc.kind != gapFirstStart, d.Gap())
			require.Equal(t, tc.kind == gapForkedRecord || tc.kind == gapForkedLast, d.Forked())
			if d.Forked() {
				require.Contains(t, d.Found, "Cause: the database was restored")
			}
		})
	}
}

// The rule for a reconnecting relay's resume point: the same cluster and history, another
// cluster, or a history that no longer holds the point.
func TestResumePointDecide(t *testing.T) {
	sys := replication.System{ID: "7000", Timeline: 2, WALEnd: 0x9000,
		History: []replication.TimelineSwitch{{Timeline: 1, SwitchPoint: 0x5000}}}
	for _, tc := range []struct {
		name   string
		r      resumePoint
		kind   gapKind
		forkAt pglogrepl.LSN
	}{
		{"none yet", resumePoint{}, gapNone, 0},
		{"from Config.StartLSN (cluster not known)", resumePoint{lsn: 0x4000}, gapNone, 0},
		{"held on the parent timeline", resumePoint{lsn: 0x4000, systemID: "7000", timeline: 1}, gapNone, 0},
		{"held on the server's timeline", resumePoint{lsn: 0x8000, systemID: "7000", timeline: 2}, gapNone, 0},
		{"another cluster", resumePoint{lsn: 0x4000, systemID: "8000", timeline: 1}, gapOtherCluster, 0},
		{"parent timeline left before it", resumePoint{lsn: 0x6000, systemID: "7000", timeline: 1}, gapForkedRecord, 0x5000},
		{"past the WAL end", resumePoint{lsn: 0x9100, systemID: "7000", timeline: 2}, gapForkedRecord, 0x9000},
		{"unknown timeline", resumePoint{lsn: 0x4000, systemID: "7000", timeline: 3}, gapForkedRecord, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kind, forkAt := tc.r.decide(sys)
			require.Equal(t, tc.kind, kind)
			require.Equal(t, tc.forkAt, forkAt)
		})
	}
}
