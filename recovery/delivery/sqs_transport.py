"""kombu's SQS transport, with the one repair a worker needs to outlive a network blip.

kombu 5.7's asynchronous ``ReceiveMessage`` reads a timed-out request (curl's 599: the
endpoint refused or dropped the connection) or a 5xx answer as an empty *list*, which
``Channel._on_messages_ready`` then reads as a dict: ``AttributeError: 'list' object has
no attribute 'get'`` escapes the event loop and the worker stops ("Unrecoverable error")
at the first unanswered poll. Here such an answer is what kombu meant it to be: no
messages this time, and the queue is polled again after ``polling_interval``.

``recovery.setup`` selects this transport for ``sqs://`` URLs
(:mod:`recovery.delivery.topology`) unless the project named a ``broker_transport`` of
its own. Imported by name only when the broker is SQS: kombu's SQS transport needs boto3.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import SQS

__all__ = ["Channel", "Transport"]


class Channel(SQS.Channel):
    """kombu's SQS channel; an unanswered receive is an empty one."""

    def _on_messages_ready(self, queue: Any, qname: Any, messages: Any) -> int:
        if not isinstance(messages, dict):
            return 0
        return super()._on_messages_ready(queue, qname, messages)


class Transport(SQS.Transport):
    """kombu's SQS transport with :class:`Channel`."""

    Channel = Channel
