# Starling developer entry points. CI runs `CI=true make test` (see .ci/run).

GO        ?= go
BIN       ?= bin/starling
# Packages whose benchmarks `make bench` runs; BENCHTIME as for go test.
BENCH_PKGS ?= ./...
BENCHTIME  ?= 3x

.PHONY: build test lint bench demo clean

build:
	$(GO) build -o $(BIN) ./cmd/starling

test:
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 20m ./...

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
