package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/rs/zerolog"
	"go.yaml.in/yaml/v3"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/sink"
)

// envName is the environment variable that may set a flag: OUTBOX_RELAY_<FLAG_IN_UPPER_SNAKE>.
func envName(flagName string) string {
	return "OUTBOX_RELAY_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// parseFlags parses args into fs, then fills every flag not given on the command line from its
// environment variable, then from the --config file if fs has that flag. Precedence:
// flag > environment > config file > default.
func parseFlags(fs *flag.FlagSet, args []string, lookupEnv func(string) (string, bool)) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (flags start with --)", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] {
			return
		}
		if v, ok := lookupEnv(envName(f.Name)); ok {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Errorf("%s=%q: %w", envName(f.Name), v, err))
			}
		}
	})
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if f := fs.Lookup("config"); f != nil && f.Value.String() != "" {
		for name := range set {
			set[name] = true
		}
		fs.VisitAll(func(f *flag.Flag) {
			if _, ok := lookupEnv(envName(f.Name)); ok {
				set[f.Name] = true
			}
		})
		return applyConfigFile(fs, f.Value.String(), set)
	}
	return nil
}

// applyConfigFile sets every flag not in set from the YAML file at path. Keys are flag names
// (pg-url, or pg_url); lists become comma-separated values. In the run command an unknown key
// is an error (a typo would otherwise be silently ignored); other commands skip the keys they
// do not have, so one file serves them all.
func applyConfigFile(fs *flag.FlagSet, path string, set map[string]bool) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("--config: %w", err)
	}
	var m map[string]any
	if err := yaml.Unmarshal(b, &m); err != nil {
		return fmt.Errorf("--config %s: not a YAML mapping of flag names to values: %w", path, err)
	}
	var errs []error
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, key := range keys {
		name := strings.ReplaceAll(key, "_", "-")
		f := fs.Lookup(name)
		switch {
		case name == "config":
			errs = append(errs, fmt.Errorf("--config %s: a config file cannot name another one", path))
			continue
		case f == nil && fs.Name() == "run":
			errs = append(errs, fmt.Errorf("--config %s: unknown key %q (keys are the flag names, e.g. pg-url)", path, key))
			continue
		case f != nil:
			if cs, ok := f.Value.(configSetter); ok {
				if err := cs.setConfig(m[key], set[name]); err != nil {
					errs = append(errs, fmt.Errorf("--config %s: key %s: %w", path, key, err))
				}
				continue
			}
		}
		if f == nil || set[name] {
			continue
		}
		v, err := configValue(m[key])
		if err == nil {
			err = fs.Set(name, v)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("--config %s: key %s: %w", path, key, err))
		}
	}
	return errors.Join(errs...)
}

// configSetter is a flag that reads its config-file value itself (--table's list of mappings);
// given: the flag was set on the command line or from the environment.
type configSetter interface {
	setConfig(v any, given bool) error
}

func configValue(v any) (string, error) {
	switch v := v.(type) {
	case nil:
		return "", nil
	case string:
		return v, nil
	case bool, int, int64, uint64, float64:
		return fmt.Sprint(v), nil
	case []any:
		parts := make([]string, 0, len(v))
		for _, e := range v {
			s, err := configValue(e)
			if err != nil {
				return "", err
			}
			parts = append(parts, s)
		}
		return strings.Join(parts, ","), nil
	}
	return "", fmt.Errorf("value of type %T: use a string, number, boolean or list", v)
}

func newFlagSet(name, usage string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: outbox-relay %s [flags]\n\n%s\n\nflags (each also read from OUTBOX_RELAY_<FLAG_IN_UPPER_SNAKE>):\n", name, usage)
		fs.PrintDefaults()
	}
	return fs
}

// parseCommand parses a command's flags (flag > environment > config file > default), builds
// its logger and checks --pg-url, which every command needs. --help is returned as
// flag.ErrHelp (exit 0), anything else wrong as a usageError (exit 2).
func parseCommand(fs *flag.FlagSet, args []string, env func(string) (string, bool), lf *logFlags, stderr io.Writer, pgURL *string) (zerolog.Logger, error) {
	err := parseFlags(fs, args, env)
	registerSecrets(fs)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return zerolog.Nop(), err
		}
		return zerolog.Nop(), usageError{err}
	}
	if err := checkIdentifierFlags(fs); err != nil {
		return zerolog.Nop(), usageError{err}
	}
	log, err := lf.logger(stderr)
	if err != nil {
		return zerolog.Nop(), usageError{err}
	}
	if *pgURL == "" {
		return zerolog.Nop(), usageError{fmt.Errorf("--pg-url is required (or %s)", envName("pg-url"))}
	}
	tr := checkTransport(fs, lf.requireTLS, os.Getenv)
	for _, w := range append(tr.warnings, secretFileWarnings(fs, os.Getenv)...) {
		log.Warn().Msg(w)
	}
	if len(tr.refusals) > 0 {
		return zerolog.Nop(), usageError{errors.New(strings.Join(tr.refusals, "\n"))}
	}
	return log, nil
}

