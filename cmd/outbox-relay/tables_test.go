package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/sink"
)

// newTwoTables is an env with two outbox tables in publication tables_pub: orders.outbox,
// which migrate creates with the default layout, and billing.outbox, a table of its own layout
// (event_id, kind, account, name, body, at) that migrate finds and adds.
func newTwoTables(t *testing.T) *env {
	t.Helper()
	e := newEnv(t)
	addBillingTable(t, e.pg)
	return e
}

// addBillingTable creates billing.outbox and migrates both tables into publication tables_pub.
func addBillingTable(t *testing.T, pg *testenv.PG) {
	t.Helper()
	pg.Exec(t, `CREATE SCHEMA billing`)
	pg.Exec(t, `CREATE TABLE billing.outbox (event_id uuid PRIMARY KEY DEFAULT gen_random_uuid(), kind text NOT NULL,
		account text NOT NULL, name text NOT NULL, body jsonb NOT NULL, at timestamptz NOT NULL DEFAULT now())`)
	out, err := runCmd("migrate", "--pg-url", pg.URL, "--table", "orders.outbox", "--table", "billing.outbox", "--publication", "tables_pub", "--log-level", "warn")
	require.NoError(t, err, out)
}

// billingEntry is billing.outbox in a config file's table list: its columns and subject.
const billingEntry = `  - name: billing.outbox
    subject-template: "{prefix}.billing.{aggregate_id}.{event_type}"
    column-id: event_id
    column-aggregate-type: kind
    column-aggregate-id: account
    column-event-type: name
    column-payload: body
    column-headers: ""
    column-created-at: at
`

// tablesConfig is a config file relaying orders.outbox (the flags' columns and subject) and
// billing.outbox (billingEntry).
func tablesConfig(t *testing.T) string {
	t.Helper()
	return writeConfig(t, "publication: tables_pub\ntable:\n  - orders.outbox\n"+billingEntry)
}

// sent is an event written to one of the two tables: its id and the subject it must get.
type sent struct{ id, subject string }

// writeBoth writes rounds of events from one connection, so commit order is write order: an
// order, then an invoice, each in a transaction of its own, and every third round one
// transaction with an invoice, an order and an invoice. It returns the events in commit order.
func writeBoth(t *testing.T, e *env, rounds int) []sent {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.pg.URL)
	require.NoError(t, err)
	defer conn.Close(ctx)
	var out []sent
	order := func(q pgx.Tx, i int) {
		var id string
		require.NoError(t, q.QueryRow(ctx, `INSERT INTO orders.outbox (aggregate_type, aggregate_id, event_type, payload)
			VALUES ('order', $1, 'Created', jsonb_build_object('seq', $2::int)) RETURNING id::text`, fmt.Sprint(i%3), i).Scan(&id))
		out = append(out, sent{id, "outbox.order.Created"})
	}
	invoice := func(q pgx.Tx, i int) {
		var id string
		acct := fmt.Sprintf("acc-%d", i%2)
		require.NoError(t, q.QueryRow(ctx, `INSERT INTO billing.outbox (kind, account, name, body)
			VALUES ('invoice', $1, 'Invoiced', jsonb_build_object('n', $2::int)) RETURNING event_id::text`, acct, i).Scan(&id))
		out = append(out, sent{id, "outbox.billing." + acct + ".Invoiced"})
	}
	tx := func(f func(pgx.Tx)) {
		require.NoError(t, pgx.BeginFunc(ctx, conn, func(q pgx.Tx) error { f(q); return nil }))
	}
	for i := 0; i < rounds; i++ {
		tx(func(q pgx.Tx) { order(q, i) })
		tx(func(q pgx.Tx) { invoice(q, i) })
		if i%3 == 0 {
			tx(func(q pgx.Tx) { invoice(q, i); order(q, i); invoice(q, i) })
		}
	}
	return out
}

// requireSent requires the stream to hold exactly want, in that order, with their subjects.
func requireSent(t *testing.T, want []sent, recs []record) {
	t.Helper()
	require.Len(t, recs, len(want))
	for i, r := range recs {
		require.Equal(t, want[i].id, r.Header.Get(sink.HeaderMsgID), "stream sequence %d", r.Seq)
		require.Equal(t, want[i].subject, r.Subject, "stream sequence %d", r.Seq)
	}
	requireCommitOrder(t, recs)
}

