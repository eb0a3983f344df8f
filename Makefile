# outbox-relay. `make test` is what CI runs (.ci/run); it needs Go and the PostgreSQL server
# binaries (initdb, pg_ctl; Debian: apt-get install postgresql-15). NATS is embedded in tests.
GO       ?= go
BIN      ?= bin/outbox-relay
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
UNIT_PKGS := ./checkpoint/... ./decoder/... ./sink/... ./migrations/...

.PHONY: build test vet fmt-check unit integration clean

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/outbox-relay

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# Unit packages under the race detector, then everything (integration tests start their own
# Postgres cluster and JetStream server).
unit:
	$(GO) test -race -count=1 $(UNIT_PKGS)

integration:
	$(GO) test -race -count=1 -timeout 15m ./...

test: fmt-check vet unit integration

clean:
	rm -rf bin
