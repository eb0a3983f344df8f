package testenv

import (
	"fmt"
	"os"
	"testing"
)

// ForExample returns a testing.TB for Example functions, which get none, so that they can use
// Postgres, StartNATSProcess and the other helpers; done runs the cleanups those registered
// (the database is dropped, the process killed) and must be deferred by the example. A failure
// panics, which fails the example: an Example cannot be skipped, so without the PostgreSQL
// binaries the examples fail where the tests skip. The package's TestMain must call Main.
func ForExample(name string) (t testing.TB, done func()) {
	e := &exampleTB{name: name}
	return e, e.done
}

type exampleTB struct {
	testing.TB // nil: a method not implemented below panics
	name       string
	cleanups   []func()
}

func (e *exampleTB) Helper()                        {}
func (e *exampleTB) Name() string                   { return e.name }
func (e *exampleTB) Cleanup(f func())               { e.cleanups = append(e.cleanups, f) }
func (e *exampleTB) Logf(format string, a ...any)   { fmt.Fprintf(os.Stderr, format+"\n", a...) }
func (e *exampleTB) Errorf(format string, a ...any) { e.Logf(format, a...) }
func (e *exampleTB) Fatalf(format string, a ...any) {
	panic(fmt.Sprintf("%s: %s", e.name, fmt.Sprintf(format, a...)))
}
func (e *exampleTB) FailNow() { e.Fatalf("failed (see the log above)") }
func (e *exampleTB) Skipf(format string, a ...any) {
	e.Fatalf("an Example cannot be skipped: "+format, a...)
}

func (e *exampleTB) TempDir() string {
	dir, err := os.MkdirTemp("", "outbox-relay-example-")
	if err != nil {
		e.Fatalf("temporary directory: %v", err)
	}
	e.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func (e *exampleTB) done() {
	for i := len(e.cleanups) - 1; i >= 0; i-- {
		e.cleanups[i]()
	}
	e.cleanups = nil
}
