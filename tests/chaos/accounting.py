"""After the storm: what became of every task, read from PostgreSQL, Redis, the spool
and the side-effect logs, and the one table the suite prints."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

from .hostile import Hostile

#: (figure, value, required): required is 0 for the zeros the suite fails on, None for
#: figures it only reports.
Row = tuple[str, object, object]


@dataclass
class Submitted:
    task_id: str
    outcome: str  # plain | transient | permanent


@dataclass
class Accounting:
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def add(self, figure: str, value: object, required: object = None) -> None:
        self.rows.append((figure, value, required))

    def failures(self) -> list[Row]:
        return [row for row in self.rows if row[2] is not None and row[1] != row[2]]

    def table(self) -> str:
        width = max(len(figure) for figure, _, _ in self.rows)
        lines = [f"{'figure':<{width}}  {'value':>9}  required",
                 f"{'-' * width}  {'-' * 9}  --------"]
        for figure, value, required in self.rows:
            mark = "" if required is None else ("  ok" if value == required else "  FAIL")
            lines.append(f"{figure:<{width}}  {value!s:>9}  "
                         f"{'' if required is None else required}{mark}")
        return "\n".join(lines + ([""] + self.details if self.details else []))


def broker_backlog(client: redis.Redis) -> int:
    """Messages queued (every priority list of the default queue) or held unacknowledged."""
    queued = sum(client.llen(name) for name in client.scan_iter(match="celery*")
                 if client.type(name) == b"list")
    return queued + client.hlen("unacked")


def spool_files(spool: Path, suffix: str) -> int:
    return len(list(spool.glob(f"*{suffix}"))) if spool.is_dir() else 0


def terminal(conn: psycopg.Connection, ids: list[str]) -> set[str]:
    """Task ids that have an outcome: a SUCCESS result or a letter."""
    with conn.cursor() as cur:
        cur.execute("SELECT task_id FROM django_celery_results_taskresult "
                    "WHERE task_id = ANY(%s) AND status = 'SUCCESS' "
                    "UNION SELECT task_id FROM recovery_deadletter WHERE task_id = ANY(%s)",
                    (ids, ids))
        return {row[0] for row in cur.fetchall()}


def find_letters(conn: psycopg.Connection, message: Hostile) -> list[tuple]:
    like = f"%{message.marker}%"
    with conn.cursor() as cur:
        cur.execute(
            "SELECT task_id, kind, status, reason FROM recovery_deadletter "
            "WHERE task_id = %s OR raw_body LIKE %s OR args::text LIKE %s "
            "OR headers::text LIKE %s",
            (message.task_id or "", like, like, like))
        return cur.fetchall()


def effects(directory: Path) -> Counter:
    """(task id, replay, attempt, outcome) -> how many times a body ran to its end."""
    counts: Counter = Counter()
    for path in directory.glob("effects-*.jsonl"):
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # cannot happen with one O_APPEND write per line; never hide it
            counts[(str(entry["id"]), entry["replay"], entry["attempt"], entry["outcome"])] += 1
    return counts


def account(conn: psycopg.Connection, client: redis.Redis, submitted: list[Submitted],
            hostile: list[Hostile], spool: Path, effects_dir: Path,
            max_deliveries: int) -> Accounting:
    result = Accounting()
    ids = [s.task_id for s in submitted]
    with conn.cursor() as cur:
        cur.execute("SELECT task_id, status FROM django_celery_results_taskresult "
                    "WHERE task_id = ANY(%s)", (ids,))
        states = dict(cur.fetchall())
        cur.execute("SELECT task_id, kind, status, reason FROM recovery_deadletter "
                    "WHERE task_id = ANY(%s)", (ids,))
        letters = {row[0]: row[1:] for row in cur.fetchall()}
        cur.execute("SELECT count(*) FROM recovery_deadletter WHERE status = 'replaying'")
        replaying = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM recovery_dueretry")
        due = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM recovery_deadletter WHERE task_id = ANY(%s) "
                    "AND replay_count > 0", (ids,))
        replayed = cur.fetchone()[0]
    ran = effects(effects_dir)
    completed_ok = {task_id for (task_id, _, _, outcome) in ran if outcome == "ok"}
    capped = re.compile(r"delivered \d+ times")

    lost, both, innocent, by_cap, bad_permanent = [], [], [], [], []
    for task in submitted:
        succeeded = states.get(task.task_id) == "SUCCESS"
        letter = letters.get(task.task_id)
        if not succeeded and letter is None:
            lost.append(task)
        elif succeeded and letter is not None:
            both.append((task, letter))
        elif task.outcome == "permanent":
            if succeeded or letter[0] != "dependency" or letter[1] != "parked":
                if letter is not None and letter[0] == "poison" and capped.search(letter[2]):
                    by_cap.append((task, letter))
                else:
                    bad_permanent.append((task, letter))
        elif letter is not None:
            if letter[0] == "poison" and capped.search(letter[2]) \
                    and task.task_id not in completed_ok:
                by_cap.append((task, letter))
            else:
                innocent.append((task, letter))

    hostile_wrong = []
    for message in hostile:
        found = find_letters(conn, message)
        if len(found) != 1 or found[0][1] != "poison" \
                or not re.search(message.reason_pattern, found[0][3] or ""):
            hostile_wrong.append((message, found))

    duplicated = sum(count - 1 for count in ran.values() if count > 1)
    duplicated_tasks = len({task_id for (task_id, *_), count in ran.items() if count > 1})
    kinds = Counter(s.outcome for s in submitted)

    result.add("tasks submitted", len(submitted))
    for kind in ("plain", "transient", "permanent"):
        result.add(f"  of which {kind}", kinds[kind])
    result.add("body runs completed (side-effect log lines)", sum(ran.values()))
    result.add("lost (no SUCCESS result, no letter)", len(lost), 0)
    result.add("both succeeded and parked", len(both), 0)
    result.add("plain/transient tasks parked (not by the delivery cap)", len(innocent), 0)
    result.add(f"parked by the delivery cap (killed > {max_deliveries} times)", len(by_cap))
    result.add("permanent failures not parked once as 'dependency'", len(bad_permanent), 0)
    result.add("letters replayed by the operator during the storm", replayed)
    result.add("hostile messages sent", len(hostile))
    result.add("hostile messages not parked as poison with the right reason",
               len(hostile_wrong), 0)
    result.add("letters left 'replaying'", replaying, 0)
    result.add("spool records left (.json)", spool_files(spool, ".json"), 0)
    result.add("spool records quarantined (.bad)", spool_files(spool, ".bad"), 0)
    result.add("due-table rows left", due, 0)
    result.add("messages left on the broker (queued + unacked)", broker_backlog(client), 0)
    result.add("duplicated side effects (extra completed runs of one attempt)", duplicated)
    result.add("  tasks with a duplicated side effect", duplicated_tasks)

    def show(title: str, items: list, limit: int = 10) -> None:
        if items:
            result.details.append(f"{title} ({len(items)}; first {min(limit, len(items))}):")
            result.details.extend(f"  {item}" for item in items[:limit])

    show("duplicated side effects (task id, replay, attempt, outcome: runs)",
         [f"{key}: {count}" for key, count in ran.items() if count > 1])
    def runs(task_id: str) -> str:
        done = Counter(outcome for (tid, _, _, outcome), count in ran.items()
                       for _ in range(count) if tid == task_id)
        return "body ran: " + (", ".join(f"{o} x{n}" for o, n in sorted(done.items()))
                               or "never to its end")

    show("lost", [(t.task_id, t.outcome, runs(t.task_id)) for t in lost])
    show("both succeeded and parked", [(t.task_id, t.outcome, letter) for t, letter in both])
    show("innocent tasks parked", [(t.task_id, t.outcome, letter,
                                    "body returned" if t.task_id in completed_ok else "")
                                   for t, letter in innocent])
    show("parked by the delivery cap", [(t.task_id, t.outcome, letter) for t, letter in by_cap])
    show("permanent failures not parked once", [(t.task_id, states.get(t.task_id), letter)
                                                for t, letter in bad_permanent])
    for message, found in hostile_wrong:
        sent_id = str(message.headers.get("id"))
        runs = sum(count for (task_id, *_), count in ran.items() if task_id == sent_id)
        state = None
        if message.task_id:
            with conn.cursor() as cur:
                cur.execute("SELECT status FROM django_celery_results_taskresult "
                            "WHERE task_id = %s", (message.task_id,))
                row = cur.fetchone()
                state = row[0] if row else None
        result.details.append(
            f"hostile {message.label!r}: expected one poison letter with reason "
            f"/{message.reason_pattern}/, found {[(r[0][:60], r[1], r[2], r[3]) for r in found]}"
            f"; its body ran to the end {runs} time(s); result row: {state}")
    return result
