"""RecoveryTask's fallback, circuit and degraded-mode options, in-process (eager): option
validation at class creation, and what a task returns or parks. The same on real workers:
tests/integration/test_circuit_and_fallback.py."""

from __future__ import annotations

import pytest
from celery import Celery

from recovery import RecoveryTask, RetryPolicy
from recovery.workflows import degraded
from recovery.workflows.circuit import Circuit
from recovery.core.errors import DependencyError
from recovery.models import DeadLetter, FallbackUse

ONCE = RetryPolicy(max_attempts=1)


def backup_quote(symbol: str, failure: dict | None = None) -> dict:
    """A plain function as fallback; it is told why it stands in."""
    return {"symbol": symbol, "source": "backup", "why": (failure or {}).get("reason")}


def backup_down(symbol: str) -> dict:
    raise RuntimeError(f"backup service has no quote for {symbol}")


@pytest.fixture
def app():
    app = Celery("resilience", set_as_current=False)
    app.conf.task_always_eager = True
    return app


@pytest.fixture
def state(settings):
    """Circuits and degraded modes in the test database."""
    settings.RECOVERY = {**settings.RECOVERY, "SHARED_STATE_URL": "database",
                         "CIRCUITS": {"partner-api": {"minimum_calls": 2, "open_seconds": 60}}}


# -- options are validated when the class is created ---------------------------------------------


@pytest.mark.parametrize(("options", "fragment"), [
    ({"when_circuit_open": "later"}, "when_circuit_open must be one of ('defer', 'fallback')"),
    ({"when_degraded": "sometimes"}, "when_degraded must be one of ('defer', 'fallback', 'run')"),
    ({"when_circuit_open": "fallback"}, "when_circuit_open='fallback' needs fallback="),
    ({"when_degraded": "fallback", "degraded_mode": "read-only"},
     "when_degraded='fallback' needs fallback="),
])
def test_bad_resilience_options_fail_at_class_creation(app, options, fragment):
    @app.task(base=RecoveryTask, **options)
    def misconfigured(symbol):
        return symbol

    with pytest.raises(ValueError) as raised:
        misconfigured.name  # noqa: B018 - evaluating the proxy creates the class
    assert fragment in str(raised.value)


def test_fallback_options_with_a_fallback_are_accepted(app):
    @app.task(base=RecoveryTask, fallback=backup_quote, dependency="partner-api",
              when_circuit_open="fallback", degraded_mode="read-only", when_degraded="fallback")
    def quote_1(symbol):
        return symbol

    assert quote_1.when_circuit_open == "fallback" and quote_1.dependency == "partner-api"


# -- fallback when the policy gives up -----------------------------------------------------------


@pytest.mark.django_db
def test_a_plain_function_fallback_gets_the_arguments_and_the_failure(app, state):
    @app.task(base=RecoveryTask, bind=True, retry_policy=ONCE, fallback=backup_quote)
    def quote_2(self, symbol):
        raise DependencyError("partner answered 503")

    result = quote_2.apply(("ACME",))
    assert result.successful()
    assert result.get() == {"symbol": "ACME", "source": "backup", "why": "gave_up"}
    use = FallbackUse.objects.get(task_id=result.id)
    assert use.reason == "gave_up" and use.task_name == quote_2.name
    assert use.fallback == "tests.recovery.test_task_resilience.backup_quote"
    assert use.exception_type == "recovery.errors.DependencyError"
    assert "partner answered 503" in use.exception_message
    assert not DeadLetter.objects.exists()


@pytest.mark.django_db
def test_a_task_named_by_dotted_path_can_be_the_fallback(app, state):
    @app.task(base=RecoveryTask, name="resilience.cached_quote")
    def cached_quote(symbol):
        return {"symbol": symbol, "source": "cache"}

    @app.task(base=RecoveryTask, retry_policy=ONCE, fallback="resilience.cached_quote")
    def quote_3(symbol):
        raise DependencyError("partner answered 503")

    result = quote_3.apply(("ACME",))
    assert result.get() == {"symbol": "ACME", "source": "cache"}
    assert FallbackUse.objects.get(task_id=result.id).fallback == "resilience.cached_quote"


@pytest.mark.django_db
def test_a_failing_fallback_parks_the_task_with_both_errors(app, state):
    @app.task(base=RecoveryTask, retry_policy=ONCE, fallback=backup_down)
    def quote_4(symbol):
        raise DependencyError("partner answered 503")

    result = quote_4.apply(("ACME",))
    assert result.failed()
    letter = DeadLetter.objects.get(task_id=result.id)
    assert "partner answered 503" in letter.exception_message
    assert "backup service has no quote for ACME" in letter.exception_message
    assert "backup_down" in letter.exception_message
    assert "RuntimeError" in letter.traceback
    assert not FallbackUse.objects.exists()


