package decoder

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// pgoutput message tags (protocol version 1), see
// https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html
const (
	tagBegin    = 'B'
	tagCommit   = 'C'
	tagOrigin   = 'O'
	tagRelation = 'R'
	tagType     = 'Y'
	tagInsert   = 'I'
	tagUpdate   = 'U'
	tagDelete   = 'D'
	tagTruncate = 'T'
	tagMessage  = 'M'
)

var errShort = errors.New("message too short")

// reader walks a pgoutput message without copying it. Every accessor reports a short buffer
// through r.err instead of panicking, so a malformed message becomes one error at the end.
type reader struct {
	buf []byte
	off int
	err error
}

func (r *reader) need(n int) bool {
	if r.err != nil {
		return false
	}
	if len(r.buf)-r.off < n {
		r.err = errShort
		return false
	}
	return true
}

func (r *reader) u8() byte {
	if !r.need(1) {
		return 0
	}
	b := r.buf[r.off]
	r.off++
	return b
}

func (r *reader) u16() uint16 {
	if !r.need(2) {
		return 0
	}
	v := binary.BigEndian.Uint16(r.buf[r.off:])
	r.off += 2
	return v
}

func (r *reader) u32() uint32 {
	if !r.need(4) {
		return 0
	}
	v := binary.BigEndian.Uint32(r.buf[r.off:])
	r.off += 4
	return v
}

func (r *reader) u64() uint64 {
	if !r.need(8) {
		return 0
	}
	v := binary.BigEndian.Uint64(r.buf[r.off:])
	r.off += 8
	return v
}

// cstring returns the bytes of a NUL-terminated string, aliasing the buffer.
func (r *reader) cstring() []byte {
	if r.err != nil {
		return nil
	}
	for i := r.off; i < len(r.buf); i++ {
		if r.buf[i] == 0 {
			s := r.buf[r.off:i]
			r.off = i + 1
			return s
		}
	}
	r.err = errors.New("unterminated string")
	return nil
}

func (r *reader) bytes(n int) []byte {
	if n < 0 {
		r.err = fmt.Errorf("negative length %d", n)
		return nil
	}
	if !r.need(n) {
		return nil
	}
	b := r.buf[r.off : r.off+n : r.off+n]
	r.off += n
	return b
}

// column is one value of a TupleData, aliasing the message buffer.
type column struct {
	kind byte // 'n' null, 'u' unchanged TOAST, 't' text, 'b' binary
	data []byte
}
