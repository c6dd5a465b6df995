"""Take a message off a Redis queue and record it as held in one step (Redis transport).

kombu's Redis transport takes a message with ``BRPOP`` and only then, in a second round
trip, records it in the ``unacked`` hash that brings it back if its worker dies. A worker
killed between the two (SIGKILL, the OOM killer, a node that goes away) takes the message
with it: it is on no list, in no hash, and no visibility timeout ever brings it back
(kombu#305; the chaos suite lost a task this way once in two runs when it SIGKILLs a
whole worker). Here one Lua script pops the message *and* records it in ``unacked`` and
``unacked_index``, atomically: whatever happens to the worker afterwards, the message is
either still queued or held, and kombu's own ``restore_visible`` returns it.

A script cannot block, so an empty poll is followed by a blocking wait that takes
nothing: ``BLMOVE q q RIGHT RIGHT`` on the first queue's main list returns as soon as it
holds a message and leaves it in place (a no-op move, Redis 6.2+), then the script runs
again. Priority lists and further queues are not waited on: with one queue an idle
worker sees a prioritized message within ``brpop_timeout`` (1 s, as before: kombu polls
that often); with several queues the wait is cut to a quarter second.

An envelope the script cannot read as kombu's JSON (someone ``LPUSH``ed something else)
is moved, unread, to the list ``recovery.malformed`` and logged: nothing is lost, and the
worker does not stop on it.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from ..core.names import logger_for

__all__ = ["MALFORMED_LIST", "ReliableChannel", "install", "installed"]

logger = logger_for(__name__)

#: Where an envelope that is not kombu's JSON goes, untouched.
MALFORMED_LIST = "recovery.malformed"
#: The wait of a worker consuming several queues, which watches only the first.
MULTI_QUEUE_WAIT_SECONDS = 0.25

# KEYS[1] unacked hash, KEYS[2] unacked index, KEYS[3] malformed list, KEYS[4..] the
# lists to take from, in kombu's order. ARGV[1] the time to record.
_TAKE = """
for i = 4, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, payload = pcall(cjson.decode, item)
    local props = ok and type(payload) == 'table' and payload['properties']
    local info = type(props) == 'table' and props['delivery_info']
    local tag = type(props) == 'table' and props['delivery_tag']
    if type(info) ~= 'table' or type(tag) ~= 'string' or tag == '' then
      redis.call('LPUSH', KEYS[3], item)
      return {KEYS[i], item, 'malformed'}
    end
    local exchange = info['exchange']
    local routing_key = info['routing_key']
    if type(exchange) ~= 'string' then exchange = '' end
    if type(routing_key) ~= 'string' then routing_key = '' end
    redis.call('ZADD', KEYS[2], ARGV[1], tag)
    redis.call('HSET', KEYS[1], tag,
               '[' .. item .. ', ' .. cjson.encode(exchange) .. ', '
               .. cjson.encode(routing_key) .. ']')
    return {KEYS[i], item, tag}
  end
end
return false
"""


#: The script's SHA1: a poll sends ``EVALSHA`` (40 bytes) rather than the script, which
#: Redis would otherwise receive and hash again for every message.
_TAKE_SHA = hashlib.sha1(_TAKE.encode()).hexdigest()


class ReliableQoS(kombu_redis.QoS):
    """kombu's QoS, minus the second write for a message the script recorded already."""

    def append(self, message: Any, delivery_tag: str) -> None:
        recorded = getattr(self.channel, "_recovery_recorded", None)
        if recorded is not None and delivery_tag in recorded:
            recorded.discard(delivery_tag)
            return virtual.QoS.append(self, message, delivery_tag)
        return super().append(message, delivery_tag)