// Two tables, each with its own columns and subject template, through one slot, publication
// and stream: every event once, in commit order across the tables; a transaction writing to
// both keeps its order (under --publish atomic it is one batch).
func TestTables_TwoTablesOneSlotInCommitOrder(t *testing.T) {
	for _, mode := range []string{"single", "atomic"} {
		t.Run(mode, func(t *testing.T) { testTwoTables(t, mode) })
	}
}

func testTwoTables(t *testing.T, mode string) {
	e := newTwoTables(t)
	var tables []string
	require.NoError(t, e.pg.QueryRow(t, `SELECT array_agg(schemaname || '.' || tablename ORDER BY 1) FROM pg_publication_tables WHERE pubname = 'tables_pub'`).Scan(&tables))
	require.Equal(t, []string{"billing.outbox", "orders.outbox"}, tables, "migrate put both tables into the publication")

	stop, _ := inProcess(t, e.args("--config", tablesConfig(t), "--publish", mode))
	waitStreaming(t, e.pg, "outbox_relay")
	want := writeBoth(t, e, 12)
	waitStream(t, e.nats.URL, uint64(len(want)), 30*time.Second)
	require.NoError(t, stop())
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	requireSent(t, want, recs)

	// Round 0's transaction: invoice, order, invoice, at one commit, indexes 0, 1, 2.
	tx := recs[2:5]
	for i, r := range tx {
		require.Equal(t, tx[0].Header.Get(sink.HeaderCommitLSN), r.Header.Get(sink.HeaderCommitLSN))
		require.Equal(t, fmt.Sprint(i), r.Header.Get(sink.HeaderTxIndex))
	}
	require.Equal(t, `{"n": 0}`, string(tx[0].Data), "billing's payload is its body column")
	require.Equal(t, `{"seq": 0}`, string(tx[1].Data))
	require.NotEmpty(t, tx[0].Header.Get(sink.HeaderCreatedAt), "billing's created-at column is at")
}

// The relay is killed after JetStream stored events of both tables and before their position
// reached Postgres; restarted, it delivers every event exactly once, in commit order.
func TestTables_RestartMidStreamDeliversExactlyOnce(t *testing.T) {
	e := newTwoTables(t)
	e.createSlot(t)
	want := writeBoth(t, e, 300)
	args := e.args("--config", tablesConfig(t))
	killAfterAcks(t, args, 100)
	stored := streamMsgs(t, e.nats.URL, sink.DefaultStream)
	require.GreaterOrEqual(t, stored, uint64(100))
	require.Less(t, stored, uint64(len(want)))

	p := startProc(t, args)
	waitStream(t, e.nats.URL, uint64(len(want)), 60*time.Second)
	p.stop(t)
	requireSent(t, want, readStream(t, e.nats.URL, sink.DefaultStream))
}

// Preflight checks each table and names the one that is wrong.
func TestTables_PreflightNamesTheWrongTable(t *testing.T) {
	e := newTwoTables(t)
	e.pg.Exec(t, `ALTER PUBLICATION tables_pub DROP TABLE orders.outbox`)
	cfg := writeConfig(t, "publication: tables_pub\ntable:\n  - orders.outbox\n"+strings.Replace(billingEntry, "column-payload: body", "column-payload: nope", 1))
	msg, _ := runPreflight(t, "--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--create-slot", "--config", cfg)
	require.Contains(t, msg, "preflight found 2 problems")
	require.Contains(t, msg, `table "billing"."outbox" has no column "nope" (the event's payload)`)
	require.Contains(t, msg, `publication "tables_pub" does not include "orders"."outbox"`)
	require.Contains(t, msg, `ALTER PUBLICATION "tables_pub" ADD TABLE "orders"."outbox";`)

	// A table of the publication the relay's list leaves out is warned about before it starts.
	e.pg.Exec(t, `ALTER PUBLICATION tables_pub ADD TABLE orders.outbox`)
	e.createSlot(t)
	stop, log := inProcess(t, e.args("--config", writeConfig(t, "publication: tables_pub\ntable:\n"+billingEntry)))
	waitStreaming(t, e.pg, "outbox_relay")
	require.NoError(t, stop())
	require.Contains(t, log.String(), `publication \"tables_pub\" also publishes orders.outbox, which is not one of the relay's outbox tables (--table): its inserts are not relayed`)
}

