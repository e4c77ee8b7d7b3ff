# concert-server: the commands a developer and CI need.
#   make run       start the server on the default local MariaDB and Redis
#   make test      lint, then every test (unit, adapter integration, end-to-end, API contract)
#   make soak      the chaos soak: ten minutes of faults under load (SOAK_SECONDS to change)

CARGO ?= cargo
# Where the tests find their services (unset them to use testcontainers where Docker runs).
export TEST_DATABASE_URL ?= mysql://root@127.0.0.1:3306
export TEST_REDIS_URL ?= redis://127.0.0.1:6379
# make bench QUICK=1: smaller loads, three runs per figure; bench-booking and the query plans
# (docs/explain.sh) run in a full run only. QUICK=0 (or unset) is the full run.
QUICK ?=
export BENCH_QUICK = $(if $(filter 1,$(QUICK)),1,)
# How long make soak runs its workload, in seconds (make test runs 120).
SOAK_SECONDS ?= 600

.PHONY: help run test soak contract lint fmt build bench services clean-test-dbs up down deploy-check docs-check

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

run: services ## Start the server on the default local services (see README for settings)
	$(CARGO) run --locked --bin concert-server

test: services lint deploy-check docs-check ## Lint, check the deployment files and the docs' diagrams, then run every test; the end-to-end tests start real server processes
	$(CARGO) build --workspace --bins --locked
	$(CARGO) test --workspace --locked --exclude e2e
	# The Redis adapters again on a three-master Redis Cluster (one slot per script,
	# sharded pub/sub), started and stopped around them.
	./tests/on-redis-cluster.sh $(CARGO) test --package adapters-redis --locked --test it
	# One end-to-end test at a time: each starts up to three servers, and two storms
	# sharing two cores would measure the machine, not the service.
	$(CARGO) test --package e2e --locked -- --test-threads=1
	# Two minutes of the chaos soak (make soak runs ten).
	SOAK_SECONDS=120 ./target/debug/soak
	./tests/contract/run.sh

soak: services ## Chaos soak: mixed load on three instances while they and Redis are killed (SOAK_SECONDS, SOAK_SEED)
	$(CARGO) build --workspace --bins --locked
	SOAK_SECONDS=$(SOAK_SECONDS) ./target/debug/soak

contract: services ## Validate the OpenAPI document and fuzz every route against it (schemathesis)
	$(CARGO) build --workspace --bins --locked
	./tests/contract/run.sh

lint: ## Format check and clippy, warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

build: ## Build everything
	$(CARGO) build --workspace --all-targets --locked

bench: services ## Every benchmark on a release build; figures, JSON and SVG plots into docs/bench/ and docs/report/ (QUICK=1: the reduced run, a few minutes)
	@case "$(QUICK)" in ""|0|1) ;; *) echo "make bench: QUICK must be 0 or 1, not \"$(QUICK)\"" >&2; exit 2;; esac
	$(CARGO) build --release --workspace --bins --locked
	./target/release/bench-locks
	./target/release/bench-limits
	./target/release/bench-cluster
	./target/release/bench-payments
	./target/release/bench-stampede
	./target/release/bench-queue
	./target/release/bench-coupons
ifneq ($(QUICK),1)
	./target/release/bench-booking
	./docs/explain.sh
endif

services: ## Make sure MariaDB and Redis answer on 127.0.0.1 (start them if not)
	./deploy/local-services.sh

# The container stack of deploy/compose.yaml (needs Docker with its compose plugin).
COMPOSE = docker compose -f deploy/compose.yaml
NEED_COMPOSE = @docker compose version >/dev/null 2>&1 || { \
	echo "make $@: 'docker compose' is not available: install Docker with the compose plugin (docs/deployment.md)" >&2; exit 1; }

up: ## Build and start MySQL, Redis, three instances, nginx (:8080), Prometheus (:9091) and Grafana (:3000) in containers
	$(NEED_COMPOSE)
	$(COMPOSE) up -d --build

down: ## Stop the container stack and delete its volumes
	$(NEED_COMPOSE)
	$(COMPOSE) down -v

deploy-check: ## Validate the deployment files: compose, Kubernetes, Dockerfile, nginx, Prometheus, Grafana (no container engine needed)
	./deploy/check.sh

docs-check: ## Parse every Mermaid diagram in docs/ with mermaid itself (installs it from npm into target/)
	./docs/design/check-mermaid.sh

clean-test-dbs: ## Drop databases left behind by interrupted test runs
	mariadb -h127.0.0.1 -uroot -N -e "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE 't\_%' OR schema_name LIKE 'e2e\_%'" \
	  | while read -r db; do mariadb -h127.0.0.1 -uroot -e "DROP DATABASE \`$$db\`"; done
