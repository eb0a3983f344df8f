package relay

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/internal/pgcatalog"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
)

// preflightReport collects every problem found before the relay starts, so that an operator
// fixes them in one go instead of one restart per problem.
type preflightReport struct {
	problems []string
	warnings []string
	// checkpointTimeout is Postgres' checkpoint_timeout: a crash sends back up to that much
	// of what the relay had already confirmed (slots save confirmed_flush_lsn at checkpoints).
	checkpointTimeout time.Duration
}

func (r *preflightReport) fail(format string, args ...any) {
	r.problems = append(r.problems, fmt.Sprintf(format, args...))
}

func (r *preflightReport) warn(format string, args ...any) {
	r.warnings = append(r.warnings, fmt.Sprintf(format, args...))
}

// PreflightError lists every problem found at start-up, each with its fix.
type PreflightError struct{ Problems []string }

func (e *PreflightError) Error() string {
	var b strings.Builder
	if len(e.Problems) == 1 {
		b.WriteString("preflight check failed, the relay did not start:")
	} else {
		fmt.Fprintf(&b, "preflight found %d problems, the relay did not start:", len(e.Problems))
	}
	for i, p := range e.Problems {
		fmt.Fprintf(&b, "\n  %d. %s", i+1, strings.ReplaceAll(p, "\n", "\n     "))
	}
	return b.String()
}

// broker is the NATS connection preflight opened and checked.
type broker struct {
	nc *nats.Conn
	js jetstream.JetStream
}

// preflight checks everything a session needs, Postgres and NATS alike, and returns one
// error listing every problem with its fix. Warnings are logged. When nothing is wrong it
// creates the slot if asked to, and returns the connected broker.
func preflight(ctx context.Context, cfg Config, log zerolog.Logger, natsOpts ...nats.Option) (*broker, error) {
	var r preflightReport
	createSlot := checkPostgres(ctx, cfg, &r)
	b := checkBroker(ctx, cfg, &r, log, natsOpts...)
	for _, w := range r.warnings {
		log.Warn().Msg(w)
	}
	if len(r.problems) == 0 && createSlot && cfg.PositionBucket != "" && !cfg.AcceptSlotGap {
		// After the first start a missing slot is a gap: never replace it silently.
		for i := range cfg.feeds {
			fcfg := cfg.forFeed(i)
			if rec, ok, err := sink.ReadPositionRecord(ctx, b.js, cfg.PositionBucket, fcfg.Sink); err != nil {
				r.fail("%v", err)
			} else if ok {
				r.fail("Config.CreateSlot refuses to create a replacement: %s", slotGapMessage(fcfg, rec, sink.PositionKey(fcfg.Sink.Stream, fcfg.Sink.SubjectPrefix),
					fmt.Sprintf("replication slot %q does not exist", cfg.Slot), "the slot was dropped, or the database replaced, while the relay was away"))
				break
			}
		}
	}
	if len(r.problems) == 0 && createSlot {
		if err := doCreateSlot(ctx, cfg, log); err != nil {
			r.fail("%v", err)
		}
	}
	if len(r.problems) > 0 {
		if b != nil {
			b.nc.Close()
		}
		return nil, fatalError{&PreflightError{Problems: r.problems}}
	}
	return b, nil
}