// The event metrics carry the table; a poison row of the second table goes to the dead-letter
// subject and counts as that table's.
func TestTables_MetricsLabelledPerTable(t *testing.T) {
	e := newTwoTables(t)
	stop, log := inProcess(t, e.args("--config", tablesConfig(t), "--on-poison", "dead-letter"))
	base := httpAddrOf(t, log)
	waitStreaming(t, e.pg, "outbox_relay")
	want := writeBoth(t, e, 4) // 4 orders and 4 invoices, and 2 transactions of 1 order and 2 invoices
	e.pg.Exec(t, `INSERT INTO billing.outbox (kind, account, name, body) VALUES ('invoice', 'acc-0', '', '{}')`)
	waitStream(t, e.nats.URL, uint64(len(want)+1), 30*time.Second)
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	require.Equal(t, "outbox."+sink.DeadLetterToken, recs[len(want)].Subject)
	var m string
	require.Eventually(t, func() bool {
		_, m = testenv.HTTPGet(t, base+"/metrics")
		return metric(t, m, "outbox_relay_events_in_flight") == 0
	}, 10*time.Second, 20*time.Millisecond)
	for table, n := range map[string]float64{"orders.outbox": 6, "billing.outbox": 8} {
		dead := 0.0
		if table == "billing.outbox" {
			dead = 1
		}
		require.Equal(t, n+dead, metric(t, m, `outbox_relay_events_published_total{stream="OUTBOX",table="`+table+`"}`), table)
		require.Equal(t, n, metric(t, m, `outbox_relay_publish_ack_seconds_count{table="`+table+`"}`), table)
		require.Equal(t, n, metric(t, m, `outbox_relay_commit_to_ack_seconds_count{table="`+table+`"}`), table)
		require.InDelta(t, float64(time.Now().Unix()), metric(t, m, `outbox_relay_last_event_timestamp_seconds{table="`+table+`"}`), 60, table)
	}
	require.Equal(t, -1.0, metric(t, m, `outbox_relay_events_published_total{stream="OUTBOX",table="public.outbox"}`), "public.outbox is not relayed")
	code, _ := testenv.HTTPGet(t, base+"/readyz")
	require.Equal(t, http.StatusOK, code)
	require.NoError(t, stop())
}

// --table given twice on the command line: migrate creates both tables, publication create
// publishes both, and run relays both with the global flags' columns and subject template.
func TestTables_RepeatedTableFlag(t *testing.T) {
	e := newEnv(t)
	out, err := runCmd("migrate", "--pg-url", e.pg.URL, "--table", "orders.outbox", "--table", "shipping.outbox", "--publication", "tables_pub", "--log-level", "warn")
	require.NoError(t, err, out)
	require.Contains(t, out, "schema shipping created")
	out, err = runCmd("publication", "create", "--pg-url", e.pg.URL, "--publication", "other_pub", "--table", "orders.outbox", "--table", "shipping.outbox")
	require.NoError(t, err, out)
	require.Contains(t, out, `created publication other_pub of the inserts into "orders"."outbox"`)
	require.Contains(t, out, `added "shipping"."outbox" to publication other_pub`)
	stop, _ := inProcess(t, e.args("--table", "orders.outbox", "--table", "shipping.outbox", "--publication", "tables_pub",
		"--subject-template", "{prefix}.{aggregate_type}.{aggregate_id}"))
	waitStreaming(t, e.pg, "outbox_relay")
	e.pg.Exec(t, `INSERT INTO shipping.outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('parcel', 'p1', 'Shipped', '{}')`)
	e.pg.Exec(t, `INSERT INTO orders.outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'o1', 'Created', '{}')`)
	waitStream(t, e.nats.URL, 2, 30*time.Second)
	require.NoError(t, stop())
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	require.Equal(t, []string{"outbox.parcel.p1", "outbox.order.o1"}, []string{recs[0].Subject, recs[1].Subject})
}

// Settings that cannot run are refused before anything starts, naming the table.
func TestTables_ConfigErrors(t *testing.T) {
	for _, c := range []struct{ file, want string }{
		{"table:\n  - orders.outbox\n  - name: billing.outbox\n    stream: BILLING\n",
			`--table: stream OUTBOX (table orders.outbox) and stream BILLING (table billing.outbox) would both take subjects under outbox.>: a table of its own stream needs subjects of its own`},
		{"table:\n  - orders.outbox\n  - name: billing.outbox\n    subject-template: billing.{event_type}\n",
			`--table billing.outbox: subject template "billing.{event_type}" puts events under billing, outside outbox.>`},
		{"table:\n  - orders.outbox\n  - public.orders\n  - orders.outbox\n", "--table: orders.outbox is named twice"},
		{"table:\n  - name: billing.outbox\n    colum-id: x\n", `unknown key "colum-id"`},
		{"table:\n  - subject-template: x\n", "a table mapping needs name"},
		{"source: messages\ntable: [a.outbox, b.outbox]\n", "--source messages reads no table"},
	} {
		_, err := runCmd("run", "--pg-url", "postgres://x", "--config", writeConfig(t, c.file))
		require.ErrorContains(t, err, c.want, c.file)
	}
}

