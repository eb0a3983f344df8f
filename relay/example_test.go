package relay_test

import (
	"context"
	"os"
	"os/signal"

	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/relay"
)

// A service embeds the relay: the defaults, its two servers, and Run until a signal.
func ExampleRun() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	cfg := relay.DefaultConfig()
	cfg.PGURL = os.Getenv("DATABASE_URL") // e.g. postgres://relay@db/app
	cfg.NATSURL = os.Getenv("NATS_URL")   // e.g. nats://nats:4222
	cfg.CreateSlot = true
	log := zerolog.New(os.Stderr).With().Timestamp().Logger()
	if err := relay.Run(ctx, cfg, relay.WithLogger(log)); err != nil {
		log.Fatal().Err(err).Msg("outbox relay stopped")
	}
}

// One relay for the outboxes of two modules, from one slot and one publication, in commit order
// across them: orders.outbox has the default layout, billing.outbox columns of its own and its
// own subjects (under the feed's leading tokens, outbox).
func ExampleConfig_tables() {
	cfg := relay.DefaultConfig()
	cfg.PGURL = os.Getenv("DATABASE_URL")
	cfg.Publication = "modules_pub" // publishes both tables' inserts (outbox-relay migrate --table ... --table ...)
	cfg.Tables = []relay.Table{
		{Schema: "orders", Name: "outbox"},
		{Schema: "billing", Name: "outbox", SubjectTemplate: "{prefix}.billing.{aggregate_id}.{event_type}",
			Columns: decoder.Columns{ID: "event_id", AggregateType: "kind", AggregateID: "account", EventType: "name", Payload: "body", CreatedAt: "at"}},
	}
	if err := cfg.Validate(); err != nil {
		panic(err)
	}
	_ = relay.Run(context.Background(), cfg)
}
