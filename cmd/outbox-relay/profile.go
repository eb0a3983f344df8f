package main

import (
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
)

// startProfiles is the benchmark's hook (bench/ -profile): with OUTBOX_RELAY_CPUPROFILE set it
// writes a CPU profile of the whole run to that file, with OUTBOX_RELAY_MEMPROFILE an
// allocation profile at exit. Both are written only on a normal exit (SIGINT/SIGTERM included).
// The returned func stops and writes them.
func startProfiles(cpuPath, memPath string) (stop func()) {
	var cpu *os.File
	if cpuPath != "" {
		f, err := os.Create(cpuPath)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "outbox-relay: OUTBOX_RELAY_CPUPROFILE:", err)
		} else {
			cpu = f
		}
	}
	return func() {
		if cpu != nil {
			pprof.StopCPUProfile()
			cpu.Close()
		}
		if memPath == "" {
			return
		}
		f, err := os.Create(memPath)
		if err == nil {
			runtime.GC()
			err = pprof.Lookup("allocs").WriteTo(f, 0)
			f.Close()
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "outbox-relay: OUTBOX_RELAY_MEMPROFILE:", err)
		}
	}
}
