package main

import (
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// transportReport is what checkTransport found: warnings to log, and, with --require-tls,
// the refusals.
type transportReport struct {
	warnings, refusals []string
}

// checkTransport checks how the command's connections are protected (the flags it has:
// --pg-url, and --nats-url with the --nats-* flags). A Postgres connection is protected with
// sslmode verify-full or verify-ca (the server's certificate is checked); a NATS connection
// with a tls:// (or wss://) URL or --nats-tls-ca/--nats-tls-cert (TLS is required and the
// certificate checked). Connections over a Unix socket or to a loopback address never leave
// the host (or pod) and need neither. Without --require-tls an unprotected connection is a
// warning (for NATS: only when a password or token crosses it); with it, a refusal.
func checkTransport(fs *flag.FlagSet, requireTLS bool, getenv func(string) string) transportReport {
	var r transportReport
	if f := fs.Lookup("pg-url"); f != nil && f.Value.String() != "" {
		checkPGTransport(&r, f.Value.String(), requireTLS, getenv)
	}
	if f := fs.Lookup("nats-url"); f != nil && !flagTrue(fs, "embedded-nats") {
		str := func(name string) string {
			if f := fs.Lookup(name); f != nil {
				return f.Value.String()
			}
			return ""
		}
		tlsFlags := str("nats-tls-ca") != "" || str("nats-tls-cert") != ""
		secretFlags := str("nats-password") != "" || str("nats-password-file") != "" || str("nats-token") != "" || str("nats-token-file") != ""
		checkNATSTransport(&r, f.Value.String(), tlsFlags, secretFlags, requireTLS)
	}
	return r
}

func flagTrue(fs *flag.FlagSet, name string) bool {
	f := fs.Lookup(name)
	return f != nil && f.Value.String() == "true"
}

const pgTLSFix = "add sslmode=verify-full&sslrootcert=<CA PEM file> to --pg-url (sslmode=verify-ca when the certificate does not name the host; key/value DSN: sslmode=verify-full sslrootcert=...)"

func checkPGTransport(r *transportReport, connString string, requireTLS bool, getenv func(string) string) {
	settings := pgSettings(connString)
	mode, from := settings["sslmode"], "--pg-url"
	if mode == "" {
		mode, from = getenv("PGSSLMODE"), "PGSSLMODE"
	}
	if mode == "" {
		mode, from = "prefer", "default"
	}
	if mode == "verify-full" || mode == "verify-ca" {
		return
	}
	cfg, err := pgconn.ParseConfig(connString)
	if err != nil {
		return // the connection reports it
	}
	hosts := []string{cfg.Host}
	for _, fb := range cfg.Fallbacks {
		hosts = append(hosts, fb.Host)
	}
	remote := remoteHosts(hosts)
	if len(remote) == 0 {
		return
	}
	var what string
	switch {
	case from == "default":
		what = "--pg-url sets no sslmode, so libpq's default applies: prefer, which encrypts without checking the server's certificate and falls back to plain text if the server (or a man in the middle) declines TLS"
	case mode == "require":
		what = fmt.Sprintf("sslmode=require (%s) encrypts without checking the server's certificate: a man in the middle can pose as the server", from)
	case mode == "disable":
		what = fmt.Sprintf("sslmode=disable (%s) sends everything in plain text", from)
	default:
		what = fmt.Sprintf("sslmode=%s (%s) may fall back to plain text and does not check the server's certificate", mode, from)
	}
	hostList := strings.Join(remote, ", ")
	if requireTLS {
		r.refusals = append(r.refusals, fmt.Sprintf("--require-tls: the Postgres connection to %s is not verified TLS: %s. Fix: %s", hostList, what, pgTLSFix))
		return
	}
	r.warnings = append(r.warnings, fmt.Sprintf("the Postgres connection to %s is not verified TLS: %s; the password and every event can be read or altered on the way. Fix: %s (--require-tls makes this an error)", hostList, what, pgTLSFix))
}

const natsTLSFix = "use a tls:// URL in --nats-url (its certificate publicly trusted) or pass --nats-tls-ca <CA PEM file>"

func checkNATSTransport(r *transportReport, list string, tlsFlags, secretFlags, requireTLS bool) {
	if tlsFlags {
		return
	}
	var plain []string
	userinfo := false
	for _, s := range strings.Split(list, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if !strings.Contains(s, "://") {
			s = "nats://" + s
		}
		u, err := url.Parse(s)
		if err != nil {
			continue // the connection reports it
		}
		if u.User != nil {
			userinfo = true
		}
		if scheme := strings.ToLower(u.Scheme); scheme == "tls" || scheme == "wss" {
			continue
		}
		if len(remoteHosts([]string{u.Hostname()})) > 0 {
			plain = append(plain, u.Scheme+"://"+u.Host)
		}
	}
	if len(plain) == 0 {
		return
	}
	hostList := strings.Join(plain, ", ")
	switch {
	case requireTLS:
		r.refusals = append(r.refusals, fmt.Sprintf("--require-tls: the NATS connection to %s does not require TLS (a nats:// URL uses TLS only if the server asks for it). Fix: %s", hostList, natsTLSFix))
	case secretFlags || userinfo:
		r.warnings = append(r.warnings, fmt.Sprintf("the NATS password or token goes to %s, which does not require TLS: it crosses the network in plain text unless the server asks for TLS (and a man in the middle would not). Fix: %s (--require-tls makes this an error)", hostList, natsTLSFix))
	}
}

// remoteHosts returns the hosts that are neither a Unix socket directory nor a loopback
// address.
func remoteHosts(hosts []string) []string {
	var out []string
	for _, h := range hosts {
		if h == "" || strings.HasPrefix(h, "/") || strings.HasPrefix(h, "@") || strings.EqualFold(h, "localhost") {
			continue
		}
		if ip := net.ParseIP(strings.Trim(h, "[]")); ip != nil && ip.IsLoopback() {
			continue
		}
		out = append(out, h)
	}
	return out
}

// pgSettings returns the parameters of a Postgres URL's query or of a key/value DSN.
func pgSettings(connString string) map[string]string {
	m := map[string]string{}
	l := strings.ToLower(strings.TrimSpace(connString))
	if strings.HasPrefix(l, "postgres://") || strings.HasPrefix(l, "postgresql://") {
		if i := strings.LastIndexByte(connString, '?'); i >= 0 {
			if q, err := url.ParseQuery(connString[i+1:]); err == nil {
				for k, v := range q {
					m[k] = v[len(v)-1]
				}
			}
		}
		return m
	}
	s := connString
	for {
		s = strings.TrimLeft(s, " \t\n\r")
		eq := strings.IndexByte(s, '=')
		if eq < 0 {
			return m
		}
		key := strings.TrimSpace(s[:eq])
		s = strings.TrimLeft(s[eq+1:], " \t\n\r")
		var v strings.Builder
		if strings.HasPrefix(s, "'") {
			i := 1
			for ; i < len(s) && s[i] != '\''; i++ {
				if s[i] == '\\' && i+1 < len(s) {
					i++
				}
				v.WriteByte(s[i])
			}
			s = s[min(i+1, len(s)):]
		} else {
			end := strings.IndexAny(s, " \t\n\r")
			if end < 0 {
				end = len(s)
			}
			v.WriteString(s[:end])
			s = s[end:]
		}
		m[key] = v.String()
	}
}

// secretFileWarnings warns about each file holding a secret or the configuration that others
// may read, or group unless root owns it: the config file, the --nats-* secret and key files,
// libpq's passfile (passfile= in --pg-url, PGPASSFILE, or ~/.pgpass) and sslkey. A root-owned
// file readable by its group is how a service that does not run as root is given a secret
// (Postgres accepts its key file so, 0640 owned by root) and the only way a Kubernetes secret
// volume reaches a non-root container: the kubelet writes the files as root and, with the
// pod's fsGroup, adds group read whatever defaultMode says.
func secretFileWarnings(fs *flag.FlagSet, getenv func(string) string) []string {
	type file struct{ what, path string }
	var files []file
	for _, name := range []string{"config", "nats-password-file", "nats-token-file", "nats-creds", "nats-nkey", "nats-tls-key"} {
		if f := fs.Lookup(name); f != nil && f.Value.String() != "" {
			files = append(files, file{"--" + name, f.Value.String()})
		}
	}
	if f := fs.Lookup("pg-url"); f != nil && f.Value.String() != "" {
		settings := pgSettings(f.Value.String())
		switch {
		case settings["passfile"] != "":
			files = append(files, file{"the passfile in --pg-url", settings["passfile"]})
		case getenv("PGPASSFILE") != "":
			files = append(files, file{"PGPASSFILE", getenv("PGPASSFILE")})
		default:
			if home, err := os.UserHomeDir(); err == nil {
				files = append(files, file{"the libpq password file", filepath.Join(home, ".pgpass")})
			}
		}
		if settings["sslkey"] != "" {
			files = append(files, file{"the sslkey in --pg-url", settings["sslkey"]})
		}
	}
	var out []string
	for _, f := range files {
		st, err := os.Stat(f.path)
		if err != nil || !st.Mode().IsRegular() {
			continue // a missing file is reported by whoever reads it
		}
		if perm := st.Mode().Perm(); perm&0o004 == 0 && (perm&0o040 == 0 || ownedByRoot(st)) {
			continue
		}
		out = append(out, fmt.Sprintf("%s %s is readable by group or others (mode %04o) and holds secrets. Fix: chmod 600 %s, or chmod 640 with root as its owner and the relay's group (in Kubernetes: defaultMode: 0440 on the secret volume and the pod's fsGroup, as in deploy/kubernetes)", f.what, f.path, st.Mode().Perm(), f.path))
	}
	return out
}
