"""A writer that parks letters at a steady rate, as workers would, while the change list
is measured (``bench/changelist.py``): the change list must hold its target with the
table being written to, not only on a table at rest.

It parks through ``recovery.store.parking.park`` (the statement a failing task runs:
the letter, its fingerprint's group, the escalation link), one letter at a time on its
own connection, paced to RATE per second; it prints how many it parked and the rate it
kept when it is stopped (SIGTERM).

Usage (normally started by changelist.py): python bench/park_writer.py RATE
Environment: DATABASE_URL (the change list's database).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-key-" + "x" * 50)  # DEBUG is off
os.environ.setdefault("RECOVERY_LOG_LEVEL", "WARNING")

_stop = False


def _stop_on_signal(*_: object) -> None:
    global _stop
    _stop = True


def main() -> None:
    rate = float(sys.argv[1])
    import django

    django.setup()
    from recovery.store.parking import ParkRecord, park

    signal.signal(signal.SIGTERM, _stop_on_signal)
    started = time.monotonic()
    parked = 0
    while not _stop:
        park(ParkRecord(
            task_id=f"writer-{uuid.uuid4()}", task_name="bench.park_writer",
            kind="dependency", reason="permanent failure: parked (dependency)",
            exception_type="payments.CardDeclined",
            exception_message=f"card declined (writer letter {parked})",
            args=[parked, 2500], kwargs={"currency": "EUR"}, permanent=True, queue="celery",
            worker="celery@bench-writer",
        ))
        parked += 1
        ahead = parked / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
    elapsed = time.monotonic() - started
    print(f"writer: parked {parked} letters in {elapsed:.1f} s ({parked / elapsed:.1f}/s)",
          flush=True)


if __name__ == "__main__":
    main()
