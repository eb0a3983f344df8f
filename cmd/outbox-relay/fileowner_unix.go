//go:build unix

package main

import (
	"os"
	"syscall"
)

// ownedByRoot reports whether the file st describes belongs to root (uid 0).
func ownedByRoot(st os.FileInfo) bool {
	s, ok := st.Sys().(*syscall.Stat_t)
	return ok && s.Uid == 0
}