class ReliableChannel(kombu_redis.Channel):
    """kombu's Redis channel, whose poll takes and records a message atomically."""

    QoS = ReliableQoS
    #: Whether the next poll is the blocking wait (after a poll that found nothing).
    _recovery_wait_next = False
    #: Set when the server has no BLMOVE (Redis before 6.2): kombu's own BRPOP then.
    _recovery_unsupported = False
    #: Whether the command in flight is the wait (its reply is read as BLMOVE's).
    _recovery_waiting = False
    #: Whether the server holds the script (by its SHA1): until a reply says so, and after
    #: a NOSCRIPT (a restarted or flushed server), the next poll sends it whole.
    _recovery_script_cached = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._recovery_recorded: set[str] = set()
        super().__init__(*args, **kwargs)

    def _prefixed(self, key: str) -> str:
        return f"{self.global_keyprefix}{key}" if self.global_keyprefix else key

    def _brpop_start(self, timeout: float | None = None) -> None:
        if self._recovery_unsupported:
            return super()._brpop_start(timeout)
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        self._in_poll = self.client.connection
        self._brpop_sent_at = kombu_redis.monotonic()
        if self._recovery_wait_next:
            first = self._prefixed(self._q_for_pri(queues[0], 0))
            wait = timeout or 0
            if len(queues) > 1:
                wait = min(wait or MULTI_QUEUE_WAIT_SECONDS, MULTI_QUEUE_WAIT_SECONDS)
            self._recovery_waiting = True
            self.client.connection.send_command("BLMOVE", first, first, "RIGHT", "RIGHT", wait)
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        fixed = [self.unacked_key, self.unacked_index_key, MALFORMED_LIST]
        all_keys = [self._prefixed(key) for key in fixed + keys]
        self._recovery_waiting = False
        script = ("EVALSHA", _TAKE_SHA) if self._recovery_script_cached else ("EVAL", _TAKE)
        self.client.connection.send_command(
            *script, len(all_keys), *all_keys, repr(kombu_redis.time()))

    def _brpop_read(self, **options: Any) -> bool:
        if self._recovery_unsupported:
            return super()._brpop_read(**options)
        waited = self._recovery_waiting
        try:
            try:
                reply = self.client.parse_response(
                    self.client.connection, "BLMOVE" if waited else "EVAL", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except kombu_redis.redis.ResponseError as exc:
                if not waited and isinstance(exc, kombu_redis.redis.exceptions.NoScriptError):
                    # The server lost its script cache (a restart, SCRIPT FLUSH): the script
                    # did not run and took nothing. The next poll sends it whole.
                    self._recovery_script_cached = False
                    raise kombu_redis.Empty() from exc
                # Redis before 6.2 (no BLMOVE), or scripting disabled: kombu's way, loudly.
                self._recovery_unsupported = True
                logger.critical("recovery: this Redis server cannot take a message and record "
                                "it in one step (%s); falling back to kombu's BRPOP, which "
                                "loses the message a worker held if it is killed between "
                                "taking and recording it. Use Redis 6.2 or later.", exc)
                raise kombu_redis.Empty() from exc
            if not waited:
                self._recovery_script_cached = True
            if waited:
                # Something may be queued now (or the wait timed out): take next.
                self._recovery_wait_next = False
                raise kombu_redis.Empty()
            if not reply:
                self._recovery_wait_next = True
                raise kombu_redis.Empty()
            key, item, tag = (bytes_to_str(part) for part in reply)
            key = key[len(self.global_keyprefix or ""):]
            dest = key.rsplit(self.sep, 1)[0]
            if tag == "malformed":
                logger.error("recovery: a message on Redis list %r is not a kombu message; "
                             "moved unread to the list %r: %.200r", key, MALFORMED_LIST, item)
                raise kombu_redis.Empty()
            self._queue_cycle.rotate(dest)
            self._recovery_recorded.add(tag)
            try:
                self.connection._deliver(loads(item), dest)
            finally:
                # Delivered (the QoS took the tag out) or not (no consumer for ``dest``):
                # either way the tag must not linger.
                self._recovery_recorded.discard(tag)
            return True
        finally:
            self._in_poll = None
            self._recovery_waiting = False
            self._flush_brpop_reauth()


def installed() -> bool:
    return kombu_redis.Transport.Channel is ReliableChannel


def install() -> None:
    """Make kombu's Redis transport take messages this way, in this process. Called in
    the worker (``worker_init``): only a consumer's poll changes, publishing does not."""
    if not installed():
        kombu_redis.Transport.Channel = ReliableChannel
        logger.info("recovery: Redis messages are taken and recorded as held in one step")
