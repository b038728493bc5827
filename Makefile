# The two commands of the README:
#   make run    start local Kafka + a worker on embedded ClickHouse (installs what it needs)
#   make test   run the whole test suite against a real broker and real ClickHouse
# Both create .venv on first use; Kafka jars are cached under ~/.cache/flywheel.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test bench bench-latency bench-ui bench-collector bench-identity bench-metrics bench-restart bench-segments bench-experiments bench-alerts bench-definitions bench-shutdown bench-soak sample stop lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	# GrowthBook's stats engine, a test oracle for metrics/stats.py. Without its dependencies: it pins
	# numpy<2 and pandas<2 for a pandas front end the tests do not import; its statistics run on ours.
	$(BIN)/pip install --quiet --no-deps gbstats==0.8.0
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/flywheel kafka start
	$(BIN)/flywheel worker

test: $(STAMP)
	scripts/ensure-clickhouse-server
	scripts/ensure-chromium
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Throughput, in one run: a bare consumer, a minimal Python peer (bench/peer.py), Flywheel with 1 worker and
# with 2 workers + a store, on the fixed metrics file of bench/throughput-metrics.yaml; then a profile.
# Options: make bench BENCH_ARGS="--events 200000 --runs 2 --workers 1,2"
bench: $(STAMP)
	$(BIN)/python bench/pipeline.py --metrics bench/throughput-metrics.yaml $(BENCH_ARGS)

bench-collector: $(STAMP)
	$(BIN)/python bench/collector.py

bench-identity: $(STAMP)
	$(BIN)/python bench/identity.py

# Event -> live cell under sustained load, 1 and 2 workers (+ store).
# Options: make bench-latency BENCH_ARGS="--rates 2000,5000 --seconds 60 --workers 1,2"
bench-latency: $(STAMP)
	$(BIN)/python bench/latency.py $(BENCH_ARGS)

# Funnels/retention/active users: stage in-process, state size, pipeline on vs off, latency.
# Options: make bench-metrics BENCH_ARGS="--parts stage,state --persons 100000"
bench-metrics: $(STAMP)
	$(BIN)/python bench/metrics.py $(BENCH_ARGS)

# Restart -> first published cell, /health during a rebalance and a ClickHouse outage, 1M persons (~20 min).
# Options: make bench-restart BENCH_ARGS="--persons 300000 --outage-seconds 60"
bench-restart: $(STAMP)
	scripts/ensure-clickhouse-server
	$(BIN)/python bench/restart.py $(BENCH_ARGS)

# Segments: cost per event (in-process), the sweep at 1M persons (RocksDB), entry latency and exit delay live.
# Options: make bench-definitions BENCH_ARGS="--persons 3000 --days 20"
bench-definitions: $(STAMP)
	$(BIN)/python bench/definitions.py $(BENCH_ARGS)

# Options: make bench-alerts BENCH_ARGS="--parts detect --seeds 200"
bench-alerts: $(STAMP)
	$(BIN)/python bench/alerts.py $(BENCH_ARGS)

# Options: make bench-segments BENCH_ARGS="--parts stage --persons 20000"
bench-segments: $(STAMP)
	$(BIN)/python bench/segments.py $(BENCH_ARGS)

# Options: make bench-experiments BENCH_ARGS="--persons 20000 --repeats 5"
# The UI: event → chart delay (SSE on the worker and on `flywheel ui`, vs SQL), 1,000 open pages' cost.
# Options: make bench-ui BENCH_ARGS="--reps 20 --clients 1000"
bench-ui: $(STAMP)
	$(BIN)/python bench/ui.py $(BENCH_ARGS)

bench-experiments: $(STAMP)
	$(BIN)/python bench/experiments.py $(BENCH_ARGS)

bench-shutdown: $(STAMP)
	$(BIN)/python bench/shutdown.py $(BENCH_ARGS)

# Options: make bench-soak BENCH_ARGS="--events 2000000 --days 90 --store-memory-mb 512"
bench-soak: $(STAMP)
	$(BIN)/python bench/soak.py $(BENCH_ARGS)

sample: $(STAMP)
	$(BIN)/flywheel sample

stop: $(STAMP)
	$(BIN)/flywheel kafka stop

lint: $(STAMP)
	$(BIN)/ruff check streams tests bench

clean:
	rm -rf .flywheel
