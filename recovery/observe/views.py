"""The Prometheus scrape endpoint for a Django project: ``path("metrics", metrics)``.

It serves the event counters (summed over every process sharing
``PROMETHEUS_MULTIPROC_DIR``, else this process's own) and the backlogs read from the
database at scrape time; see docs/metrics.md.

It is not public: the backlogs tell an outsider how the business is failing, and each scrape
costs database queries. A request is answered only with ``Authorization: Bearer
<RECOVERY["METRICS_TOKEN"]>`` (compared in constant time) or from an address in
``RECOVERY["METRICS_ALLOWED_IPS"]`` (by default loopback only); anyone else gets a 403 that
says which setting would let them in. The address is ``REMOTE_ADDR``, never a
``X-Forwarded-For`` a client can write: behind a proxy, use the token.
"""

from __future__ import annotations

import hmac
import ipaddress

from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from django.views.decorators.http import require_GET

from .. import conf
from . import backlogs

__all__ = ["metrics", "scrape_allowed"]

_DENIED = ("Forbidden: /metrics answers only with 'Authorization: Bearer <token>' matching "
           "RECOVERY['METRICS_TOKEN'], or from an address in RECOVERY['METRICS_ALLOWED_IPS'] "
           "(default: loopback only). See docs/metrics.md.\n")


def _token_matches(request: HttpRequest) -> bool:
    token = conf.get("METRICS_TOKEN")
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if not token or scheme.lower() != "bearer" or not presented:
        return False
    return hmac.compare_digest(presented.strip().encode("utf-8"), str(token).encode("utf-8"))


def _address_allowed(request: HttpRequest) -> bool:
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR") or "")
    except ValueError:
        return False
    for network in conf.get("METRICS_ALLOWED_IPS") or ():
        try:
            if address in ipaddress.ip_network(network, strict=False):
                return True
        except (TypeError, ValueError):  # reported by the system check (recovery.E025)
            continue
    return False


def scrape_allowed(request: HttpRequest) -> bool:
    """Whether ``request`` may read the metrics: the bearer token, or an allowed address."""
    return _token_matches(request) or _address_allowed(request)


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition of the recovery metrics, database backlogs included."""
    if not scrape_allowed(request):
        return HttpResponseForbidden(_DENIED, content_type="text/plain; charset=utf-8")
    body, content_type = backlogs.exposition()
    return HttpResponse(body, content_type=content_type)
