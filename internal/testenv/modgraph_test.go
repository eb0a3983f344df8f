package testenv_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// A program outside the module that imports the outbox and inbox libraries inherits neither the
// nats-server module (the relay embeds it, the tests of most packages run it in-process) nor
// Prometheus, the YAML parser or the relay's logger: not in its go.mod, not in its go.sum, not in
// its build. This holds while the libraries' tests import testenv, which must therefore not
// import nats-server (natsembed does). go mod tidy resolves through the module cache and the Go
// proxy.
func TestLibrariesKeepServerModulesOutOfImporters(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("the go command is not on PATH")
	}
	root, err := filepath.Abs("../..")
	must(t, err, "module root")
	dir := t.TempDir()
	write := func(name, content string) {
		must(t, os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644), "write "+name)
	}
	write("main.go", `package main

import (
	_ "github.com/outbox-relay/outbox-relay/inbox"
	_ "github.com/outbox-relay/outbox-relay/outbox"
)

func main() {}
`)
	write("go.mod", "module example.com/importer\n\ngo 1.26\n\nrequire github.com/outbox-relay/outbox-relay v0.0.0\n\n"+
		"replace github.com/outbox-relay/outbox-relay => "+root+"\n")
	gocmd := func(args ...string) string {
		cmd := exec.Command(goBin, args...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod")
		out, err := cmd.CombinedOutput()
		must(t, err, "go "+strings.Join(args, " ")+": "+string(out))
		return string(out)
	}
	gocmd("mod", "tidy")
	goMod, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	must(t, err, "read go.mod")
	goSum, err := os.ReadFile(filepath.Join(dir, "go.sum"))
	must(t, err, "read go.sum")
	built := strings.Join(slices.Compact(slices.Sorted(slices.Values(strings.Fields(
		gocmd("list", "-deps", "-f", "{{with .Module}}{{.Path}}{{end}}", "."))))), "\n")
	t.Logf("the importer's go.mod:\n%s\nmodules in its build:\n%s", goMod, built)

	for _, heavy := range []string{"github.com/nats-io/nats-server/", "github.com/prometheus/", "github.com/nats-io/jwt/",
		"go.yaml.in/yaml/", "gopkg.in/yaml", "github.com/rs/zerolog", "github.com/jackc/pglogrepl"} {
		if strings.Contains(string(goMod), heavy) {
			t.Errorf("the importer's go.mod requires %s", heavy)
		}
		if strings.Contains(built, heavy) {
			t.Errorf("the importer's build compiles %s", heavy)
		}
	}
	// go.sum also covers what the libraries' tests import (go test all); a YAML parser comes
	// in through testify, which pgx's own tests use as well, never through this module's code.
	for _, heavy := range []string{"github.com/nats-io/nats-server/", "github.com/prometheus/", "github.com/nats-io/jwt/", "github.com/rs/zerolog"} {
		if strings.Contains(string(goSum), heavy) {
			t.Errorf("the importer's go.sum lists %s: a test of outbox or inbox imports it (through testenv?)", heavy)
		}
	}
}
