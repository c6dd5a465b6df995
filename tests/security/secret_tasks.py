"""Tasks whose exceptions quote their secret arguments, as real code often does.

Imported by the security tests (so the web process knows their signatures) and by the
worker they start (``-I tests.security.secret_tasks``).
"""

from __future__ import annotations

from celery import shared_task

from recovery import PermanentError, RecoveryTask


class Declined(PermanentError):
    """A card processor's refusal that names the card token it refused."""


@shared_task(base=RecoveryTask, bind=True, name="tests.security.secret_tasks.charge_card")
def charge_card(self, order_id: int, card_token: str, billing: dict | None = None,
                **extra) -> None:
    kw_token = extra.get("card_token_kw", "")
    nested = (billing or {}).get("card_token", "")
    raise Declined(f"token {card_token} declined (kw {kw_token}, nested {nested})")


def cached_charge(order_id: int, card_token: str, **_ignored) -> dict:
    """The fallback of :func:`charge_with_fallback`: the charge is queued for later."""
    return {"order_id": order_id, "queued": True}


@shared_task(base=RecoveryTask, bind=True, name="tests.security.secret_tasks.charge_with_fallback",
             fallback=cached_charge)
def charge_with_fallback(self, order_id: int, card_token: str) -> None:
    raise Declined(f"token {card_token} declined")
