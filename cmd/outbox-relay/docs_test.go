package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"unicode"

	"github.com/stretchr/testify/require"
)

// The documentation these tests keep honest: the README, every page under docs/, and extra.
func docFiles(t *testing.T, extra ...string) map[string]string {
	t.Helper()
	paths, err := filepath.Glob("../../docs/*.md")
	require.NoError(t, err)
	paths = append(paths, "../../README.md")
	paths = append(paths, extra...)
	docs := map[string]string{}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		require.NoError(t, err)
		docs[filepath.Clean(p)] = string(b)
	}
	require.Contains(t, docs, filepath.Clean("../../docs/cli.md"))
	return docs
}

// docCommands are the commands and subcommands whose flags the docs name, as dispatch takes them.
var docCommands = []string{"run", "migrate", "backfill", "prune",
	"publication create", "publication drop", "publication show",
	"slot create", "slot drop", "slot list"}

// commandFlags asks each command for its --help, as a user would, and reads the flags it lists.
func commandFlags(t *testing.T) map[string]map[string]bool {
	t.Helper()
	line := regexp.MustCompile(`(?m)^\s+-([a-z][a-z0-9-]*)`)
	out := map[string]map[string]bool{}
	for _, c := range docCommands {
		var stdout, stderr bytes.Buffer
		err := dispatch(context.Background(), append(strings.Fields(c), "--help"), &stdout, &stderr, noEnv)
		require.Truef(t, err == nil || errors.Is(err, flag.ErrHelp), "%s --help: %v", c, err)
		flags := map[string]bool{}
		for _, m := range line.FindAllStringSubmatch(stderr.String()+stdout.String(), -1) {
			flags[m[1]] = true
		}
		require.NotEmptyf(t, flags, "%s --help lists no flags:\n%s", c, stderr.String())
		out[c] = flags
	}
	// "publication" and "slot" stand for any of their subcommands.
	for _, group := range []string{"publication", "slot"} {
		all := map[string]bool{}
		for c, flags := range out {
			if strings.HasPrefix(c, group+" ") {
				for f := range flags {
					all[f] = true
				}
			}
		}
		out[group] = all
	}
	return out
}

// Flags of other tools the docs show next to the relay's: the nats CLI's, libpq's and kubectl's.
var foreignFlags = map[string]string{
	"server": "nats CLI", "pull": "nats CLI", "deliver": "nats CLI", "ack": "nats CLI",
	"defaults": "nats CLI", "subjects": "nats CLI", "count": "nats CLI", "version": "outbox-relay --version",
	"from-file": "kubectl",
}

var (
	flagRef     = regexp.MustCompile("(?:^|[^\\w-])--([a-z][a-z0-9-]*(?:\\*)?)")
	codeSpan    = regexp.MustCompile("`([^`\n]+)`")
	commandLine = regexp.MustCompile(`^(?:\./bin/)?(?:outbox-relay )?(run|migrate|backfill|prune|publication(?: create| drop| show)?|slot(?: create| drop| list)?)(?:\s|$)`)
	headingLine = regexp.MustCompile("^### `outbox-relay ([a-z]+)")
	yamlKey     = regexp.MustCompile(`^([a-z][a-z0-9_-]*):`)
	envVar      = regexp.MustCompile(`OUTBOX_RELAY_([A-Z][A-Z0-9_]*[A-Z0-9])`)
)

// known reports whether name (a flag, or a prefix ending in "-*" such as column-*) is one of flags.
func known(flags map[string]bool, name string) bool {
	if prefix, ok := strings.CutSuffix(name, "*"); ok {
		for f := range flags {
			if strings.HasPrefix(f, prefix) {
				return true
			}
		}
		return false
	}
	return flags[name]
}

func flagsIn(s string) []string {
	var out []string
	for _, m := range flagRef.FindAllStringSubmatch(" "+s, -1) {
		out = append(out, m[1])
	}
	return out
}

