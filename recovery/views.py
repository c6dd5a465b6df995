"""The Prometheus scrape endpoint for a Django project: ``path("metrics", metrics)``.

It serves the event counters (summed over every process sharing
``PROMETHEUS_MULTIPROC_DIR``, else this process's own) and the backlogs read from the
database at scrape time; see docs/metrics.md. Expose it only where Prometheus can reach it.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET

from . import metrics as recovery_metrics

__all__ = ["metrics"]


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition of the recovery metrics, database backlogs included."""
    body, content_type = recovery_metrics.exposition(database=True)
    return HttpResponse(body, content_type=content_type)
