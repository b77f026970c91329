# Starling developer entry points. CI runs `CI=true make test` (see .ci/run).

GO        ?= go
BIN       ?= bin/starling
# Stamped into the binary (starling version, the startup log line,
# starling_build_info).
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT    ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
LDFLAGS   := -X github.com/starling-oci/starling/pkg/version.version=$(VERSION) -X github.com/starling-oci/starling/pkg/version.commit=$(COMMIT)
# Packages whose benchmarks `make bench` runs; BENCHTIME as for go test.
BENCH_PKGS ?= ./...
BENCHTIME  ?= 3x

.PHONY: build test lint bench demo clean

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/starling

# deploy/helm/charttest is a module of its own (Helm and the Kubernetes API
# stay out of the daemons' build): it renders the chart and checks it. It
# uses this module through a replace directive; -mod=mod lets its go.sum
# follow when a dependency is added here.
test:
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 20m ./...
	cd deploy/helm/charttest && $(GO) vet -mod=mod ./... && $(GO) test -mod=mod -count=1 -timeout 10m ./...

lint:
	@unformatted="$$(gofmt -l .)"; \
	if [ -n "$$unformatted" ]; then \
		echo "gofmt -l: these files need gofmt -w:"; echo "$$unformatted"; exit 1; \
	fi
	$(GO) vet ./...

# Not under -race: the e2e benchmarks time and measure the real binary.
bench:
	$(GO) test -run '^$$' -bench . -benchtime $(BENCHTIME) -timeout 30m $(BENCH_PKGS)

demo:
	$(GO) run ./e2e/pullstorm -mode both -chart pullstorm.svg -json pullstorm.json

clean:
	rm -rf bin