// commandFragments are the places in a line that show a command with its flags: a code span or
// a code block line starting with a command (outbox-relay run ..., run --temporary-slot), each
// cut at a shell &&, ; or |.
func commandFragments(line string, inCode bool) []string {
	var texts []string
	if inCode {
		texts = append(texts, strings.TrimSpace(line))
	}
	for _, m := range codeSpan.FindAllStringSubmatch(line, -1) {
		texts = append(texts, m[1])
	}
	var out []string
	for _, text := range texts {
		for _, part := range regexp.MustCompile(`&&|;|\|`).Split(text, -1) {
			part = strings.TrimSpace(part)
			if i := strings.Index(part, "outbox-relay "); i > 0 {
				part = part[i:]
			}
			if commandLine.MatchString(part) {
				out = append(out, part)
			}
		}
	}
	return out
}

// Every --flag the README and docs/ name is a flag of the relay (of the command the text shows
// it with, where it shows one; of run for a key of a YAML config file; of any command for an
// OUTBOX_RELAY_* variable), and each command's section in docs/cli.md names all of its flags.
func TestDocs_FlagsMatchTheCommands(t *testing.T) {
	docs := docFiles(t)
	cmds := commandFlags(t)
	all := map[string]bool{}
	for _, flags := range cmds {
		for f := range flags {
			all[f] = true
		}
	}
	var problems []string
	section := map[string]string{} // command → its section of docs/cli.md
	for path, text := range docs {
		inCode, inYAML := false, false
		current := ""
		for i, line := range strings.Split(text, "\n") {
			where := func(format string, args ...any) {
				problems = append(problems, path+":"+strconv.Itoa(i+1)+": "+fmt.Sprintf(format, args...))
			}
			if strings.HasPrefix(line, "```") {
				inCode = !inCode
				inYAML = inCode && strings.HasPrefix(line, "```yaml")
				continue
			}
			// A YAML block is a config file: its keys are run's flags (run refuses other keys).
			if m := yamlKey.FindStringSubmatch(line); inYAML && m != nil && !cmds["run"][strings.ReplaceAll(m[1], "_", "-")] {
				where("config file key %s: run has no flag --%s", m[1], m[1])
			}
			for _, m := range envVar.FindAllStringSubmatch(line, -1) {
				if f := strings.ToLower(strings.ReplaceAll(m[1], "_", "-")); !all[f] {
					where("%s names no flag (--%s)", m[0], f)
				}
			}
			if !inCode && strings.HasPrefix(line, "#") {
				current = ""
				if m := headingLine.FindStringSubmatch(line); m != nil && strings.HasSuffix(path, "cli.md") {
					current = m[1]
				}
			}
			if current != "" {
				section[current] += line + "\n"
			}
			for _, f := range flagsIn(line) {
				if _, ok := foreignFlags[f]; !ok && !known(all, f) {
					where("--%s is no flag of any command", f)
				}
			}
			for _, frag := range commandFragments(line, inCode) {
				cmd := commandLine.FindStringSubmatch(frag)[1]
				for _, f := range flagsIn(frag) {
					if _, ok := foreignFlags[f]; !ok && !known(cmds[cmd], f) {
						where("`%s`: %s has no flag --%s", frag, cmd, f)
					}
				}
			}
			// A flag table in a command's section lists that command's flags; the publication
			// and slot tables name the subcommand in the first cell and its flags in the second.
			if current != "" && !inCode && strings.HasPrefix(line, "| `") {
				cells := strings.Split(line, "|")
				first := strings.Trim(strings.TrimSpace(cells[1]), "`")
				switch {
				case strings.HasPrefix(first, "--"):
					for _, f := range flagsIn(cells[1]) {
						if !known(cmds[current], f) {
							where("the %s table lists --%s, which %s does not have", current, f, current)
						}
					}
				case cmds[first] != nil:
					for _, f := range flagsIn(cells[2]) {
						if !known(cmds[first], f) {
							where("the %s table lists --%s for %s, which does not have it", current, f, first)
						}
					}
				}
			}
		}
	}
	for cmd, text := range section {
		named := map[string]bool{}
		for _, f := range flagsIn(text) {
			named[f] = true
		}
		for f := range cmds[cmd] {
			if !namedIn(named, f) && !documentedForAll(f) {
				problems = append(problems, fmt.Sprintf("docs/cli.md: the section of %s does not document its flag --%s", cmd, f))
			}
		}
	}
	require.Contains(t, section, "run")
	require.Contains(t, section, "prune")
	sort.Strings(problems)
	require.Empty(t, problems, "the docs and the commands disagree:\n%s", strings.Join(problems, "\n"))
}

