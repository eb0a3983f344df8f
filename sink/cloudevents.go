package sink

import (
	"github.com/nats-io/nats.go"

	"github.com/outbox-relay/outbox-relay/decoder"
)

// CloudEvents binary content mode headers (CloudEvents NATS protocol binding 1.0.1: each
// attribute is a header named ce-<attribute>; datacontenttype is content-type).
const (
	HeaderCEID          = "ce-id"
	HeaderCESpecVersion = "ce-specversion"
	HeaderCEType        = "ce-type"
	HeaderCESource      = "ce-source"
	HeaderCESubject     = "ce-subject"
	HeaderCETime        = "ce-time"
	HeaderContentType   = "content-type"
)

// DefaultCloudEventsSource is ce-source when Config.CloudEventsSource is empty.
const DefaultCloudEventsSource = "/outbox-relay"

// addCloudEvents sets the CloudEvents attributes of ev on h: id = event id, type = event_type,
// source = source, subject = aggregate_id, time = created_at (when known), data content type
// application/json. They replace header-column entries of the same name.
func addCloudEvents(h nats.Header, ev *decoder.Event, source string) {
	if source == "" {
		source = DefaultCloudEventsSource
	}
	h[HeaderCESpecVersion] = []string{"1.0"}
	h[HeaderCEID] = []string{string(ev.ID)}
	h[HeaderCEType] = []string{string(ev.EventType)}
	h[HeaderCESource] = []string{source}
	h[HeaderCESubject] = []string{string(ev.AggregateID)}
	if len(ev.CreatedAt) > 0 {
		h[HeaderCETime] = []string{string(ev.CreatedAt)}
	}
	h[HeaderContentType] = []string{"application/json"}
}