// logFlags are shared by every command: --config, the log's, and --require-tls.
type logFlags struct {
	level, format string
	requireTLS    bool
}

func (l *logFlags) register(fs *flag.FlagSet) {
	fs.String("config", "", "YAML file of flag values (keys are flag names); flags and environment variables override it")
	fs.StringVar(&l.level, "log-level", "info", "log level: debug, info, warn, error")
	fs.StringVar(&l.format, "log-format", "console", "log format: json or console")
	fs.BoolVar(&l.requireTLS, "require-tls", false, "refuse to connect to Postgres without sslmode=verify-full or verify-ca, or to NATS without a tls:// URL or --nats-tls-ca/--nats-tls-cert (Unix sockets and loopback addresses excepted)")
}

func (l *logFlags) logger(w io.Writer) (zerolog.Logger, error) {
	lvl, err := zerolog.ParseLevel(l.level)
	if err != nil || l.level == "" {
		return zerolog.Nop(), fmt.Errorf("--log-level %q: use debug, info, warn or error", l.level)
	}
	switch l.format {
	case "json":
	case "console":
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: time.RFC3339Nano, NoColor: !isTerminal(w)}
	default:
		return zerolog.Nop(), fmt.Errorf("--log-format %q: use json or console", l.format)
	}
	return zerolog.New(w).Level(lvl).With().Timestamp().Logger(), nil
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// checkIdentifierFlags refuses control characters in every flag naming a Postgres identifier:
// --table (schema and table), --publication, --slot and the --column-* names.
func checkIdentifierFlags(fs *flag.FlagSet) error {
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if err != nil {
			return
		}
		switch n := f.Name; {
		case n == "table" || n == "publication" || n == "slot" || strings.HasPrefix(n, "column-"):
			err = migrations.CheckIdentifier("--"+n, f.Value.String())
		}
		if err == nil && f.Name == "slot" {
			err = checkSlotName(f.Value.String())
		}
	})
	return err
}

// checkSlotName applies Postgres' rule for replication slot names. The name goes unquoted
// into the replication commands START_REPLICATION and CREATE_REPLICATION_SLOT, so nothing
// else may reach them.
func checkSlotName(s string) error {
	if s == "" || len(s) > 63 {
		return fmt.Errorf("--slot %q: a replication slot name has 1 to 63 characters", s)
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return fmt.Errorf("--slot %q: a replication slot name may contain only lower case letters, digits and underscores", s)
		}
	}
	return nil
}

// splitTable splits "schema.table" (default schema public).
func splitTable(s string) (schema, table string, err error) {
	parts := strings.Split(s, ".")
	switch {
	case len(parts) == 1 && parts[0] != "":
		return "public", parts[0], nil
	case len(parts) == 2 && parts[0] != "" && parts[1] != "":
		return parts[0], parts[1], nil
	}
	return "", "", fmt.Errorf("--table %q: use table or schema.table", s)
}

// subjectTemplate parses --subject-template against --subject-prefix and binds the feed to the
// template's literal leading tokens: the stream must cover <them>.>, and the position record is
// keyed by them.
func subjectTemplate(template string, scfg *sink.Config) (*decoder.SubjectTemplate, error) {
	subject, err := decoder.ParseSubjectTemplate(template, scfg.SubjectPrefix)
	if err != nil {
		return nil, usageError{fmt.Errorf("--subject-template: %w", err)}
	}
	scfg.SubjectPrefix = subject.Prefix()
	return subject, nil
}

// parseStartLSN parses --start-lsn ("" is none).
func parseStartLSN(s string) (pglogrepl.LSN, error) {
	if s == "" {
		return 0, nil
	}
	lsn, err := pglogrepl.ParseLSN(s)
	if err != nil {
		return 0, fmt.Errorf("--start-lsn %q: use the X/Y form Postgres prints, e.g. 0/16B3748", s)
	}
	return lsn, nil
}
