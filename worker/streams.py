"""Redis plumbing: the connection, consumer-group setup, reply shapes, the lease.

Reply shapes differ between RESP2 and RESP3; they are normalised here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.keys import Keys

Entry = tuple[bytes, dict[bytes, bytes] | None]  # fields None: deleted from the stream
Command = tuple[bytes, ...]


def connect(url: str, *, socket_timeout_s: float, client_name: str) -> redis.Redis:
    """A client that never retries behind our back.

    redis-py retries a command silently after a connection error; for XREADGROUP ``>``
    that hands the first reply's entries to this consumer and throws them away. The
    worker handles every connection error itself and then re-syncs with the group.
    """
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=min(socket_timeout_s, 5.0),
        retry=Retry(NoBackoff(), 0),
        client_name=client_name,
    )


def id_key(entry_id: bytes) -> tuple[int, int]:
    """An entry id as a tuple that sorts like the stream."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def entries_of(reply: Any) -> list[Entry]:
    """The entries of an XREAD/XREADGROUP reply for one stream, RESP2 or RESP3."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {stream: [[entries]]}
        (value,) = reply.values()
        return list(value[0]) if value and isinstance(value[0], list) else list(value)
    return list(reply[0][1])  # RESP2: [[stream, [entries]]]


def stream_range(
    client: redis.Redis, key: str, *, after: bytes, upto: bytes, count: int
) -> list[Entry]:
    """Entries with ids in (after, upto], oldest first."""
    return cast(list[Entry], client.xrange(key, min=b"(" + after, max=upto, count=count))


def pending_deliveries(client: redis.Redis, keys: Keys, consumer: str) -> dict[bytes, int]:
    """Every entry pending on ``consumer``, with how often it has been delivered."""
    deliveries: dict[bytes, int] = {}
    start = b"-"
    while True:
        page: list[dict[str, Any]] = client.xpending_range(
            keys.input, keys.group, min=start, max="+", count=1000, consumername=consumer
        )
        if not page:
            return deliveries
        for item in page:
            deliveries[item["message_id"]] = int(item["times_delivered"])
        start = b"(" + page[-1]["message_id"]


def _pack(command: Command) -> bytes:
    # hiredis's stub names a one-element tuple where it takes any length.
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


def _exchange(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    """Send the commands in one write and read one reply each; an error reply is
    returned in its place as a ResponseError, not raised.

    hiredis packs every command in C and the replies are read straight off the
    connection, which is 2-3x faster than redis-py's pipeline with its per-command
    Python bookkeeping. Any other error drops the connection, so nothing half-read is
    left on it for the next command.
    """
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command(  # type: ignore[no-untyped-call]
            [b"".join(_pack(c) for c in commands)], check_health=False
        )
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as e:
                replies.append(e)
        return replies
    except BaseException:
        conn.disconnect()  # type: ignore[no-untyped-call]
        raise
    finally:
        pool.release(conn)


def _raise_first_error(replies: Sequence[Any]) -> None:
    for reply in replies:
        if isinstance(reply, redis.ResponseError):
            raise reply


def pipeline(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    """The commands in one round trip, not atomic; their replies (the first error is
    raised, after every reply was read)."""
    replies = _exchange(client, commands)
    _raise_first_error(replies)
    return replies


def transaction(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    """MULTI, the commands, EXEC, in one round trip; the EXEC reply.

    The hot path: a batch's forecasts, dead letters and acks. A command refused at
    queue time aborts the EXEC; either way the first error is raised.
    """
    replies = _exchange(client, [(b"MULTI",), *commands, (b"EXEC",)])
    _raise_first_error(replies[:-1])  # +OK for MULTI, +QUEUED for each command
    executed = replies[-1]
    if isinstance(executed, redis.ResponseError):
        raise executed
    _raise_first_error(executed)
    return cast(list[Any], executed)


def ensure_group(client: redis.Redis, keys: Keys) -> bool:
    """Create the group from the start of the stream (and the stream) if missing.
    True when it was created."""
    try:
        client.xgroup_create(keys.input, keys.group, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" in str(e):
            return False
        raise
    return True


def group_info(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    groups: list[dict[str, Any]] = client.xinfo_groups(keys.input)
    for info in groups:
        name = info["name"]
        if (name.decode() if isinstance(name, bytes) else name) == keys.group:
            return info
    raise redis.ResponseError(f"NOGROUP no group {keys.group!r} on stream {keys.input!r}")


# Take the lease if it is free or already ours, and extend it; answer who holds it.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return holder
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """One worker per input stream and group: the windows must see every entry."""

    def __init__(self, client: redis.Redis, *, key: str, owner: str, ttl_ms: int) -> None:
        self.key, self.owner, self.ttl_ms = key, owner, ttl_ms
        self._take = client.register_script(_LEASE)
        self._release = client.register_script(_RELEASE)

    def acquire(self) -> str:
        """Take or renew the lease; returns the holder (ours when it equals ``owner``)."""
        holder = self._take(keys=[self.key], args=[self.owner, self.ttl_ms])
        return holder.decode() if isinstance(holder, bytes) else str(holder)

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.owner])
