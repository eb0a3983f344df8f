package main

import (
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"os"
	"strings"

	"github.com/nats-io/nats.go"
)

// natsAuth holds the --nats-* authentication and TLS flags. Secrets (password, token) are
// only ever handed to nats.go; they are never logged nor put in an error.
type natsAuth struct {
	creds, nkey             string
	user, password, token   string
	passwordFile, tokenFile string
	tlsCA, tlsCert, tlsKey  string
}

func (a *natsAuth) register(fs *flag.FlagSet) {
	fs.StringVar(&a.creds, "nats-creds", "", "NATS user credentials file (JWT + nkey seed, .creds), for servers in operator mode")
	fs.StringVar(&a.nkey, "nats-nkey", "", "file holding the NATS user nkey seed (SU...); the relay signs the server's nonce with it")
	fs.StringVar(&a.user, "nats-user", "", "NATS user name (with --nats-password)")
	fs.StringVar(&a.password, "nats-password", "", "NATS password (with --nats-user); prefer OUTBOX_RELAY_NATS_PASSWORD or the config file to keep it out of ps")
	fs.StringVar(&a.token, "nats-token", "", "NATS authentication token; prefer OUTBOX_RELAY_NATS_TOKEN or the config file to keep it out of ps")
	fs.StringVar(&a.passwordFile, "nats-password-file", "", "file holding the NATS password (instead of --nats-password; one trailing newline is ignored)")
	fs.StringVar(&a.tokenFile, "nats-token-file", "", "file holding the NATS token (instead of --nats-token; one trailing newline is ignored)")
	fs.StringVar(&a.tlsCA, "nats-tls-ca", "", "PEM file of the CA(s) that signed the NATS server's certificate; implies TLS")
	fs.StringVar(&a.tlsCert, "nats-tls-cert", "", "PEM client certificate for servers that verify clients (with --nats-tls-key); implies TLS")
	fs.StringVar(&a.tlsKey, "nats-tls-key", "", "PEM private key of --nats-tls-cert")
}

// set reports whether any of the flags was given.
func (a *natsAuth) set() bool {
	return *a != natsAuth{}
}

// options checks the flags (one authentication method at most, pairs complete, files
// readable) and returns the nats.go options they stand for. Its errors are usage errors that
// name the flag; they never contain a secret.
func (a *natsAuth) options(natsURL string) ([]nats.Option, error) {
	if err := a.readSecretFiles(); err != nil {
		return nil, err
	}
	var methods []string
	if a.creds != "" {
		methods = append(methods, "--nats-creds")
	}
	if a.nkey != "" {
		methods = append(methods, "--nats-nkey")
	}
	if a.user != "" || a.password != "" {
		methods = append(methods, "--nats-user/--nats-password")
	}
	if a.token != "" {
		methods = append(methods, "--nats-token")
	}
	if len(methods) > 1 {
		return nil, fmt.Errorf("%s exclude each other: NATS authenticates a connection one way; keep the one your server's authorization block expects", strings.Join(methods, " and "))
	}
	if len(methods) == 1 && urlHasUserinfo(natsURL) {
		return nil, fmt.Errorf("--nats-url carries credentials (user@ or token@) and %s is set too: keep one of them", methods[0])
	}
	if (a.user == "") != (a.password == "") {
		return nil, errors.New("--nats-user and --nats-password go together: set both")
	}
	if (a.tlsCert == "") != (a.tlsKey == "") {
		return nil, errors.New("--nats-tls-cert and --nats-tls-key go together: set both")
	}

	var opts []nats.Option
	for flagName, file := range map[string]string{"nats-creds": a.creds, "nats-tls-cert": a.tlsCert, "nats-tls-key": a.tlsKey} {
		if file == "" {
			continue
		}
		if _, err := os.Stat(file); err != nil {
			return nil, fmt.Errorf("--%s: %w", flagName, err)
		}
	}
	switch {
	case a.creds != "":
		opts = append(opts, nats.UserCredentials(a.creds))
	case a.nkey != "":
		o, err := nats.NkeyOptionFromSeed(a.nkey)
		if err != nil {
			// nats.go's error names the file or the problem, not the seed.
			return nil, fmt.Errorf("--nats-nkey %s: %w (the file must hold a user seed, SU...)", a.nkey, err)
		}
		opts = append(opts, o)
	case a.user != "":
		opts = append(opts, nats.UserInfo(a.user, a.password))
	case a.token != "":
		opts = append(opts, nats.Token(a.token))
	}
	if a.tlsCA != "" {
		pem, err := os.ReadFile(a.tlsCA)
		if err != nil {
			return nil, fmt.Errorf("--nats-tls-ca: %w", err)
		}
		if !x509.NewCertPool().AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--nats-tls-ca %s: no PEM certificate in the file", a.tlsCA)
		}
		opts = append(opts, nats.RootCAs(a.tlsCA))
	}
	if a.tlsCert != "" {
		opts = append(opts, nats.ClientCert(a.tlsCert, a.tlsKey))
	}
	if a.tlsCA != "" || a.tlsCert != "" {
		// RootCAs and ClientCert already set Secure; stated here because it is the contract:
		// with a CA or a client certificate the relay never falls back to plain text.
		opts = append(opts, nats.Secure())
	}
	return opts, nil
}