func doCreateSlot(ctx context.Context, cfg Config, log zerolog.Logger) error {
	conn, err := ConnectPG(ctx, cfg.PGURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	lsn, err := replication.CreateSlot(ctx, conn, cfg.Slot)
	if err != nil {
		return err
	}
	log.Info().Stringer("lsn", lsn).Msg("created replication slot")
	return nil
}

// checkPostgres records the Postgres problems and reports whether the slot must be created.
func checkPostgres(ctx context.Context, cfg Config, r *preflightReport) (createSlot bool) {
	conn, err := ConnectPG(ctx, cfg.PGURL)
	if err != nil {
		r.fail("%v: %s", err, pgConnectHint(err))
		return false
	}
	defer conn.Close(context.Background())
	q := func(what, sql string, dest ...any) bool {
		if err := conn.QueryRow(ctx, sql).Scan(dest...); err != nil {
			r.fail("read %s: %v", what, err)
			return false
		}
		return true
	}

	var walLevel, keepSize string
	if q("wal_level", `SHOW wal_level`, &walLevel) && walLevel != "logical" {
		r.fail("wal_level is %q; logical replication needs 'logical'. Fix: run ALTER SYSTEM SET wal_level = logical; as a superuser and restart Postgres (on a managed service, set the parameter group's wal_level / rds.logical_replication)", walLevel)
	}
	var ckptSeconds int
	if q("checkpoint_timeout", `SELECT setting::int FROM pg_settings WHERE name = 'checkpoint_timeout'`, &ckptSeconds) {
		r.checkpointTimeout = time.Duration(ckptSeconds) * time.Second
	}
	if q("max_slot_wal_keep_size", `SHOW max_slot_wal_keep_size`, &keepSize) && keepSize == "-1" {
		r.warn("max_slot_wal_keep_size is unlimited (-1): if the relay stops for long, its slot keeps WAL until the disk is full and Postgres stops. Consider a limit (ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'; SELECT pg_reload_conf();) and alert on slot lag; see docs/operations.md, Operating the slot")
	}

	var user string
	var super, repl bool
	if q("role attributes", `SELECT current_user::text, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user`, &user, &super, &repl) && !super && !repl {
		r.fail("role %q lacks the REPLICATION attribute, which a logical replication connection needs. Fix, as a superuser: ALTER ROLE %s REPLICATION;", user, pgx.Identifier{user}.Sanitize())
	}

	var tables []checkedTable
	if cfg.Source == "messages" {
		var version int
		if q("server_version_num", `SELECT current_setting('server_version_num')::int`, &version) && version < 140000 {
			r.fail("Config.Source messages needs PostgreSQL 14 or later (pgoutput's messages option); this server is %d: use Config.Source table", version)
		}
		// Postgres grants EXECUTE on pg_logical_emit_message to PUBLIC: any role that can
		// connect to the database could inject events.
		var public bool
		if q("pg_logical_emit_message privileges", `SELECT has_function_privilege('public', 'pg_logical_emit_message(boolean,text,text)', 'EXECUTE')
			OR has_function_privilege('public', 'pg_logical_emit_message(boolean,text,bytea)', 'EXECUTE')`, &public) && public {
			r.warn("PUBLIC can execute pg_logical_emit_message (Postgres' default): with Config.Source messages any role that can connect to this database can inject events into the stream. Fix, as a superuser:\nREVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text), pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC;\nGRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO <the producers' role>;\n(see docs/cli.md, Table-less mode)")
		}
	} else {
		for _, t := range cfg.tables {
			owner, ok := checkTable(ctx, conn, t, r)
			tables = append(tables, checkedTable{table: t, owner: owner, ok: ok})
		}
	}
	checkPublication(ctx, conn, cfg, user, tables, r)

	if cfg.TemporarySlot {
		if s, err := replication.GetSlot(ctx, conn, cfg.Slot); err == nil {
			r.fail("Config.TemporarySlot: a slot named %q already exists (%s, active %v); choose another Config.Slot for the temporary one, or run without Config.TemporarySlot to use it", cfg.Slot, s.Plugin, s.Active)
		}
		return false
	}
	slot, err := replication.GetSlot(ctx, conn, cfg.Slot)
	if errors.Is(err, replication.ErrSlotMissing) {
		if !cfg.CreateSlot {
			r.fail("replication slot %q does not exist. Fix: pass Config.CreateSlot (or run outbox-relay slot create Config.Slot %s); for throwaway development use Config.TemporarySlot", cfg.Slot, cfg.Slot)
			return false
		}
		return walLevel == "logical"
	}
	if err != nil {
		r.fail("%v", err)
		return false
	}
	if m := SlotMismatch(slot); m != "" {
		r.fail("replication slot %q %s. Fix: choose another Config.Slot (with Config.CreateSlot), or drop this one if nothing else uses it", cfg.Slot, m)
		return false
	}
	switch slot.WALStatus {
	case "lost":
		r.fail("%s", lostSlotMessage(cfg, slot))
		return false
	case "unreserved":
		r.warn("replication slot %q has wal_status unreserved: it is past max_slot_wal_keep_size and will be invalidated at the next checkpoint unless the relay catches up at once", cfg.Slot)
	}
	if slot.Active && !cfg.Standby {
		r.fail("replication slot %q is active: another process (pid %d%s) is reading it. Fix: stop that relay, or pass Config.Standby to wait and take over when it releases the slot (active/passive HA)", cfg.Slot, slot.ActivePID, holderInfo(ctx, conn, slot.ActivePID))
	}
	if cfg.StartLSN != 0 && cfg.StartLSN < slot.ConfirmedFlush {
		r.fail("Config.StartLSN %s is behind the slot's confirmed_flush_lsn %s: Postgres no longer has the WAL before it for this slot, so the relay cannot start there. Fix: pass Config.StartLSN %s or later, or leave it out", cfg.StartLSN, slot.ConfirmedFlush, slot.ConfirmedFlush)
	}
	return false
}

// checkedTable is an outbox table preflight looked up: its owner, and whether it exists.
type checkedTable struct {
	table
	owner string
	ok    bool
}

// asOwner names the role that can change the publication of t, when user cannot.
func (t checkedTable) asOwner(user string) string {
	if t.owner != "" && t.owner != user {
		return fmt.Sprintf(" as the table's owner %q (or a superuser)", t.owner)
	}
	return ""
}

// checkPublication records the problems of the publication: it must exist, publish inserts and
// include every outbox table (each named in its problem).
func checkPublication(ctx context.Context, conn *pgx.Conn, cfg Config, user string, tables []checkedTable, r *preflightReport) {
	pubn, pubExists, err := pgcatalog.ReadPublication(ctx, conn, cfg.Publication)
	pub := pgx.Identifier{cfg.Publication}.Sanitize()
	switch {
	case err != nil:
		r.fail("look up publication %q: %v", cfg.Publication, err)
		return
	case !pubExists && len(cfg.tables) > 1 && cfg.Source != SourceMessages:
		idents := make([]string, len(cfg.tables))
		for i, t := range cfg.tables {
			idents[i] = pgx.Identifier{t.schema, t.name}.Sanitize()
		}
		r.fail("publication %q does not exist. Fix: run outbox-relay migrate with a --table for each table, or as the tables' owner:\nCREATE PUBLICATION %s FOR TABLE %s WITH (publish = 'insert');", cfg.Publication, pub, strings.Join(idents, ", "))
		return
	case !pubExists:
		asOwner := ""
		if len(tables) > 0 {
			asOwner = tables[0].asOwner(user)
		}
		r.fail("publication %q does not exist. Fix: run outbox-relay publication create (or migrate for the default table), or%s:\n%s", cfg.Publication, asOwner,
			migrations.PublicationSQL(migrations.Options{Schema: cfg.Schema, Table: cfg.Table, Publication: cfg.Publication}))
		return
	}
	if cfg.Source == SourceMessages {
		return
	}
	missing := false
	for _, t := range tables {
		if _, ok := pubn.Table(t.schema, t.name); !ok && t.ok {
			missing = true
			ident := pgx.Identifier{t.schema, t.name}.Sanitize()
			r.fail("publication %q does not include %s. Fix: run outbox-relay publication create (or migrate) with --table %s, or%s:\nALTER PUBLICATION %s ADD TABLE %s;", cfg.Publication, ident, t, t.asOwner(user), pub, ident)
		}
	}
	if !missing && !pubn.Insert {
		r.fail("publication %q does not publish INSERTs. Fix:\nALTER PUBLICATION %s SET (publish = 'insert');", cfg.Publication, pub)
	}
	// A table left out of Config.Tables by mistake: its inserts reach the relay, which does not
	// publish them (the session warns at the first one; this says so before any is lost).
	relayed := map[string]bool{}
	for _, t := range cfg.tables {
		relayed[t.String()] = true
	}
	for _, name := range pubn.Tables {
		if !relayed[name] && !pubn.AllTables {
			r.warn("publication %q also publishes %s, which is not one of the relay's outbox tables (Config.Tables): its inserts are not relayed. Add it to Config.Tables, or remove it from the publication", cfg.Publication, name)
		}
	}
}

// pgConnectHint names the fix for a failed Postgres connection.
func pgConnectHint(err error) string {
	msg := strings.ToLower(err.Error())
	switch {
	case strings.Contains(msg, "certificate signed by unknown authority"):
		return "the server's TLS certificate is not signed by the CA in sslrootcert. Fix: set sslrootcert=<CA PEM file> in Config.PGURL to the CA that signed it"
	case strings.Contains(msg, "certificate is valid for") || strings.Contains(msg, "doesn't contain any ip sans"):
		return "the server's TLS certificate does not name the host in Config.PGURL, which sslmode=verify-full checks. Fix: connect with a host name the certificate lists, reissue the certificate, or use sslmode=verify-ca"
	case strings.Contains(msg, "server refused tls") || strings.Contains(msg, "server does not support ssl"):
		return "the server does not accept TLS connections. Fix: enable ssl on the server (ssl = on, ssl_cert_file, ssl_key_file) or lower sslmode in Config.PGURL"
	case strings.Contains(msg, "x509") || strings.Contains(msg, "tls"):
		return "TLS to Postgres failed. Fix: check sslmode, sslrootcert, sslcert and sslkey in Config.PGURL"
	}
	return "is Postgres running and is Config.PGURL right?"
}

// lostSlotMessage explains an invalidated slot: what was lost and how to recover.
func lostSlotMessage(cfg Config, s replication.Slot) string {
	createdAt := "created_at"
	if cfg.Columns.CreatedAt != "" {
		createdAt = cfg.Columns.CreatedAt
	}
	names := make([]string, len(cfg.tables))
	for i, t := range cfg.tables {
		names[i] = pgx.Identifier{t.schema, t.name}.Sanitize()
	}
	table := strings.Join(names, ", ")
	if len(names) > 1 {
		table = "tables " + table + "; backfill takes one --table at a time"
	} else {
		table = "table " + table
	}
	last := make([]string, len(cfg.feeds))
	for i, f := range cfg.feeds {
		last[i] = fmt.Sprintf("nats stream get %s --last-for '%s.>'", f.stream, f.prefix)
	}
	if len(last) > 1 {
		last = append(last, "with several streams, the earliest of their last events")
	}
	return fmt.Sprintf(`replication slot %q is invalidated (wal_status = lost): Postgres removed WAL the slot still needed (it fell more than max_slot_wal_keep_size behind), so the events committed after its confirmed_flush_lsn %s can no longer be decoded and will never be relayed from this slot. Recovery:
(a) note the time of the last event in the stream (header Outbox-Created-At of the stream's last message; nats stream info / %s);
(b) drop and recreate the slot: outbox-relay slot drop Config.Slot %s --force && outbox-relay slot create Config.Slot %s;
(c) start the relay, then republish the gap from the table (rows by %s, %s): outbox-relay backfill --since <that time minus a safety margin>; JetStream drops the ones it still has within its duplicate window.
To stop it from happening again, alert on the slot lag (outbox_relay_slot_lag_bytes) well before max_slot_wal_keep_size.`,
		cfg.Slot, s.ConfirmedFlush, strings.Join(last, "; "), cfg.Slot, cfg.Slot, createdAt, table)
}

// holderInfo describes the backend holding a slot, for the error naming it.
func holderInfo(ctx context.Context, conn *pgx.Conn, pid int32) string {
	var app, addr string
	err := conn.QueryRow(ctx, `SELECT coalesce(application_name, ''), coalesce(host(client_addr), 'local') FROM pg_stat_activity WHERE pid = $1`, pid).Scan(&app, &addr)
	if err != nil {
		return ""
	}
	return fmt.Sprintf(", application_name %q, client %s", app, addr)
}

// Types a mapped column may have.
var (
	payloadTypes   = []string{"text", "character varying", "json", "jsonb", "bytea"}
	headersTypes   = []string{"json", "jsonb", "text", "character varying"}
	createdAtTypes = []string{"timestamp with time zone", "timestamp without time zone"}
)

// checkTable records problems with an outbox table and its mapped columns; it returns the
// table's owner and whether it exists.
func checkTable(ctx context.Context, conn *pgx.Conn, t table, r *preflightReport) (owner string, ok bool) {
	table := pgx.Identifier{t.schema, t.name}.Sanitize()
	var oid uint32
	err := conn.QueryRow(ctx, `SELECT c.oid, pg_get_userbyid(c.relowner)::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')`, t.schema, t.name).Scan(&oid, &owner)
	if errors.Is(err, pgx.ErrNoRows) {
		r.fail("table %s does not exist. Fix: run outbox-relay migrate to create the default outbox table, or point Config.Table at your table (and map its columns with Config.Columns)", table)
		return "", false
	}
	if err != nil {
		r.fail("look up table %s: %v", table, err)
		return "", false
	}
	rows, err := conn.Query(ctx, `SELECT attname::text, format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped`, oid)
	if err != nil {
		r.fail("read the columns of %s: %v", table, err)
		return owner, true
	}
	types := map[string]string{}
	for rows.Next() {
		var name, typ string
		if err := rows.Scan(&name, &typ); err == nil {
			types[name] = typ
		}
	}
	rows.Close()
	cols := t.columns
	if cols == (decoder.Columns{}) {
		cols = decoder.DefaultColumns
	}
	check := func(flag, name string, required bool, allowed []string) {
		if name == "" {
			return
		}
		typ, found := types[name]
		switch {
		case !found && required:
			r.fail("table %s has no column %q (the event's %s). Fix: map the right column with --%s, or add it", table, name, strings.TrimPrefix(flag, "column-"), flag)
		case !found:
			r.warn("table %s has no column %q; events carry no %s (map one with --%s)", table, name, strings.TrimPrefix(flag, "column-"), flag)
		case allowed != nil && !contains(allowed, typ):
			r.fail("column %s.%s has type %s, which the relay cannot use as the %s. Fix: use one of %s (ALTER TABLE %s ALTER COLUMN %s TYPE ...), or map another column with --%s",
				table, pgx.Identifier{name}.Sanitize(), typ, strings.TrimPrefix(flag, "column-"), strings.Join(allowed, ", "), table, pgx.Identifier{name}.Sanitize(), flag)
		}
	}
	check("column-id", cols.ID, true, nil)
	check("column-aggregate-type", cols.AggregateType, true, nil)
	check("column-aggregate-id", cols.AggregateID, true, nil)
	check("column-event-type", cols.EventType, true, nil)
	check("column-payload", cols.Payload, true, payloadTypes)
	check("column-headers", cols.Headers, false, headersTypes)
	check("column-created-at", cols.CreatedAt, false, createdAtTypes)
	return owner, true
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// checkBroker connects to NATS and checks the streams; it records the problems and returns the
// connection when it is usable.
func checkBroker(ctx context.Context, cfg Config, r *preflightReport, log zerolog.Logger, opts ...nats.Option) *broker {
	nc, err := sink.Connect(cfg.NATSURL, append(append([]nats.Option(nil), cfg.NATSOptions...), opts...)...)
	if err != nil {
		// err names the redacted URL and nats.go's reason, never a password or token.
		if hint := cfg.natsHint(err); hint != "" {
			r.fail("%s (%v)", hint, err)
		} else {
			r.fail("%v", err)
		}
		return nil
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		r.fail("JetStream: %v", err)
		return nil
	}
	for i := range cfg.feeds {
		if len(cfg.feeds) == 1 {
			checkStream(ctx, cfg.forFeed(i), js, r, log)
			continue
		}
		// Name the stream's tables in its problems.
		fr := &preflightReport{checkpointTimeout: r.checkpointTimeout}
		checkStream(ctx, cfg.forFeed(i), js, fr, log)
		for _, p := range fr.problems {
			r.fail("%s (the stream of %s)", p, strings.Join(cfg.feedTables(i), ", "))
		}
		r.warnings = append(r.warnings, fr.warnings...)
	}
	return &broker{nc: nc, js: js}
}

// checkStream checks the stream of cfg.Sink (one of the relay's streams) and its position
// record.
func checkStream(ctx context.Context, cfg Config, js jetstream.JetStream, r *preflightReport, log zerolog.Logger) {
	info, err := sink.EnsureStream(ctx, js, cfg.Sink, log)
	if err != nil {
		r.fail("%v", err)
		return
	}
	c := info.Config
	// The replay horizon: after a Postgres crash the slot resumes from its last checkpointed
	// position, up to checkpoint_timeout behind what the relay confirmed, plus however long
	// the relay itself is down. The relay skips what the stream already holds (its last
	// message's position), so the duplicate window is the second line of defence; say when
	// it is shorter than the horizon.
	if horizon := r.checkpointTimeout + time.Minute; r.checkpointTimeout > 0 && c.Duplicates < horizon {
		r.warn("stream %s has a duplicate window of %s, shorter than the replay horizon the relay can face (Postgres checkpoint_timeout %s, plus a minute, plus any relay downtime): only the relay's skip of events the stream already holds then keeps replays out. Fix: nats stream edit %s --dupe-window %s (or more)",
			c.Name, c.Duplicates, r.checkpointTimeout, c.Name, (horizon + 14*time.Minute).Round(time.Minute))
	}
	// The rows' headers are not known in advance: say which per-message features the stream
	// takes. Message schedules (Nats-Schedule) the relay refuses on any stream.
	if !c.AllowMsgTTL {
		log.Info().Str("stream", c.Name).Msgf("stream %s does not allow per-message TTLs: a row with a %s header will be a poison event. To use it: nats stream edit %s --allow-msg-ttl (nats-server 2.11+)", c.Name, sink.HeaderTTL, c.Name)
	}
	if cfg.PositionBucket != "" && !cfg.TemporarySlot {
		if _, err := sink.OpenPositionRecord(ctx, js, cfg.PositionBucket, cfg.Sink); err != nil {
			if IsFatal(bucketError(js, cfg.PositionBucket, err)) {
				r.fail("%v", err)
			} else {
				r.warn("%v; the session retries it", err)
			}
		}
	}
	switch {
	case c.Mirror != nil:
		r.fail("stream %s is a mirror of %s and takes no published messages. Fix: choose another Config.Sink.Stream", c.Name, c.Mirror.Name)
	case c.Sealed:
		r.fail("stream %s is sealed and takes no new messages. Fix: choose another Config.Sink.Stream", c.Name)
	case c.NoAck:
		r.fail("stream %s has no_ack set: JetStream would store events without acknowledging them, so the relay could never confirm a position. Fix: nats stream edit %s --ack, or choose another Config.Sink.Stream", c.Name, c.Name)
	}
}
