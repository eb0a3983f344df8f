# outbox-relay. `make test` is what CI runs (.ci/run); it needs Go and the PostgreSQL server
# binaries (initdb, pg_ctl; Debian: apt-get install postgresql-15). NATS is embedded in tests.
GO       ?= go
BIN      ?= bin/outbox-relay
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
UNIT_PKGS := ./checkpoint/... ./decoder/... ./sink/... ./migrations/...

.PHONY: build demo test vet fmt-check unit integration chaos clean bench

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/outbox-relay

# Everything on this machine, no Docker: throwaway Postgres (apt-get install postgresql-15 when
# missing and run as root), the relay with embedded NATS JetStream, an example producer and
# consumer. Ctrl-C stops and removes it all.
demo:
	$(GO) build -o bin/ ./cmd/outbox-relay ./cmd/outbox-demo ./examples/producer ./examples/consumer
	./bin/outbox-demo --bin-dir bin

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

# The long fault-injection runs (about 15 minutes, then about 7), each under a continuous producer, then a
# verifier (0 lost, 0 duplicated, per-aggregate order). Single node: relay SIGKILL ≥ 30 times, SIGTERM,
# nats-server kill -9 and a 60 s outage, Postgres immediate restarts, walsender terminations, one
# 1,000,000-row transaction. 3-node JetStream cluster with an R3 stream, 4 rounds of: stream leader
# kill -9 (then restarted), leader step-down, a follower down 30 s, a rolling restart of all three, a
# node frozen with SIGSTOP for at least 30 s; recovery after each fault measured (target < 30 s) and the
# stream's commit order checked too. Each writes its section of docs/reliability.md. Short versions (a
# minute each) run in `make test`. OUTBOX_RELAY_CHAOS_PUBLISH=fast runs the relay's
# suite with that --publish mode.
chaos:
	OUTBOX_RELAY_CHAOS=long OUTBOX_RELAY_CHAOS_REPORT=$(CURDIR)/docs/reliability.md \
		$(GO) test -count=1 -timeout 45m -v -run TestChaos ./cmd/outbox-relay/

clean:
	rm -rf bin

# The benchmark (bench/README.md): throwaway Postgres + nats-server, the relay as a child
# process, every figure next to the ceilings measured in the same run. Takes several minutes;
# BENCH_FLAGS="-repeats 1 -latency-duration 5s" for a quick run.
BENCH_FLAGS ?=
bench:
	$(GO) run ./bench $(BENCH_FLAGS)
