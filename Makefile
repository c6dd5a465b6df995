# The two commands of the README. Both set up everything they need on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test chaos bench install clean

demo: $(STAMP)  ## run the example workflows on a worker, print what happened, serve the admin
	$(PY) manage.py demo

test: $(STAMP)  ## start PostgreSQL/Redis if they are down, then run the whole suite
	./scripts/ensure-services.sh
	$(PY) -m pytest

chaos: $(STAMP)  ## the chaos suite alone, longer: CHAOS_TASKS tasks over CHAOS_SECONDS of faults
	./scripts/ensure-services.sh
	CHAOS_TASKS=$${CHAOS_TASKS:-10000} CHAOS_SECONDS=$${CHAOS_SECONDS:-480} $(PY) -m pytest tests/chaos -m chaos

bench: $(STAMP)  ## throughput, bulk replay and admin change-list benchmarks (need Redis and PostgreSQL)
	./scripts/ensure-services.sh
	$(PY) bench/throughput.py
	$(PY) bench/bulk_replay.py
	$(PY) bench/changelist.py

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
