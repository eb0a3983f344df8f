package outbox

import (
	"crypto/rand"
	"encoding/hex"
	"sync"
	"time"
)

// uuidGen makes version 7 UUIDs (RFC 9562 §5.7): 48 bits of Unix milliseconds, then a 12-bit
// counter in rand_a (RFC 9562 §6.2, method 1) so ids made by one process in the same
// millisecond still sort in creation order, then 62 random bits.
type uuidGen struct {
	mu     sync.Mutex
	lastMS int64
	seq    uint16 // 12 bits
}

var ids uuidGen

// NewID returns a new UUIDv7 as a string. Ids from one process increase strictly; ids from
// different processes are ordered by their millisecond.
func NewID() string {
	b := ids.next(time.Now())
	return formatUUID(b)
}

func (g *uuidGen) next(now time.Time) [16]byte {
	var b [16]byte
	_, _ = rand.Read(b[6:]) // crypto/rand.Read never fails (Go 1.24+)
	ms := now.UnixMilli()
	g.mu.Lock()
	switch {
	case ms > g.lastMS:
		g.lastMS = ms
		g.seq = uint16(b[6])<<4&0x7f0 | uint16(b[7]>>4) // random start, top bit clear: room to count
	default:
		// Same millisecond, or the clock went back: keep counting on the last timestamp.
		g.seq++
		if g.seq > 0xfff {
			g.lastMS++
			g.seq = 0
		}
	}
	ms, seq := g.lastMS, g.seq
	g.mu.Unlock()
	b[0], b[1], b[2], b[3], b[4], b[5] = byte(ms>>40), byte(ms>>32), byte(ms>>24), byte(ms>>16), byte(ms>>8), byte(ms)
	b[6] = 0x70 | byte(seq>>8)&0x0f
	b[7] = byte(seq)
	b[8] = b[8]&0x3f | 0x80 // variant 10
	return b
}

func formatUUID(b [16]byte) string {
	var s [36]byte
	hex.Encode(s[0:8], b[0:4])
	s[8] = '-'
	hex.Encode(s[9:13], b[4:6])
	s[13] = '-'
	hex.Encode(s[14:18], b[6:8])
	s[18] = '-'
	hex.Encode(s[19:23], b[8:10])
	s[23] = '-'
	hex.Encode(s[24:], b[10:])
	return string(s[:])
}
