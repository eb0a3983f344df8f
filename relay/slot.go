package relay

import (
	"fmt"

	"github.com/outbox-relay/outbox-relay/replication"
)

// SlotMismatch says why an existing slot cannot serve the relay on this connection's database,
// or "" when it can.
func SlotMismatch(s replication.Slot) string {
	switch {
	case s.SlotType != "logical" || s.Plugin != "pgoutput":
		return fmt.Sprintf("uses plugin %q (%s slot); the relay needs a logical pgoutput slot", s.Plugin, s.SlotType)
	case !s.CurrentDatabase:
		return fmt.Sprintf("belongs to database %q, not the one in Config.PGURL", s.Database)
	}
	return ""
}
