package testenv

import "syscall"

// childProcAttr makes child servers die with the test binary: Pdeathsig
// covers panics and -timeout, where no cleanup runs.
func childProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