// namedIn reports whether flag f is among named, itself or through a pattern such as column-*.
func namedIn(named map[string]bool, f string) bool {
	for n := range named {
		if n == f || strings.HasSuffix(n, "*") && strings.HasPrefix(f, strings.TrimSuffix(n, "*")) {
			return true
		}
	}
	return false
}

// documentedForAll: flags every command shares, documented once for all of them in docs/cli.md.
func documentedForAll(f string) bool {
	switch f {
	case "config", "log-level", "log-format", "require-tls":
		return true
	}
	return strings.HasPrefix(f, "nats-")
}

// GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens, a -N suffix
// for repeats.
func anchors(text string) map[string]bool {
	out := map[string]bool{}
	seen := map[string]int{}
	inCode := false
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, "```") {
			inCode = !inCode
		}
		if inCode || !strings.HasPrefix(line, "#") {
			continue
		}
		title := strings.TrimSpace(strings.TrimLeft(line, "#"))
		var b strings.Builder
		for _, r := range strings.ToLower(title) {
			switch {
			case r == ' ':
				b.WriteRune('-')
			case r == '-' || r == '_' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r > 127 && unicode.IsLetter(r):
				b.WriteRune(r)
			}
		}
		a := b.String()
		if n := seen[a]; n > 0 {
			out[a+"-"+strconv.Itoa(n)] = true
		} else {
			out[a] = true
		}
		seen[a]++
	}
	return out
}

// Every relative link of the README, docs/ and bench/README.md leads to a file that exists, and to a heading
// of it when it names one.
func TestDocs_RelativeLinksResolve(t *testing.T) {
	docs := docFiles(t, "../../bench/README.md")
	link := regexp.MustCompile(`\]\(([^)\s]+)\)`)
	var problems []string
	checked := 0
	for path, text := range docs {
		inCode := false
		for i, line := range strings.Split(text, "\n") {
			if strings.HasPrefix(line, "```") {
				inCode = !inCode
			}
			if inCode {
				continue
			}
			for _, m := range link.FindAllStringSubmatch(line, -1) {
				target := m[1]
				if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
					continue
				}
				checked++
				file, anchor, _ := strings.Cut(target, "#")
				resolved := path
				if file != "" {
					resolved = filepath.Join(filepath.Dir(path), file)
					if _, err := os.Stat(resolved); err != nil {
						problems = append(problems, fmt.Sprintf("%s:%d: %s: no such file", path, i+1, target))
						continue
					}
				}
				if anchor == "" {
					continue
				}
				if !strings.HasSuffix(resolved, ".md") {
					problems = append(problems, fmt.Sprintf("%s:%d: %s: an anchor into a file that is not Markdown", path, i+1, target))
					continue
				}
				b, err := os.ReadFile(resolved)
				require.NoError(t, err)
				if !anchors(string(b))[anchor] {
					problems = append(problems, fmt.Sprintf("%s:%d: %s: no heading with that anchor", path, i+1, target))
				}
			}
		}
	}
	require.Greater(t, checked, 20, "the docs should link to each other")
	sort.Strings(problems)
	require.Empty(t, problems, "broken links:\n%s", strings.Join(problems, "\n"))
}
