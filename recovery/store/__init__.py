"""What recovery writes down: the tables, parking, the spool and the bookkeeping writes.

Parking a letter, the local spool that keeps it when PostgreSQL is down, deferred
writes, delivery counts, due retries, retention, export and import (to and from files
and Kafka topics). Imports only :mod:`recovery.core` and :mod:`recovery.events`; it
announces what it did through events and never calls metrics, escalation or workflows
directly.
"""
