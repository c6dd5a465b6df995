"""Pure decisions: what a failure is and what to do about it.

Errors, failure kinds, classification, backoff, retry policies, fingerprints, message
headers, bounds and redaction. Nothing here touches the database or a worker, so every
module can be tested without either. Imports nothing of ours but :mod:`recovery.conf`.
"""
