"""Watching and telling: Prometheus metrics, CloudWatch metrics, escalation (incidents,
webhook, mail), Sentry, the watchdog and the metrics view. Subscribes to
:mod:`recovery.events`; nothing below imports it.
"""
