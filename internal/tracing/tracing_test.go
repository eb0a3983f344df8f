package tracing

import (
	"context"
	"testing"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

func TestConfigured(t *testing.T) {
	for _, c := range []struct {
		env      map[string]string
		on       bool
		protocol string
		errWant  string
	}{
		{env: nil},
		{env: map[string]string{"OTEL_SERVICE_NAME": "orders-relay"}},
		{env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, on: true, protocol: "http/protobuf"},
		{env: map[string]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, on: true, protocol: "http/protobuf"},
		{env: map[string]string{"OTEL_TRACES_EXPORTER": "otlp"}, on: true, protocol: "http/protobuf"},
		{env: map[string]string{"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}},
		{env: map[string]string{"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}},
		{env: map[string]string{"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, on: true, protocol: "http/protobuf"},
		{env: map[string]string{"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, on: true, protocol: "http/protobuf"},
		{env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, on: true, protocol: "grpc"},
		{env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, on: true, protocol: "grpc"},
		{env: map[string]string{"OTEL_TRACES_EXPORTER": "zipkin"}, errWant: "OTLP only"},
		{env: map[string]string{"OTEL_TRACES_EXPORTER": "otlp,console"}, errWant: "OTLP only"},
		{env: map[string]string{"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, errWant: "http/protobuf"},
		// The protocol matters only when traces are on.
		{env: map[string]string{"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}},
	} {
		env := func(k string) (string, bool) { v, ok := c.env[k]; return v, ok }
		on, protocol, err := Configured(env)
		if c.errWant != "" {
			require.ErrorContains(t, err, c.errWant, "%v", c.env)
			continue
		}
		require.NoError(t, err, "%v", c.env)
		require.Equal(t, c.on, on, "%v", c.env)
		require.Equal(t, c.protocol, protocol, "%v", c.env)

		tr, shutdown, err := Setup(context.Background(), env, "OUTBOX", nil, zerolog.Nop())
		require.NoError(t, err)
		require.Equal(t, c.on, tr != nil, "a tracer (provider) exists only when configured: %v", c.env)
		require.NoError(t, shutdown(context.Background()))
	}
}
