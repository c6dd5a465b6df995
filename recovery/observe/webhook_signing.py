"""Standard Webhooks (https://www.standardwebhooks.com) signing for the escalation webhook,
and the rules a webhook must meet before anything is sent to it.

A message carries three headers: ``webhook-id`` (stable across retries: receivers
deduplicate on it), ``webhook-timestamp`` (Unix seconds of the attempt) and
``webhook-signature``: ``v1,`` + the base64 HMAC-SHA256 of ``"<id>.<timestamp>.<body>"``.
Any Standard Webhooks library verifies it, e.g. Python's
``standardwebhooks.Webhook(secret).verify(body, headers)``.

The secret is, per the specification, ``whsec_`` + base64 of random bytes (the key is the
decoded bytes); any other string is used as its UTF-8 bytes (a receiver then passes those
bytes: ``Webhook(secret.encode())``). Either way the key must hold at least 32 bytes, and the
URL must be ``https://`` outside DEBUG: the body names tasks, incidents and exception texts.
Nothing here ever puts the secret in a message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

__all__ = ["ID_HEADER", "TIMESTAMP_HEADER", "SIGNATURE_HEADER", "SECRET_PREFIX",
           "MIN_SECRET_BYTES", "GENERATE_SECRET", "secret_key", "sign", "headers", "verify",
           "problems"]

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 32
GENERATE_SECRET = ("python -c \"import base64, secrets; "
                   "print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\"")


def secret_key(secret: str) -> bytes:
    """The HMAC key of ``secret``; ``ValueError`` when a ``whsec_`` secret is not base64."""
    if secret.startswith(SECRET_PREFIX):
        encoded = secret[len(SECRET_PREFIX):]
        try:
            return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("WEBHOOK_SECRET starts with whsec_ but the rest is not base64 (it "
                             "must be whsec_ + base64 of at least 32 bytes)") from None
    return secret.encode("utf-8")


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value of one message."""
    signed = f"{message_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def headers(secret: str, message_id: str, body: bytes, *, now: float | None = None) -> dict:
    """The three Standard Webhooks headers of a message sent now."""
    stamp = int(time.time() if now is None else now)
    return {ID_HEADER: message_id, TIMESTAMP_HEADER: str(stamp),
            SIGNATURE_HEADER: sign(secret, message_id, stamp, body)}


def verify(secret: str, body: bytes, received: Mapping[str, str], *,
           tolerance_seconds: float = 300.0, now: float | None = None) -> bool:
    """The receiver's check: the body is ours, unchanged, and fresh (not replayed later).

    ``received`` are the request's headers, in any case. A ``webhook-signature`` may list
    several space-separated signatures (during a secret rotation); one match is enough.
    """
    lowered = {str(k).lower(): str(v) for k, v in received.items()}
    message_id, stamp = lowered.get(ID_HEADER), lowered.get(TIMESTAMP_HEADER)
    signatures = lowered.get(SIGNATURE_HEADER, "").split()
    if not (message_id and stamp and signatures):
        return False
    try:
        stamp_seconds = int(stamp)
        expected = sign(secret, message_id, stamp_seconds, body).encode("ascii")
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - stamp_seconds) > tolerance_seconds:
        return False
    return any(hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
               for candidate in signatures)


def problems(url: str | None, secret: str | None, *, debug: bool) -> list[tuple[str, str]]:
    """What stops a webhook from being sent, as (message, how to fix it); empty when fine."""
    found = []
    if url and str(url).lower().startswith("http://") and not debug:
        found.append((
            "RECOVERY['ESCALATION']['WEBHOOK_URL'] is http://: incidents (task names, exception "
            "texts) would cross the network in clear.",
            "Use an https:// URL (plain http:// is allowed only with DEBUG, for a local "
            "receiver)."))
    if url and secret is not None:
        try:
            size = len(secret_key(str(secret)))
        except ValueError as exc:
            found.append((f"RECOVERY['ESCALATION']['WEBHOOK_SECRET'] is invalid: {exc}.",
                          f"Generate one: {GENERATE_SECRET}"))
        else:
            if size < MIN_SECRET_BYTES:
                found.append((
                    f"RECOVERY['ESCALATION']['WEBHOOK_SECRET'] holds {size} bytes: a webhook "
                    f"secret needs at least {MIN_SECRET_BYTES} bytes to resist guessing.",
                    f"Generate one: {GENERATE_SECRET}, and give the receiver the same."))
    return found
