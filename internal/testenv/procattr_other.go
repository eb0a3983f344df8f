//go:build !linux

package testenv

import "syscall"

// childProcAttr returns the attributes for child servers. Outside Linux
// there is no parent-death signal, so they rely on t.Cleanup.
func childProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{}
}
