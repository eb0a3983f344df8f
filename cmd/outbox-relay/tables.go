package main

import (
	"flag"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/relay"
)

// tableSpec is one outbox table as --table or the config file's table list names it: its name,
// and the settings of its own a config-file entry gives (the global flags otherwise).
type tableSpec struct {
	name     string            // schema.table or table
	template string            // subject-template; "": --subject-template
	stream   string            // stream; "": --stream
	columns  map[string]string // column-* flag name -> column; missing: the --column-* flag
}

func (t tableSpec) own() bool { return t.template != "" || t.stream != "" || len(t.columns) > 0 }

// tableFlag is --table: given more than once (or as a comma-separated value, or the config
// file's list) it names several outbox tables. Config-file entries may be mappings with a
// table's own settings (see parseTableEntry).
type tableFlag struct {
	def    string
	specs  []tableSpec
	set    bool        // a value replaced the default
	file   []tableSpec // the config file's entries, also when --table overrode them
	single bool        // the command works on one table at a time (backfill, prune)
}

func newTableFlag(def string) *tableFlag {
	return &tableFlag{def: def, specs: []tableSpec{{name: def}}}
}

func (f *tableFlag) String() string {
	if f == nil {
		return ""
	}
	names := make([]string, len(f.specs))
	for i, s := range f.specs {
		names[i] = s.name
	}
	return strings.Join(names, ",")
}

// Set adds the tables of v (comma separated); the first value replaces the default.
func (f *tableFlag) Set(v string) error {
	if !f.set {
		f.specs, f.set = nil, true
	}
	for _, name := range strings.Split(v, ",") {
		if name = strings.TrimSpace(name); name != "" {
			f.specs = append(f.specs, tableSpec{name: name})
		}
	}
	return nil
}

// setConfig takes the config file's table value: a name, or a list of names and mappings.
// When the flag was given (command line, environment) its tables stay, and the file's entries
// only lend their settings to the tables of the same name.
func (f *tableFlag) setConfig(v any, given bool) error {
	list, ok := v.([]any)
	if !ok {
		list = []any{v}
	}
	var specs []tableSpec
	for i, e := range list {
		spec, err := parseTableEntry(e)
		if err != nil {
			return fmt.Errorf("entry %d: %w", i+1, err)
		}
		specs = append(specs, spec)
	}
	f.file = specs
	if !given {
		f.specs, f.set = specs, true
	}
	return nil
}

// tableKeys are the keys of a config-file table mapping besides name.
var tableKeys = []string{"subject-template", "stream", "column-id", "column-aggregate-type", "column-aggregate-id",
	"column-event-type", "column-payload", "column-headers", "column-created-at"}

// parseTableEntry reads one config-file table: "schema.table", or a mapping
// {name: schema.table, subject-template: ..., stream: ..., column-id: ..., ...}.
func parseTableEntry(e any) (tableSpec, error) {
	switch e := e.(type) {
	case string:
		return tableSpec{name: e}, nil
	case map[string]any:
		var t tableSpec
		keys := make([]string, 0, len(e))
		for k := range e {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			v, ok := e[k].(string)
			if !ok {
				return t, fmt.Errorf("key %s: use a string", k)
			}
			switch key := strings.ReplaceAll(k, "_", "-"); {
			case key == "name":
				t.name = v
			case key == "subject-template":
				t.template = v
			case key == "stream":
				t.stream = v
			case strings.HasPrefix(key, "column-") && slices.Contains(tableKeys, key):
				if err := migrations.CheckIdentifier(key, v); err != nil {
					return t, err
				}
				if t.columns == nil {
					t.columns = map[string]string{}
				}
				t.columns[key] = v
			default:
				return t, fmt.Errorf("unknown key %q (a table takes name, %s)", k, strings.Join(tableKeys, ", "))
			}
		}
		if t.name == "" {
			return t, fmt.Errorf("a table mapping needs name: schema.table")
		}
		return t, nil
	}
	return tableSpec{}, fmt.Errorf("a table is a name (schema.table) or a mapping with name:, not %T", e)
}

// tables are the tables named, each with the settings of the config-file entry of its name.
func (f *tableFlag) tables() []tableSpec {
	out := make([]tableSpec, len(f.specs))
	for i, s := range f.specs {
		out[i] = s
		if s.own() {
			continue
		}
		for _, e := range f.file {
			if e.name == s.name || "public."+e.name == s.name || e.name == "public."+s.name {
				out[i] = tableSpec{name: s.name, template: e.template, stream: e.stream, columns: e.columns}
			}
		}
	}
	return out
}

// apply puts the tables into cfg: one table without settings of its own as Config.Schema and
// Config.Table (as ever), else Config.Tables, each with the --column-* flags (cfg.Columns)
// under its own columns. A command that works on one table at a time refuses several.
func (f *tableFlag) apply(cfg *relay.Config, command string) error {
	specs := f.tables()
	if len(specs) == 0 {
		return fmt.Errorf("--table names no table")
	}
	if f.single && len(specs) > 1 {
		return fmt.Errorf("%s works on one outbox table at a time and --table names %d (%s): run it once per table with --table <that table> (on the command line it overrides the config file's list, whose entry of that name still lends its columns and subject template)", command, len(specs), f)
	}
	if len(specs) == 1 && !specs[0].own() {
		var err error
		cfg.Schema, cfg.Table, err = splitTable(specs[0].name)
		return err
	}
	cfg.Tables = nil
	for _, s := range specs {
		schema, name, err := splitTable(s.name)
		if err != nil {
			return err
		}
		cfg.Tables = append(cfg.Tables, relay.Table{Schema: schema, Name: name, Columns: s.columnsOver(cfg.Columns), SubjectTemplate: s.template, Stream: s.stream})
	}
	return nil
}

// columnsOver is def with the table's own columns: its --column-* keys set through the flags
// themselves (registerColumnFlags), so a column flag is mapped to its field in one place.
func (t tableSpec) columnsOver(def decoder.Columns) decoder.Columns {
	var c decoder.Columns
	fs := flag.NewFlagSet("columns", flag.ContinueOnError)
	registerColumnFlags(fs, &c)
	c = def // the flags point into c: their defaults give way to def
	for key, v := range t.columns {
		if err := fs.Set(key, v); err != nil {
			panic(fmt.Sprintf("table key %s: %v", key, err)) // parseTableEntry admits column flags only
		}
	}
	return c
}
