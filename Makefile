# `make run` serves the API (embedded: SQLite, local storage, in-process worker) on 127.0.0.1:$(PORT).
# `make test` checks the import contracts, then runs the whole suite, starting PostgreSQL and Redis if they are down.
# Both create .venv and install everything on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check
BASE_STAMP := $(VENV)/.base-installed
TEST_STAMP := $(VENV)/.test-installed
BENCH_STAMP := $(VENV)/.bench-installed

EXAMPLE_STAMP := $(VENV)/.example-installed
# Two pytest processes: half the suite's wall time on two cores; files stay whole (module fixtures).
TEST_PROCESSES ?= 2
EXAMPLE_OUT ?= example

.PHONY: run test soak worker migrate bench example clean

$(BASE_STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "modelpress needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# constraints.txt holds torch==2.13.0 so no dependency can pull a newer (CUDA) build.
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(TEST_STAMP): $(BASE_STAMP)
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $@

$(BENCH_STAMP): $(TEST_STAMP)
	$(PIP) install -q -c constraints.txt -e '.[test,bench]'
	touch $@

# scikit-learn carries the digits images the example model is trained on (offline, in seconds).
$(EXAMPLE_STAMP): $(BASE_STAMP)
	$(PIP) install -q -c constraints.txt -e '.[example]'
	touch $@

# A small CNN to try the service with, and its data: $(EXAMPLE_OUT)/resnet-digits.onnx, digits-calib.npz, digits-test.npz.
example: $(EXAMPLE_STAMP)
	$(PY) -m bench.reference --dataset digits --small --out $(EXAMPLE_OUT)

run: $(BASE_STAMP)
	$(PY) -m service.migrate
	$(PY) -m worker.serve

test: $(TEST_STAMP)
	bash tests/ensure_services.sh
	# The import contracts of .importlinter: service without torch/onnxruntime/runner, engine without web or db.
	$(VENV)/bin/lint-imports
	# Whole files in collection order, the longest first (LONG_FILES in tests/conftest.py), not xdist's most-tests-first.
	$(PY) -m pytest -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder

# The slow fault scenarios, repeated (outside `make test`, bounded to 15 min): worker SIGKILLs at two
# points of a 2-step job, a Redis and a PostgreSQL outage, the hostile-input corpora; tests/soak.py
# repeats them SOAK_ROUNDS times and prints the table of figures (cases, 5xx, hangs, faults, jobs lost...).
SOAK_ROUNDS ?= 2
soak: $(TEST_STAMP)
	bash tests/ensure_services.sh
	MODELPRESS_SOAK_ROUNDS=$(SOAK_ROUNDS) MODELPRESS_SOAK_BUDGET_S=780 timeout 900 $(PY) -m pytest -p tests.soak -q \
		tests/test_worker_faults.py tests/test_redis_outage.py tests/test_hostile_inputs.py tests/test_pt2_archive.py

# Production shape, by hand: a worker for the cpu queue (set DATABASE_URL, BROKER_URL, STORAGE_URL).
worker: $(BASE_STAMP)
	$(VENV)/bin/celery -A worker.celery_app worker -Q cpu --concurrency 1 --loglevel INFO

migrate: $(BASE_STAMP)
	$(PY) -m service.migrate

# Every benchmark in turn (about an hour on 2 cores); each prints a table. Fashion-MNIST comes from
# Debian's dataset-fashion-mnist package.
bench: $(BENCH_STAMP)
	test -d /usr/share/datasets/fashion-mnist || apt-get install -y dataset-fashion-mnist
	test -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf || apt-get install -y fonts-dejavu-core
	$(PY) -m bench.quantize
	$(PY) -m bench.prune
	$(PY) -m bench.distill
	$(PY) -m bench.tasks

clean:
	rm -rf $(VENV) data .pytest_cache
