package relay_test

import (
	"context"
	"os"
	"os/signal"

	"github.com/rs/zerolog"

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
