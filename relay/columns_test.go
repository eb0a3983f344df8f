package relay

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
)

// A table whose columns are named otherwise: prune compares Config.Columns.CreatedAt, and the
// partition publications hash the mapped aggregate id column.
func TestColumnMapping_PruneAndPartitionFilter(t *testing.T) {
	pg := testenv.Postgres(t)
	pg.Exec(t, `CREATE TABLE events (event_id uuid PRIMARY KEY DEFAULT gen_random_uuid(), kind text NOT NULL,
		entity text NOT NULL, type text NOT NULL, body jsonb NOT NULL, happened_at timestamptz NOT NULL DEFAULT now())`)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn := pg.Conn(t)

	res, err := migrations.Apply(ctx, conn, migrations.Options{Table: "events", Partitions: 2, AggregateIDColumn: "entity"})
	require.NoError(t, err)
	require.Equal(t, []string{"outbox_pub_p0of2", "outbox_pub_p1of2"}, res.CreatedPartitions)
	var filters int
	require.NoError(t, conn.QueryRow(ctx, `SELECT count(*) FROM pg_publication_tables WHERE pubname LIKE 'outbox_pub_p%of2' AND rowfilter LIKE '%entity%'`).Scan(&filters))
	require.Equal(t, 2, filters, "both partitions filter on the mapped column")

	for i := 0; i < 10; i++ {
		pg.Exec(t, `INSERT INTO events (kind, entity, type, body, happened_at) VALUES ('order', $1, 'Created', '{}', now() - interval '100 hours')`, fmt.Sprint(i))
	}
	pg.Exec(t, `INSERT INTO events (kind, entity, type, body) VALUES ('order', 'new', 'Created', '{}')`)
	var in0, in1 int
	require.NoError(t, conn.QueryRow(ctx, `SELECT count(*) FILTER (WHERE `+migrations.PartitionFilterOn("entity", 2, 0)+`),
		count(*) FILTER (WHERE `+migrations.PartitionFilterOn("entity", 2, 1)+`) FROM events`).Scan(&in0, &in1))
	require.Equal(t, 11, in0+in1, "every row is in exactly one partition")

	const slot = "t_colmap_prune"
	pg.Exec(t, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, slot)
	t.Cleanup(func() { pg.Exec(t, `SELECT pg_drop_replication_slot($1)`, slot) })
	cfg := DefaultConfig()
	cfg.PGURL, cfg.Table, cfg.Slot = pg.URL, "events", slot
	cfg.Columns = decoder.Columns{ID: "event_id", AggregateType: "kind", AggregateID: "entity", EventType: "type", Payload: "body", CreatedAt: "happened_at"}
	pr, err := Prune(ctx, cfg, PruneOptions{OlderThan: 72 * time.Hour, Batch: 4, SkipSourceCheck: true})
	require.NoError(t, err)
	require.True(t, pr.Pruned)
	require.Equal(t, int64(10), pr.Deleted)
	var left int
	require.NoError(t, conn.QueryRow(ctx, `SELECT count(*) FROM events`).Scan(&left))
	require.Equal(t, 1, left, "the row younger than the cutoff stays")
}
