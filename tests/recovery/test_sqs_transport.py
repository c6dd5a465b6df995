"""recovery.delivery.sqs_transport against moto's SQS server: an unanswered poll is an
empty one, not the end of the worker."""

from __future__ import annotations

from kombu import Connection

from recovery.delivery import topology
from recovery.delivery.sqs_transport import Channel
from recovery.delivery.visibility import is_sqs_channel, missing_internals


def test_an_unanswered_receive_is_read_as_no_messages(sqs_url):
    with Connection(sqs_url, transport=topology.SQS_TRANSPORT,
                    transport_options=topology.sqs_transport_options(sqs_url)) as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        url = channel._new_queue("unanswered")
        # kombu's asynchronous client answers a timed-out or 5xx ReceiveMessage with []
        assert channel._on_messages_ready(url, "unanswered", []) == 0
        assert channel._on_messages_ready(url, "unanswered", {"Messages": []}) == 0
        # and the channel is still SQS's for the visibility extension
        assert is_sqs_channel(channel) and is_sqs_channel(Channel)
        assert missing_internals(channel) is None