// Backfill and prune work on one table at a time: a config file's list alone is refused, and
// with --table the list's entry of that name lends its columns and subject template.
func TestTables_BackfillAndPruneTakeOneTable(t *testing.T) {
	e := newTwoTables(t)
	cfg := tablesConfig(t)
	stop, _ := inProcess(t, e.args("--config", cfg))
	waitStreaming(t, e.pg, "outbox_relay")
	want := writeBoth(t, e, 3)
	waitStream(t, e.nats.URL, uint64(len(want)), 30*time.Second)
	require.NoError(t, stop())
	// Committed while no relay runs: backfill publishes them now.
	e.pg.Exec(t, `INSERT INTO billing.outbox (kind, account, name, body) VALUES ('invoice', 'late', 'Invoiced', '{}'), ('invoice', 'late', 'Paid', '{}')`)

	since := time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
	base := []string{"--pg-url", e.pg.URL, "--nats-url", e.nats.URL, "--config", cfg, "--log-level", "warn"}
	_, err := runCmd(append([]string{"backfill", "--since", since}, base...)...)
	require.ErrorContains(t, err, "backfill works on one outbox table at a time and --table names 2")
	out, err := runCmd(append([]string{"backfill", "--since", since, "--table", "billing.outbox"}, base...)...)
	require.NoError(t, err, out)
	require.Contains(t, out, "backfill: 7 rows read, 2 newly stored, 5 duplicates")
	recs := readStream(t, e.nats.URL, sink.DefaultStream)
	require.Len(t, recs, len(want)+2)
	require.ElementsMatch(t, []string{"outbox.billing.late.Invoiced", "outbox.billing.late.Paid"}, []string{recs[len(want)].Subject, recs[len(want)+1].Subject})

	_, err = runCmd(append([]string{"prune", "--older-than", "1ms", "--dry-run", "--skip-source-check"}, base...)...)
	require.ErrorContains(t, err, "prune works on one outbox table at a time")
	out, err = runCmd(append([]string{"prune", "--older-than", "1ms", "--dry-run", "--skip-source-check", "--table", "billing.outbox"}, base...)...)
	require.NoError(t, err, out)
	require.Contains(t, out, `would delete 0 rows from "billing"."outbox"`)
	require.Contains(t, out, "kept 7 rows older than the cutoff", "prune read billing's created-at column (at)")
}

// --table from the environment (comma separated) and from the config file's list; a --table
// on the command line overrides the list, and the list's entry of its name lends its settings.
func TestTables_FlagFromEnvironmentAndConfigFile(t *testing.T) {
	parse := func(args []string, env func(string) (string, bool)) []tableSpec {
		fs := newFlagSet("run", "", io.Discard)
		tf := newTableFlag("public.outbox")
		fs.Var(tf, "table", "")
		fs.String("config", "", "")
		require.NoError(t, parseFlags(fs, args, env))
		return tf.tables()
	}
	require.Equal(t, []tableSpec{{name: "public.outbox"}}, parse(nil, noEnv))
	env := func(k string) (string, bool) { return "a.outbox,b.outbox", k == "OUTBOX_RELAY_TABLE" }
	require.Equal(t, []tableSpec{{name: "a.outbox"}, {name: "b.outbox"}}, parse(nil, env))

	file := writeConfig(t, "table:\n  - orders.outbox\n"+billingEntry)
	both := parse([]string{"--config", file}, noEnv)
	require.Len(t, both, 2)
	require.Equal(t, tableSpec{name: "orders.outbox"}, both[0])
	require.Equal(t, "{prefix}.billing.{aggregate_id}.{event_type}", both[1].template)
	require.Equal(t, "event_id", both[1].columns["column-id"])
	one := parse([]string{"--config", file, "--table", "billing.outbox"}, noEnv)
	require.Equal(t, []tableSpec{both[1]}, one, "the command line's table, with the file's settings of it")
	require.Equal(t, []tableSpec{{name: "a.outbox"}, {name: "b.outbox"}}, parse([]string{"--config", file}, env), "the environment overrides the file")
}
