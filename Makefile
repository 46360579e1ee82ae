# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-postgres lint bench chaos soak clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgetrio demo --data-dir .demo

TYPINGS := typings/.installed

# ESP32 stubs in a folder of their own (installed into the venv they would shadow CPython's time, machine, ...)
$(TYPINGS): $(STAMP)
	$(BIN)/pip install --quiet --target typings micropython-esp32-stubs==1.29.0.post1
	touch $(TYPINGS)

# Home Assistant core: its own discovery schemas, to check the gateway's discovery messages against
# (tests/ha_reference.py), and a real core to run against the gateway (tests/test_homeassistant_core.py); a venv of its
# own: its pinned dependencies are not the gateway's. The second line is what the integrations a bare core loads (and
# MQTT) require: the core runs with --skip-pip, installing nothing at start
HA_REF := .ha/.installed
# Its own pins come with it (package_constraints.txt in its wheel); josepy 2 lacks what its HTTP stack imports
$(HA_REF):
	$(PY) -m venv .ha
	.ha/bin/pip install --quiet --no-compile --no-deps homeassistant==2024.3.3
	.ha/bin/pip install --quiet --no-compile -c $$(.ha/bin/python -c 'import pathlib, homeassistant; print(pathlib.Path(homeassistant.__file__).parent / "package_constraints.txt")') \
		homeassistant==2024.3.3 paho-mqtt==1.6.1 josepy==1.14.0 \
		home-assistant-frontend==20240307.0 Pillow==10.2.0 janus==1.0.0 securetar==2024.2.1 SQLAlchemy==2.0.27 \
		fnv-hash-fast==0.5.0 psutil-home-assistant==0.0.1 aiohttp-fast-url-dispatcher==0.3.0 aiohttp-zlib-ng==0.3.1 \
		aiohttp_cors==0.7.0 ifaddr==0.2.0
	touch $(HA_REF)

lint: $(STAMP) $(TYPINGS)
	$(BIN)/ruff check edgetrio tests hil-tests
	$(BIN)/mypy
	$(BIN)/mypy --config-file firmware/mypy.ini
	$(BIN)/lint-imports

# lint and the install of Home Assistant's schemas need nothing of each other: side by side on a fresh checkout
test:
	$(MAKE) --no-print-directory -j2 lint $(HA_REF)
	$(BIN)/pytest -q -n 4 --dist loadfile --durations=15

# the relay's tests again, each relay on a fresh database of a PostgreSQL server the tests start (tests/test_postgres.py,
# in `make test`, covers what is PostgreSQL's own: migrations, replicas, fencing, a crashed database; here the database
# stays down for a minute)
RELAY_TESTS := tests/test_cloud.py tests/test_cloud_link.py tests/test_relay_security.py tests/test_accounts.py \
	tests/test_rollout.py tests/test_exhaustion.py tests/test_dashboard.py tests/test_automation_e2e.py \
	tests/test_api_contract.py
test-postgres: $(STAMP)
	EDGETRIO_TEST_DATABASE_OUTAGE=60 $(BIN)/pytest -q -n 4 --dist loadfile --relay-database postgresql $(RELAY_TESTS) \
		tests/test_postgres.py

bench: $(STAMP)
	$(BIN)/python -m edgetrio.tools.bench.bench_ingest
	$(BIN)/python -m edgetrio.tools.bench.bench_crowd
	$(BIN)/python -m edgetrio.tools.bench.bench_relay
	$(BIN)/python -m edgetrio.tools.bench.bench_replicas
	$(BIN)/python -m edgetrio.tools.bench.bench_flood
	$(BIN)/python -m edgetrio.tools.bench.bench_metrics
	$(BIN)/python -m edgetrio.tools.bench.bench_heap
	$(BIN)/python -m edgetrio.tools.bench.bench_dashboard
	$(BIN)/python -m edgetrio.tools.bench.bench_http
	$(BIN)/python -m edgetrio.tools.bench.bench_rules
	$(BIN)/python -m edgetrio.tools.bench.bench_cpu
	$(BIN)/python -m edgetrio.tools.bench.bench_exhaustion
	$(BIN)/python -m edgetrio.tools.bench.bench_catchup
	$(BIN)/python -m edgetrio.tools.bench.bench_battery
	$(BIN)/python -m edgetrio.tools.bench.bench_ota

# long runs, not part of `make test` (figures in docs/reliability.md); SEED=n replays a chaos schedule
chaos: $(STAMP)
	$(BIN)/python -m edgetrio.tools.bench.chaos --boards 20 --readings 100000 $(if $(SEED),--seed $(SEED))

soak: $(STAMP)
	$(BIN)/python -m edgetrio.tools.bench.soak --minutes 60

clean:
	rm -rf $(VENV) .ha .demo .pytest_cache .mypy_cache .ruff_cache