@pytest.mark.django_db
def test_a_retried_failure_does_not_use_the_fallback(app, state):
    runs: list[int] = []

    @app.task(base=RecoveryTask, retry_policy=RetryPolicy(max_attempts=3, initial_delay_seconds=0),
              fallback=backup_quote)
    def quote_5(symbol):
        runs.append(1)
        if len(runs) < 3:
            raise DependencyError("partner answered 503")
        return {"symbol": symbol, "source": "partner"}

    assert quote_5.apply(("ACME",)).get() == {"symbol": "ACME", "source": "partner"}
    assert not FallbackUse.objects.exists()


# -- circuit open and degraded mode --------------------------------------------------------------


@pytest.mark.django_db
def test_an_open_circuit_routes_to_the_fallback_without_calling_the_dependency(app, state):
    calls: list[str] = []

    @app.task(base=RecoveryTask, dependency="partner-api", when_circuit_open="fallback",
              fallback=backup_quote)
    def quote_6(symbol):
        calls.append(symbol)
        return {"symbol": symbol, "source": "partner"}

    Circuit("partner-api").trip(seconds=60)
    result = quote_6.apply(("ACME",))
    assert result.get() == {"symbol": "ACME", "source": "backup", "why": "circuit_open"}
    assert calls == []
    use = FallbackUse.objects.get(task_id=result.id)
    assert use.reason == "circuit_open" and use.dependency == "partner-api"
    assert use.exception_type == "recovery.circuit.CircuitOpenError"


@pytest.mark.django_db
def test_a_task_counts_its_outcomes_towards_its_circuit(app, state):
    @app.task(base=RecoveryTask, retry_policy=ONCE, dependency="partner-api",
              fallback=backup_quote)
    def quote_7(symbol):
        raise DependencyError("partner answered 503")

    quote_7.apply(("A",))
    assert Circuit("partner-api").state()["state"] == "closed"  # 1 call < minimum_calls
    quote_7.apply(("B",))
    assert Circuit("partner-api").state()["state"] == "open"


@pytest.mark.django_db
def test_degraded_mode_routes_to_the_fallback_and_off_runs_the_task(app, state):
    @app.task(base=RecoveryTask, degraded_mode="read-only", when_degraded="fallback",
              fallback=backup_quote)
    def quote_8(symbol):
        return {"symbol": symbol, "source": "partner"}

    degraded.switch("read-only", True, reason="test")
    result = quote_8.apply(("ACME",))
    assert result.get() == {"symbol": "ACME", "source": "backup", "why": "degraded"}
    assert FallbackUse.objects.get(task_id=result.id).reason == "degraded"
    degraded.switch("read-only", False)
    assert quote_8.apply(("ACME",)).get() == {"symbol": "ACME", "source": "partner"}


@pytest.mark.django_db
def test_when_degraded_run_ignores_the_switch(app, state):
    @app.task(base=RecoveryTask, degraded_mode="read-only", when_degraded="run")
    def quote_9(symbol):
        return symbol

    degraded.switch("read-only", True)
    assert quote_9.apply(("ACME",)).get() == "ACME"


@pytest.mark.django_db
def test_an_eager_run_cannot_wait_for_the_circuit_so_it_spends_attempts_and_parks(app, state):
    # Given an open circuit and a task that defers while it is open
    calls: list[str] = []

    @app.task(base=RecoveryTask, dependency="partner-api",
              retry_policy=RetryPolicy(max_attempts=3, initial_delay_seconds=0))
    def quote_10(symbol):
        calls.append(symbol)
        return symbol

    Circuit("partner-api").trip(seconds=60)
    # When it is applied eagerly (apply() would run a deferral again at once, forever)
    result = quote_10.apply(("ACME",))
    # Then it is bounded by its policy: parked after three attempts, never calling the dependency
    assert result.failed() and calls == []
    letter = DeadLetter.objects.get(task_id=result.id)
    assert letter.attempts == 3
    assert letter.exception_type == "recovery.circuit.CircuitOpenError"


@pytest.mark.django_db
def test_a_degraded_fallback_records_the_mode_even_when_the_task_has_a_dependency(app, state):
    @app.task(base=RecoveryTask, dependency="partner-api", degraded_mode="read-only",
              when_degraded="fallback", fallback=backup_quote)
    def quote_with_both(symbol):
        return {"symbol": symbol, "source": "partner"}

    degraded.switch("read-only", True)
    result = quote_with_both.apply(("ACME",))
    assert result.get()["why"] == "degraded"
    use = FallbackUse.objects.get(task_id=result.id)
    assert use.reason == "degraded" and use.dependency == "read-only"
