"""recovery.observe.sentry through the real sentry-sdk, sending to a local HTTP stand-in for Sentry:
the assertions read the envelopes the stand-in received, as Sentry would."""

from __future__ import annotations

import gzip
import json
import logging
import sys
import threading
import time
import zlib
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sentry_sdk
from celery import shared_task
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.scope import global_event_processors

from config.celery import app as celery_app  # noqa: F401 - the current app knows the tasks
from recovery.observe import sentry
from recovery.observe.escalation import rules
from recovery.core.fingerprint import fingerprint
from recovery.models import Incident
from recovery.store.parking import ParkRecord
from recovery.core.redaction import MASK

CARD_TOKEN = "tok_live_4242SECRETcardtoken"
PASSWORD = "hunter2-not-for-sentry"


class SentryStandIn:
    """A local HTTP server that takes sentry-sdk's envelopes (``POST /api/<id>/envelope/``)
    and keeps them, raw and parsed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bodies: list[bytes] = []
        self.envelopes: list[tuple[dict, list[tuple[dict, bytes]]]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding == "br":
                    import brotli

                    body = brotli.decompress(body)
                if self.path.rstrip("/").endswith("/envelope"):
                    with stand_in._lock:
                        stand_in.bodies.append(body)
                        stand_in.envelopes.append(parse_envelope(body))
                answer = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format, *args) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.dsn = f"http://public@127.0.0.1:{self.server.server_port}/7"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict]:
        """Error and message events received, oldest first (no transactions, reports)."""
        with self._lock:
            return [json.loads(payload) for _, items in self.envelopes
                    for header, payload in items if header.get("type") == "event"]

    def raw(self) -> bytes:
        with self._lock:
            return b"\n".join(self.bodies)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def parse_envelope(body: bytes) -> tuple[dict, list[tuple[dict, bytes]]]:
    """Sentry's envelope: a JSON header line, then items (a JSON header line and a payload
    of ``length`` bytes, or up to the next newline)."""
    header_line, _, rest = body.partition(b"\n")
    items = []
    while rest.strip():
        item_line, _, rest = rest.partition(b"\n")
        item = json.loads(item_line)
        if "length" in item:
            payload, rest = rest[: item["length"]], rest[item["length"]:]
            rest = rest[1:] if rest.startswith(b"\n") else rest
        else:
            payload, _, rest = rest.partition(b"\n")
        items.append((item, payload))
    return json.loads(header_line), items


@shared_task(name="tests.recovery.test_sentry.charge_card", bind=True)
def charge_card(self, order_id, card_token, amount="9.99", **options):
    """Positional ``card_token`` is secret by its name (recovery.core.redaction)."""


@pytest.fixture(autouse=True)
def _forget_main_process_reports(monkeypatch):
    """Each test starts with no letter reported by a "main process" in the last seconds."""
    monkeypatch.setattr(sentry, "_recent", deque(maxlen=64))


@pytest.fixture
def stand_in():
    server = SentryStandIn()
    yield server
    server.close()


@pytest.fixture
def init_sentry(stand_in):
    """``init(**options)`` starts a real client sending to the stand-in; the process's
    previous client is back after the test."""
    previous = sentry_sdk.get_client()
    started = []

    def init(**options):
        options = {"default_integrations": False, "auto_enabling_integrations": False,
                   "_experiments": {"transport_compression_level": 0}, **options}
        sentry_sdk.init(dsn=stand_in.dsn, **options)
        started.append(sentry_sdk.get_client())
        return started[-1]

    yield init
    for client in started:
        client.close(timeout=2)
    sentry_sdk.get_global_scope().set_client(previous)


@pytest.fixture
def escalation(settings):
    """``escalation(**keys)`` sets ``RECOVERY["ESCALATION"]`` for the test."""

    def configure(**keys):
        settings.RECOVERY = {**settings.RECOVERY, "ESCALATION": keys}
        return rules()

    return configure


def wait_for_events(stand_in, count, timeout=5.0):
    sentry_sdk.flush(timeout=timeout)
    deadline = time.monotonic() + timeout
    while len(stand_in.events()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return stand_in.events()


def make_record(**overrides) -> ParkRecord:
    data = dict(
        task_id="c0ffee00-charge-1234",
        task_name="tests.recovery.test_sentry.charge_card",
        kind="dependency",
        permanent=True,
        reason="permanent failure (dependency: card declined)",
        exception_type="recovery.errors.DependencyError",
        exception_message="card declined for order 1234",
        traceback="Traceback (most recent call last):\n  File \"tasks.py\", line 9, in charge\n"
                  "recovery.errors.DependencyError: card declined for order 1234\n",
        args=[1234, CARD_TOKEN],
        kwargs={"amount": "9.99", "options": {"password": PASSWORD, "retries": 2}},
        history=[
            {"at": "2026-03-01T11:50:00+00:00", "attempt": 1, "replay": 0,
             "exception_type": "recovery.errors.DependencyError",
             "exception_message": "payment gateway answered 503", "kind": "dependency",
             "delay_seconds": 0.2},
            {"at": "2026-03-01T11:50:01+00:00", "attempt": 2, "replay": 0,
             "exception_type": "recovery.errors.DependencyError",
             "exception_message": "card declined for order 1234", "kind": "dependency",
             "delay_seconds": None},
        ],
        queue="payments",
        worker="w1@host",
    )
    data.update(overrides)
    return ParkRecord(**data)


def declined(order_id, card_token):
    """Raises as a task would, with the secret in a local variable of its frame."""
    from recovery.core.errors import DependencyError

    payload = {"card_token": card_token, "note": f"card {card_token}"}  # noqa: F841
    raise DependencyError(f"card declined for order {order_id}", permanent=True)


def live_exception():
    try:
        declined(1234, CARD_TOKEN)
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("declined() did not raise")


def test_a_parked_letter_is_one_event_grouped_by_its_failure_with_tags_and_masked_arguments(
        init_sentry, stand_in, escalation):
    # Given a Sentry client (frame locals on, as by default) and absolute admin links
    init_sentry(include_local_variables=True)
    chosen = escalation(ADMIN_BASE_URL="https://ops.example.com")
    record = make_record()
    exc = live_exception()

    # When the letter is reported with the task's live exception
    sentry.report_letter(record, 42, exc, chosen)

    # Then Sentry receives one event, grouped by the letter's fingerprint
    [event] = wait_for_events(stand_in, 1)
    fp = fingerprint(record.task_name, record.exception_type, record.exception_message)
    assert event["fingerprint"] == ["celery-recovery", fp]
    assert event["level"] == "error"
    assert {key: event["tags"].get(key) for key in (
        "recovery.task", "recovery.kind", "recovery.queue", "recovery.status",
        "recovery.permanent", "recovery.fingerprint")} == {
        "recovery.task": "tests.recovery.test_sentry.charge_card",
        "recovery.kind": "dependency",
        "recovery.queue": "payments",
        "recovery.status": "parked",
        "recovery.permanent": "true",
        "recovery.fingerprint": fp,
    }
    assert all(len(str(value)) <= 200 for value in event["tags"].values())
    # ... with the diagnostics, secrets masked (positional by parameter name, nested by key)
    letter = event["contexts"]["dead_letter"]
    assert letter["args"] == [1234, MASK]
    assert letter["kwargs"] == {"amount": "9.99", "options": {"password": MASK, "retries": 2}}
    assert letter["task_id"] == record.task_id
    assert letter["letter_id"] == 42
    assert letter["attempts"] == 2
    assert [entry["attempt"] for entry in letter["history"]] == [1, 2]
    assert letter["classification"] == {"kind": "dependency", "permanent": True,
                                        "reason": record.reason}
    assert letter["links"]["letter"] == "https://ops.example.com/admin/recovery/deadletter/42/change/"
    assert letter["admin_url"] == letter["links"]["letter"]
    assert letter["links"]["group"] == ("https://ops.example.com/admin/recovery/deadletter/"
                                        f"?fingerprint={fp}")
    # ... the real stack frames of the exception, locals included but masked
    [value] = event["exception"]["values"]
    assert value["type"] == "DependencyError"
    assert value["value"] == "card declined for order 1234"
    assert value["mechanism"]["type"] == "celery-recovery"
    frames = value["stacktrace"]["frames"]
    assert [f["function"] for f in frames][-2:] == ["live_exception", "declined"]
    assert frames[-1]["filename"].endswith("test_sentry.py")
    raising = frames[-1]["vars"]
    assert MASK in raising["card_token"] and MASK in json.dumps(raising["payload"], ensure_ascii=False)
    assert "traceback" not in letter  # the frames say it
    # ... and the secrets appear nowhere in what was sent
    received = stand_in.raw()
    assert CARD_TOKEN.encode() not in received
    assert PASSWORD.encode() not in received
    # ... and the exception is marked as reported (the Celery integration's copy is dropped)
    assert sentry.was_reported(exc)


def test_a_letter_parked_by_the_worker_main_process_is_rebuilt_from_what_was_stored(
        init_sentry, stand_in, escalation):
    # Given a critical task and no ADMIN_BASE_URL
    init_sentry()
    chosen = escalation(CRITICAL_TASKS=["tests.recovery.test_sentry.charge_card"])
    record = make_record(exception_type="billiard.exceptions.WorkerLostError",
                         exception_message="delivered 4 times (cap 3)", kind="poison",
                         queue="")

    # When the letter is reported without an exception, spooled (no letter id yet)
    sentry.report_letter(record, None, None, chosen)

    # Then the event carries the stored exception and traceback text, at level fatal
    [event] = wait_for_events(stand_in, 1)
    assert event["level"] == "fatal"
    [value] = event["exception"]["values"]
    assert (value["module"], value["type"], value["value"]) == (
        "billiard.exceptions", "WorkerLostError", "delivered 4 times (cap 3)")
    assert "stacktrace" not in value
    letter = event["contexts"]["dead_letter"]
    assert letter["traceback"] == record.traceback
    assert letter["letter_id"] is None
    assert "letter" not in letter["links"]
    assert letter["links"]["group"].startswith("/admin/recovery/deadletter/?fingerprint=")
    assert event["tags"]["recovery.kind"] == "poison"
    assert "recovery.queue" not in event["tags"]  # no empty tag values
    assert CARD_TOKEN.encode() not in stand_in.raw()


def test_a_letters_tags_and_context_do_not_leak_into_the_tasks_other_events(
        init_sentry, stand_in, escalation):
    init_sentry()
    sentry.report_letter(make_record(), 1, None, escalation())
    sentry_sdk.capture_message("an unrelated warning", level="warning")
    letter_event, other = wait_for_events(stand_in, 2)
    assert "dead_letter" in letter_event["contexts"]
    assert not any(key.startswith("recovery.") for key in other.get("tags", {}))
    assert "dead_letter" not in other.get("contexts", {})
    assert other.get("fingerprint") is None


def test_an_incident_without_a_letter_is_one_event_of_its_own(init_sentry, stand_in, escalation):
    # Given an incident the watchdog opened (nothing in the database is needed to report it)
    init_sentry()
    chosen = escalation(ADMIN_BASE_URL="https://ops.example.com/")
    incident = Incident(
        pk=7, fingerprint="watchdog:task:tasks.nightly_report",
        reason=Incident.Reason.STUCK_TASK, severity=Incident.Severity.CRITICAL,
        title="tasks.nightly_report runs past its deadline", task_name="tasks.nightly_report",
        kind="timeout", queue="reports",
        details={"task_id": "abc", "started_at": "2026-03-01T02:00:00+00:00",
                 "kwargs": {"api_token": "tok-raw"}},
    )

    # When it is reported
    sentry.report_incident(incident, chosen)

    # Then Sentry receives a message event grouped by the incident's fingerprint
    [event] = wait_for_events(stand_in, 1)
    assert event["fingerprint"] == ["celery-recovery", "incident",
                                    "watchdog:task:tasks.nightly_report"]
    assert event["level"] == "fatal"
    assert "runs past its deadline" in json.dumps(event.get("message") or event["logentry"])
    assert {key: event["tags"].get(key) for key in (
        "recovery.incident_reason", "recovery.task", "recovery.kind", "recovery.queue",
        "recovery.status")} == {
        "recovery.incident_reason": "stuck_task", "recovery.task": "tasks.nightly_report",
        "recovery.kind": "timeout", "recovery.queue": "reports", "recovery.status": "open",
    }
    context = event["contexts"]["incident"]
    assert context["link"] == "https://ops.example.com/admin/recovery/incident/7/change/"
    assert context["details"]["kwargs"] == {"api_token": MASK}
    assert b"tok-raw" not in stand_in.raw()


def test_without_a_client_nothing_is_sent_and_nothing_raises(stand_in, escalation,
                                                             init_sentry):
    # Given no Sentry client (the project never called sentry_sdk.init)
    assert not sentry_sdk.get_client().is_active()
    chosen = escalation()
    # When letters and incidents are reported, they are not
    sentry.report_letter(make_record(), 1, live_exception(), chosen)
    sentry.report_incident(Incident(pk=1, fingerprint="x", reason="threshold", title="t"),
                           chosen)
    # ... nor with a client that has no DSN
    sentry_sdk.init(dsn=None, default_integrations=False)
    exc = live_exception()
    sentry.report_letter(make_record(), 1, exc, chosen)
    assert not sentry.was_reported(exc)
    # ... nor when the project turned the channel off
    init_sentry()
    exc = live_exception()
    sentry.report_letter(make_record(), 1, exc, escalation(SENTRY=False))
    sentry_sdk.flush(timeout=2)
    time.sleep(0.2)
    assert stand_in.events() == []
    assert not sentry.was_reported(exc)


def test_without_sentry_sdk_installed_everything_is_a_no_op(monkeypatch, escalation):
    monkeypatch.setitem(sys.modules, "sentry_sdk", None)  # import sentry_sdk now fails
    assert sentry.install() is False
    sentry.report_letter(make_record(), 1, live_exception(), escalation())
    sentry.report_incident(Incident(pk=1, fingerprint="x", reason="threshold", title="t"))


def test_a_broken_report_never_raises(init_sentry, stand_in, escalation, monkeypatch, caplog):
    init_sentry()

    def broken(*args, **kwargs):
        raise RuntimeError("diagnostics exploded")

    monkeypatch.setattr("recovery.observe.escalation.letter_diagnostics", broken)
    with caplog.at_level(logging.WARNING, logger="recovery.sentry"):
        sentry.report_letter(make_record(), 1, live_exception(), escalation())
    assert "could not report" in caplog.text


def test_the_duplicate_filter_drops_a_second_report_of_a_parked_exception_only(
        init_sentry, stand_in, escalation):
    # Given a client without sentry-sdk's own DedupeIntegration: only recovery's filter acts
    init_sentry(integrations=[LoggingIntegration(level=None, event_level=logging.ERROR)])
    chosen = escalation()
    exc = live_exception()
    # When recovery reports a letter, and the same exception is captured again (as the
    # Celery integration does when the parked task re-raises it)
    sentry.report_letter(make_record(), 1, exc, chosen)
    sentry_sdk.capture_exception(exc)
    try:
        raise exc
    except Exception:  # noqa: BLE001 - as Celery's trace logs a failed task
        logging.getLogger("celery.app.trace").error("Task raised unexpected", exc_info=True)
    # ... and a letter parked by the main process is logged by Celery with a new object
    sentry.report_letter(make_record(exception_type="ValueError",
                                     exception_message="body cannot be decoded"),
                         2, None, chosen)
    sentry_sdk.capture_exception(ValueError("body cannot be decoded"))
    sentry_sdk.capture_exception(ValueError("body cannot be decoded"))  # not a copy: kept
    # ... and escalation announces the incident it opened for the letter
    logging.getLogger("recovery.escalation").error(
        "recovery: incident #%s opened (%s): %s (%s)", 3, "threshold", "t", "/admin/")
    # ... while unrelated errors happen
    sentry_sdk.capture_exception(ValueError("another failure"))
    unrelated = live_exception()
    sentry_sdk.capture_exception(unrelated)
    logging.getLogger("recovery.escalation").error("recovery: could not escalate x")

    # Then only recovery's two letters and the four other errors reach Sentry
    sentry_sdk.flush(timeout=5)
    time.sleep(0.3)
    events = stand_in.events()
    ours = [e for e in events if "dead_letter" in e.get("contexts", {})]
    others = [e for e in events if "dead_letter" not in e.get("contexts", {})]
    assert len(ours) == 2
    assert sorted(json.dumps(e.get("exception", {}).get("values", [{}])[-1].get("value")
                             or e.get("logentry", {}).get("message")) for e in others) == sorted(
        json.dumps(text) for text in ("another failure", "body cannot be decoded",
                                      "card declined for order 1234",
                                      "recovery: could not escalate x"))
    assert not sentry.was_reported(unrelated)


def test_install_registers_the_filter_once():
    # RecoveryConfig.ready() installed it already; installing again changes nothing
    assert sentry.install() is True
    assert sentry.install() is True
    assert global_event_processors.count(sentry._drop_duplicates) == 1
