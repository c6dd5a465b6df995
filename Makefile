# The two commands of the README. Both set up everything they need on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)

# The broker matrix (docs/brokers.md): the whole suite on Redis, the integration suite
# (real workers) again on RabbitMQ, in a vhost of its own, and on Amazon SQS (moto's
# server mode, started by the tests) when pycurl, which kombu's SQS transport needs, imports.
# Tests marked broker_independent (e-mail, webhooks, metrics exposition) run on Redis only;
# scripts/broker_matrix.py prints each integration test's outcome on each broker.
OTHER_BROKERS := -m "not broker_independent"
RABBITMQ_TEST_URL ?= amqp://guest:guest@127.0.0.1:5672/celery_recovery_test
SQS_TEST_URL      ?= sqs://moto
# `make demo BROKER=rabbitmq` / `BROKER=redis` / `BROKER=sqs`: the same demo on a local
# broker (the embedded file-system broker without it; sqs: a local moto server,
# scripts/with-local-sqs.py).
BROKER ?=
BROKER_URL_rabbitmq := amqp://guest:guest@127.0.0.1:5672//
BROKER_URL_redis    := redis://127.0.0.1:6379/0
BENCH_BROKER_URL_rabbitmq := amqp://guest:guest@127.0.0.1:5672/celery_recovery_bench
BENCH_BROKER_URL_redis    := redis://127.0.0.1:6379/12

.PHONY: demo test test-rabbitmq test-sqs chaos bench bench-quick install clean

demo: $(STAMP)  ## run the example workflows on a worker, print what happened, serve the admin
ifeq ($(BROKER),)
	$(PY) manage.py demo
else ifeq ($(BROKER),sqs)
	$(PY) scripts/with-local-sqs.py $(PY) manage.py demo
else
	@test -n "$(BROKER_URL_$(BROKER))" || { echo "BROKER is rabbitmq, redis or sqs, not $(BROKER)" >&2; exit 2; }
	./scripts/ensure-services.sh
	CELERY_BROKER_URL=$(BROKER_URL_$(BROKER)) $(PY) manage.py demo
endif

test: $(STAMP)  ## start the services if they are down, then run the whole suite on Redis and the integration suite on RabbitMQ and SQS
	./scripts/ensure-services.sh
	rm -f var/junit-*.xml
	$(PY) -m pytest --junitxml=var/junit-redis.xml
	TEST_BROKER_URL=$(RABBITMQ_TEST_URL) $(PY) -m pytest tests/integration $(OTHER_BROKERS) --junitxml=var/junit-rabbitmq.xml
	@if $(PY) -c "import pycurl" 2>/dev/null; then \
		echo "TEST_BROKER_URL=$(SQS_TEST_URL) pytest tests/integration $(OTHER_BROKERS)"; \
		TEST_BROKER_URL=$(SQS_TEST_URL) $(PY) -m pytest tests/integration $(OTHER_BROKERS) --junitxml=var/junit-sqs.xml; \
	else \
		echo "pycurl does not import: the SQS run of the integration suite is left out (pip install -r requirements.txt)" >&2; \
	fi
	$(PY) scripts/broker_matrix.py

test-rabbitmq: $(STAMP)  ## the integration suite on RabbitMQ alone
	./scripts/ensure-services.sh
	TEST_BROKER_URL=$(RABBITMQ_TEST_URL) $(PY) -m pytest tests/integration $(OTHER_BROKERS) --junitxml=var/junit-rabbitmq.xml

test-sqs: $(STAMP)  ## the integration suite on SQS alone (moto's server, started by the tests)
	./scripts/ensure-services.sh
	TEST_BROKER_URL=$(SQS_TEST_URL) $(PY) -m pytest tests/integration $(OTHER_BROKERS) --junitxml=var/junit-sqs.xml

chaos: $(STAMP)  ## the chaos suite alone, longer: CHAOS_TASKS tasks over CHAOS_SECONDS of faults
	./scripts/ensure-services.sh
	CHAOS_TASKS=$${CHAOS_TASKS:-10000} CHAOS_SECONDS=$${CHAOS_SECONDS:-480} $(PY) -m pytest tests/chaos -m chaos

bench: $(STAMP)  ## every benchmark in interleaved rounds: one table of figures against their targets, bench/results.json (exit 1 on a MISS, 2 on a crash); BROKER=rabbitmq or sqs runs the throughput there (sqs: a local moto server)
	./scripts/ensure-services.sh
ifeq ($(BROKER),sqs)
	$(PY) scripts/with-local-sqs.py sh -c '$(PY) bench/run.py --throughput-broker $$CELERY_BROKER_URL'
else
	$(PY) bench/run.py$(if $(BROKER), --throughput-broker $(BENCH_BROKER_URL_$(BROKER)))
endif

bench-quick: $(STAMP)  ## the same table at small sizes, under 3 minutes; exits 0 whatever the figures, non-zero only if a benchmark crashes
	./scripts/ensure-services.sh
	$(PY) bench/run.py --quick

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
