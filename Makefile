# Ferry: the two commands are `make demo` and `make test`; everything else is a step of theirs.
SHELL := /bin/bash
.DEFAULT_GOAL := help
STAMP := .ferry/stamps

.PHONY: help host deps build gen certs lint typecheck test test-unit demo clean

help:
	@echo "make demo   set up this host, build, and run the demo (a live migration)"
	@echo "make test   set up this host, build, and run the whole test suite"
	@echo "make lint   eslint, prettier and buf lint"
	@echo "make certs  a CA and certificates for the controller, the agents and an admin in .ferry/certs"

# Host packages and a CRIU that works on this kernel (idempotent; a second run takes ~1 s).
host:
	@deploy/host/setup.sh

# Node packages, reinstalled only when the lock file changes.
$(STAMP)/npm: package-lock.json
	@mkdir -p $(STAMP)
	npm ci --no-audit --no-fund
	@touch $@

deps: host $(STAMP)/npm

gen: $(STAMP)/npm
	npm run gen

build: $(STAMP)/npm
	npm run build

certs:
	@deploy/certs.sh .ferry/certs controller:controller admin:admin agent:edge-a agent:edge-b agent:edge-c

lint: $(STAMP)/npm
	npm run gen
	npx buf lint proto
	npx tsc -p tsconfig.check.json
	npx eslint .
	npx prettier --check .

typecheck: build

test: deps build
	npx vitest run

test-unit: $(STAMP)/npm build
	npx vitest run packages

demo: deps build
	@npx tsx --conditions=source deploy/demo.ts

clean:
	rm -rf packages/*/dist packages/*/tsconfig.tsbuildinfo packages/api/src/gen .ferry/stamps

.PHONY: testbed-up testbed-down bench bench-streaming
# The emulated edge testbed (deploy/testbed.ts): three edge hosts, a client host, agents, a controller.
testbed-up: deps build
	@npx tsx --conditions=source deploy/testbed.ts up

testbed-down:
	@npx tsx --conditions=source deploy/testbed.ts down

# COAT's experiments, the SSH baseline against Ferry, interleaved (bench/README.md); ~10 min.
bench: deps build
	@npx tsx --conditions=source bench/run.ts

# Image streaming over gRPC against a raw socket.
bench-streaming: deps build
	@npx tsx --conditions=source bench/streaming.ts
