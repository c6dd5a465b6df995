"""Read-only Django admin for dead letters (inspection; actions come with the operator surface)."""

from __future__ import annotations

import json

from django.contrib import admin
from django.utils.html import format_html
from django.utils.safestring import mark_safe
from django.utils.timesince import timesince

from recovery.models import DeadLetter


def _pretty(value) -> str:
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, sort_keys=True, default=str))


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
    list_display = ("task_name", "status", "kind", "exception_type", "attempts", "replay_count",
                    "last_failed_at", "age")
    list_filter = ("status", "kind", "task_name", "last_failed_at")
    search_fields = ("=task_id", "task_name", "exception_message")
    date_hierarchy = "last_failed_at"
    show_full_result_count = False
    list_per_page = 50
    fieldsets = (
        (None, {"fields": ("task_id", "task_name", "status", "kind", "permanent", "reason",
                           "attempts", "replay_count", "queue", "worker",
                           "first_failed_at", "last_failed_at", "fingerprint")}),
        ("Exception", {"fields": ("exception_type", "exception_message", "traceback_pre")}),
        ("Payload", {"fields": ("args_pretty", "kwargs_pretty", "headers_pretty", "raw_body",
                                "content_type")}),
        ("Attempt history", {"fields": ("history_table",)}),
    )
    readonly_fields = tuple(
        f for section in fieldsets for f in section[1]["fields"]
    )

    @admin.display(description="age")
    def age(self, obj: DeadLetter) -> str:
        return timesince(obj.first_failed_at)

    @admin.display(description="traceback")
    def traceback_pre(self, obj: DeadLetter) -> str:
        return format_html("<pre>{}</pre>", obj.traceback)

    @admin.display(description="args")
    def args_pretty(self, obj: DeadLetter) -> str:
        return _pretty(obj.args)

    @admin.display(description="kwargs")
    def kwargs_pretty(self, obj: DeadLetter) -> str:
        return _pretty(obj.kwargs)

    @admin.display(description="headers")
    def headers_pretty(self, obj: DeadLetter) -> str:
        return _pretty(obj.headers)

    @admin.display(description="history")
    def history_table(self, obj: DeadLetter) -> str:
        rows = "".join(
            format_html("<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        e.get("attempt", ""), e.get("at", ""), e.get("kind", ""),
                        e.get("exception_type", ""), e.get("exception_message", ""),
                        "—" if e.get("delay_seconds") is None else f"{e['delay_seconds']:.2f}s")
            for e in obj.history or []
        )
        return format_html(
            "<table><thead><tr><th>#</th><th>at</th><th>kind</th><th>exception</th>"
            "<th>message</th><th>next delay</th></tr></thead><tbody>{}</tbody></table>",
            mark_safe(rows),  # each row was built by format_html above
        )

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