// urlHasUserinfo reports whether any URL of a comma-separated NATS URL list carries user
// information (user:password@ or token@).
func urlHasUserinfo(list string) bool {
	for _, s := range strings.Split(list, ",") {
		s = strings.TrimSpace(s)
		if !strings.Contains(s, "://") {
			s = "nats://" + s
		}
		if u, err := url.Parse(s); err == nil && u.User != nil {
			return true
		}
	}
	return false
}

// natsConnectHint names the fix for a failed NATS connection, or returns "".
func natsConnectHint(err error) string {
	msg := strings.ToLower(err.Error())
	var unknownAuthority x509.UnknownAuthorityError
	var hostname x509.HostnameError
	switch {
	case errors.Is(err, nats.ErrAuthorization) || errors.Is(err, nats.ErrAuthExpired) || errors.Is(err, nats.ErrAuthRevoked) ||
		strings.Contains(msg, "authorization") || strings.Contains(msg, "authentication"):
		return "NATS refused the credentials. Fix: check --nats-user/--nats-password, --nats-token, --nats-nkey or --nats-creds (or the user:password@ in --nats-url) against the server's authorization block"
	case errors.As(err, &unknownAuthority) || strings.Contains(msg, "certificate signed by unknown authority"):
		return "the NATS server's TLS certificate is not signed by a CA the relay trusts. Fix: pass the CA's PEM file with --nats-tls-ca"
	case errors.As(err, &hostname) || strings.Contains(msg, "certificate is valid for"):
		return "the NATS server's TLS certificate does not name the host in --nats-url. Fix: connect with a host name the certificate lists, or reissue the certificate"
	case strings.Contains(msg, "certificate required") || strings.Contains(msg, "bad certificate") ||
		// TLS 1.3: the server rejects a missing client certificate after the handshake.
		strings.Contains(msg, "closed by remote after tls handshake"):
		return "the NATS server requires a client certificate (or refused the one given). Fix: pass --nats-tls-cert and --nats-tls-key (signed by a CA the server trusts)"
	case strings.Contains(msg, "secure connection required") || strings.Contains(msg, "tls required"):
		return "the NATS server requires TLS. Fix: pass --nats-tls-ca (or use a tls:// URL when its certificate is publicly trusted)"
	case strings.Contains(msg, "secure connection not available"):
		return "the NATS server does not offer TLS, but --nats-tls-ca/--nats-tls-cert ask for it. Fix: enable tls on the server or drop those flags"
	}
	return ""
}

// readSecretFiles sets the password and token from --nats-password-file and --nats-token-file.
func (a *natsAuth) readSecretFiles() error {
	for _, f := range []struct {
		flag, other, path string
		dst               *string
	}{
		{"nats-password-file", "nats-password", a.passwordFile, &a.password},
		{"nats-token-file", "nats-token", a.tokenFile, &a.token},
	} {
		if f.path == "" {
			continue
		}
		if *f.dst != "" {
			return fmt.Errorf("--%s and --%s exclude each other: keep one", f.flag, f.other)
		}
		b, err := os.ReadFile(f.path)
		if err != nil {
			return fmt.Errorf("--%s: %w", f.flag, err)
		}
		v := strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
		if v == "" {
			return fmt.Errorf("--%s %s: the file is empty", f.flag, f.path)
		}
		printedSecrets.Add(v)
		*f.dst = v
	}
	return nil
}
