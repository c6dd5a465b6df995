"""Settings of the escalation storm's workers (``bench/escalation_storm.py``): the
project's, with escalation on (the default threshold rule, a webhook to the benchmark's
own receiver) when ``BENCH_ESCALATION=1``, or every escalation path off."""

import os

from config.settings import *  # noqa: F401,F403
from config.settings import RECOVERY as _PROJECT_RECOVERY

RECOVERY = {**_PROJECT_RECOVERY}
if os.environ.get("BENCH_ESCALATION") == "1":
    RECOVERY["ESCALATION"] = {"THRESHOLD_LETTERS": 10, "THRESHOLD_MINUTES": 15,
                              "WEBHOOK_URL": os.environ["BENCH_WEBHOOK_URL"],
                              "WEBHOOK_SECRET": "bench-storm-secret", "EMAIL": False,
                              "SENTRY": False}
else:
    RECOVERY["ESCALATION"] = {"THRESHOLD_LETTERS": None, "ON_COMPENSATION_FAILURE": False,
                              "WEBHOOK_URL": None, "EMAIL": False, "SENTRY": False}
