"""Names and helpers for what RecoveryTask carries in message headers.

History and the per-call policy travel with the message, never in worker
memory or a side table, so any worker can pick up the next attempt and a
redelivered message carries exactly the state it left with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["HISTORY", "POLICY", "STARTED_AT", "REPLAY", "COMPENSATES", "SAGA", "ORIGINAL_TASK_ID",
           "EFFECTS_GENERATION", "REHEARSAL", "CARRIED", "read", "from_options", "policy_header"]

HISTORY = "recovery_history"
POLICY = "recovery_policy"
STARTED_AT = "recovery_started_at"
REPLAY = "recovery_replay"
#: on a compensation published from a dead letter: the task id it compensates
COMPENSATES = "recovery_compensates"

#: on a saga step or compensation: {"run": <SagaRun id>, "step": <index>, "role": "step" |
#: "compensation"} (recovery.workflows.sagas)
SAGA = "recovery_saga"

#: on a dead letter's stored execution options (``letter.headers``), never on a message: the
#: task id the client sent, when no column could hold it and the letter is stored under its
#: hash (recovery.store.parking.letter_task_id)
ORIGINAL_TASK_ID = "recovery_original_task_id"

#: on a replay that reruns its effects (``replay(..., rerun_effects=True)``): the generation
#: of ``recovery_effect`` proofs the run records and checks (recovery.store.effects)
EFFECTS_GENERATION = "recovery_effects_generation"

#: on a run a rehearsal hit (recovery.workflows.rehearsals), and on its retries: the
#: rehearsal's id, which its letter and incident then carry
REHEARSAL = "recovery_rehearsal"

#: headers a retry carries to the next attempt besides the history (Celery drops custom
#: headers on retry)
CARRIED = (POLICY, REPLAY, COMPENSATES, SAGA, EFFECTS_GENERATION, REHEARSAL)

#: A replay carries only COMPENSATES and SAGA over from a letter (so a parked compensation
#: that is replayed still says what it compensates); see recovery.operations.replay_options.


def read(request: Any, name: str, default: Any = None) -> Any:
    """A custom header from a Celery request (Celery exposes them as attributes)."""
    value = getattr(request, name, None)
    if value is None:
        headers = getattr(request, "headers", None) or {}
        value = headers.get(name) if isinstance(headers, Mapping) else None
    return default if value is None else value


def from_options(options: Any, name: str) -> Any:
    """A custom header from a dead letter's stored execution options (``letter.headers``).

    A letter parked by its task keeps custom headers under ``"headers"``; one parked by
    the worker's main process (delivery cap, hard time limit) keeps the raw request's,
    at the top level.
    """
    if not isinstance(options, Mapping):
        return None
    nested = options.get("headers")
    if isinstance(nested, Mapping) and nested.get(name) is not None:
        return nested[name]
    return options.get(name)


def policy_header(policy: Any) -> dict[str, Any]:
    """Headers that override a task's policy for one call.

    Example::

        charge.apply_async((order_id,), headers=policy_header(RetryPolicy(max_attempts=2)))

    A policy travels in a header, never in ``apply_async(retry_policy=...)``, which Celery
    uses for *publish* retries.
    """
    data = policy.to_dict() if hasattr(policy, "to_dict") else dict(policy)
    return {POLICY: data}
