"""``manage.py dlq`` against real PostgreSQL and Redis."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from recovery.models import DeadLetter, DeadLetterEvent
from recovery.store.parking import ParkRecord, spool

pytestmark = pytest.mark.django_db(transaction=True)

TASK = "tasks.tasks.charge_payment"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



def letters(n: int, **overrides) -> list[DeadLetter]:
    return DeadLetter.objects.bulk_create([
        DeadLetter(task_id=f"t-{i}", task_name=TASK, args=[i, 100], kwargs={},
                   fingerprint="c" * 40, kind="dependency", exception_type="DependencyError",
                   exception_message=f"declined {i}", **overrides)
        for i in range(n)
    ])


def run(*args) -> str:
    out = io.StringIO()
    call_command("dlq", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_list_and_show(broker):
    [first, *_] = letters(3)
    listing = run("list", "--limit", "2")
    assert listing.count(TASK) == 2
    shown = json.loads(run("show", str(first.pk)))
    assert shown["task_id"] == "t-0" and shown["args"] == [0, 100] and shown["events"] == []
    with pytest.raises(CommandError, match="no dead letter with id 999999"):
        run("show", "999999")


def test_replay_by_ids_publishes_and_audits_as_the_cli_user(broker):
    made = letters(3)
    out = run("replay", "--ids", f"{made[0].pk},{made[2].pk}", "--yes")
    assert "Replayed 2 letters; 0 failed." in out
    assert broker.llen("celery") == 2
    assert set(DeadLetter.objects.filter(status="replaying").values_list("task_id", flat=True)) \
        == {"t-0", "t-2"}
    assert DeadLetterEvent.objects.filter(action="replayed", actor__startswith="cli").count() == 2


def test_dry_run_changes_nothing(broker):
    letters(3)
    out = run("discard", "--dry-run")
    assert "Would discard 3 parked letters" in out
    assert DeadLetter.objects.filter(status="parked").count() == 3
    assert broker.llen("celery") == 0


def test_bad_filters_get_clear_errors(broker):
    with pytest.raises(CommandError, match="--ids takes comma-separated numbers"):
        run("discard", "--ids", "4,x", "--yes")
    with pytest.raises(CommandError, match="cannot read 'yesterday' as a time"):
        run("list", "--since", "yesterday")


def test_partial_failure_exits_non_zero_and_keeps_the_failed_letters(broker):
    letters(2)
    DeadLetter.objects.filter(task_id="t-1").update(task_name="billing.tasks.gone")
    with pytest.raises(CommandError, match="1 letter\\(s\\) could not be replayed"):
        run("replay", "--yes")
    assert DeadLetter.objects.get(task_id="t-1").status == "parked"
    assert DeadLetter.objects.get(task_id="t-0").status == "replaying"


def test_resolve_with_filters_and_stats(broker):
    letters(4)
    DeadLetter.objects.filter(task_id__in=["t-0", "t-1"]).update(kind="timeout")
    assert "Resolved 2 letters" in run("resolve", "--kind", "timeout", "--yes", "--note", "done by hand")
    assert DeadLetterEvent.objects.filter(action="resolved", note="done by hand").count() == 2
    stats = run("stats")
    assert "2  parked" in stats and "2  resolved" in stats


def test_drain_moves_spooled_letters_into_the_table(broker):
    spool().put(ParkRecord(task_id="spooled-1", task_name=TASK, kind="dependency",
                           reason="database was down", history=[{"attempt": 1}]).to_dict())
    assert "Drained 1 spooled letter" in run("drain")
    assert DeadLetter.objects.filter(task_id="spooled-1").exists()


def test_drain_reports_a_quarantined_record_and_requeues_it_once_the_cause_is_fixed(broker):
    # Given a spooled letter PostgreSQL refuses (a constraint the deploy added by mistake)
    table = DeadLetter._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT test_refused '
                       f"CHECK (task_name <> %s) NOT VALID", [TASK])
    try:
        spool().put(ParkRecord(task_id="refused-1", task_name=TASK, kind="dependency",
                               reason="database was down").to_dict())
        # When it is drained, it is quarantined and the operator is told where and why
        output = run("drain")
        assert "Drained 0 spooled letters" in output
        assert "1 record is quarantined" in output and "--requeue-quarantined" in output
        assert spool().quarantined() == 1
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'ALTER TABLE "{table}" DROP CONSTRAINT IF EXISTS test_refused')
    # Then once the cause is fixed, the operator puts it back in line and it drains
    output = run("drain", "--requeue-quarantined")
    assert "Requeued 1 quarantined record." in output
    assert "Drained 1 spooled letter into the database." in output
    assert "quarantined in" not in output
    assert DeadLetter.objects.filter(task_id="refused-1").exists()
    assert spool().quarantined() == 0 and len(spool()) == 0
    assert list(spool().directory.iterdir()) == []


def test_two_processes_replaying_the_same_letters_replay_each_once(broker):
    # Given 600 parked letters and two operators starting the same bulk replay at once
    letters(600)
    db = connection.settings_dict
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
           "TEST_DATABASE_URL": f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:"
                                f"{db['PORT'] or 5432}/{db['NAME']}"}
    command = [sys.executable, "manage.py", "dlq", "replay", "--yes", "--batch-size", "50"]
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    # Then every letter was published exactly once, split between the two
    assert broker.llen("celery") == 600
    ids = [json.loads(raw)["headers"]["id"] for raw in broker.lrange("celery", 0, -1)]
    assert len(set(ids)) == 600
    assert DeadLetterEvent.objects.filter(action="replayed").count() == 600
    assert DeadLetter.objects.filter(status="replaying", replay_count=1).count() == 600
