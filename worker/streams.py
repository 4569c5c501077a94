"""Redis plumbing: the connection, consumer-group setup, reply shapes, paging.

Reply shapes differ between RESP2 and RESP3; they are normalised here and nowhere else.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, cast

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.keys import Keys

Entry = tuple[bytes, dict[bytes, bytes] | None]  # fields None: deleted from the stream
Command = tuple[bytes, ...]


class OutOfStepError(Exception):
    """The worker's windows no longer match the consumer group (a lost reply, a reset
    group, a lost lease, entries pending outside any batch): re-sync before going on."""


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


def read_group(keys: Keys, consumer: str, count: int, block_ms: int | None) -> Command:
    """XREADGROUP of up to ``count`` new entries for ``consumer``, waiting up to
    ``block_ms`` for one (None: not at all), to send on a :class:`Wire`."""
    return read_groups(keys.group, consumer, [keys.input], count, block_ms)


def read_groups(
    group: str, consumer: str, inputs: Sequence[str], count: int, block_ms: int | None
) -> Command:
    """:func:`read_group` on several streams at once (one server's, or one slot's in a
    cluster): up to ``count`` entries from each, and a blocked read returns once any
    of them has one."""
    block = () if block_ms is None else (b"BLOCK", b"%d" % block_ms)
    return (b"XREADGROUP", b"GROUP", group.encode(), consumer.encode(), b"COUNT",
            b"%d" % count, *block, b"STREAMS", *(name.encode() for name in inputs),
            *(b">" for _ in inputs))  # fmt: skip


def _entry(raw: Any) -> Entry:
    entry_id, flat = raw
    if flat is None:
        return entry_id, None
    pairs = iter(flat)
    return entry_id, dict(zip(pairs, pairs, strict=True))


def range_entries(reply: Any) -> list[Entry]:
    """The entries of an XRANGE reply read straight off a connection (a :class:`Wire`)."""
    return [_entry(raw) for raw in reply or ()]


def read_entries(reply: Any) -> list[Entry]:
    """The entries of an XREADGROUP reply for one stream read straight off a connection:
    ``[[stream, entries]]`` in RESP2, ``{stream: entries}`` in RESP3, nil when none came."""
    if not reply:
        return []
    (raw,) = reply.values() if isinstance(reply, dict) else (reply[0][1],)
    return range_entries(raw)


def read_streams(reply: Any) -> dict[bytes, list[Entry]]:
    """The entries of an XREADGROUP reply for several streams read straight off a
    connection, by stream name: only the streams that had some."""
    if not reply:
        return {}
    pairs = reply.items() if isinstance(reply, dict) else reply
    return {name: range_entries(raw) for name, raw in pairs}


def xadd(key: str, *, maxlen: int | None) -> Command:
    """The head of an XADD to ``key``, capped at about ``maxlen`` entries when given;
    the fields follow it."""
    cap = () if maxlen is None else (b"MAXLEN", b"~", b"%d" % maxlen)
    return (b"XADD", key.encode(), *cap, b"*")


def pages(
    client: redis.Redis,
    key: str,
    *,
    first: bytes = b"-",
    last: bytes = b"+",
    count: int = 10_000,
    newest_first: bool = False,
) -> Iterator[list[Entry]]:
    """The stream's entries from ``first`` to ``last`` (XRANGE bounds: an id, ``(id``
    to leave it out, ``-`` or ``+``), ``count`` at a time, oldest first; with
    ``newest_first``, from ``last`` back to ``first``."""
    while True:
        if newest_first:
            page = cast(list[Entry], client.xrevrange(key, max=last, min=first, count=count))
        else:
            page = cast(list[Entry], client.xrange(key, min=first, max=last, count=count))
        if not page:
            return
        yield page
        if newest_first:
            last = b"(" + page[-1][0]
        else:
            first = b"(" + page[-1][0]


def _pack(command: Command) -> bytes:
    # hiredis's stub names a one-element tuple where it takes any length.
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


class Wire:
    """One connection on which commands are sent now and their replies read later, in
    the order sent.

    hiredis packs every command in C and the replies are read straight off the
    connection, which is 2-3x faster than redis-py's pipeline with its per-command
    Python bookkeeping. The worker sends the next read before it forecasts the batch in
    hand, and reads a transaction's reply during the next batch, so that Redis works
    while the model does. Any error drops the connection, so nothing half-read is left
    on it; the next send takes a new one.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._conn: Any = None
        self._sent: deque[int] = deque()  # replies due, per send, oldest first

    @property
    def waiting(self) -> int:
        """Sends whose replies are not read yet."""
        return len(self._sent)

    def send(self, commands: Sequence[Command]) -> None:
        if self._conn is None:
            self._conn = self._pool.get_connection()
        try:
            self._conn.send_packed_command(
                [b"".join(_pack(c) for c in commands)], check_health=False
            )
        except BaseException:
            self.drop()
            raise
        self._sent.append(len(commands))

    def receive(self) -> list[Any]:
        """The replies to the oldest send not read yet; an error reply is returned in
        its place as a ResponseError, not raised."""
        due = self._sent.popleft()
        replies: list[Any] = []
        try:
            for _ in range(due):
                try:
                    replies.append(self._conn.read_response())
                except redis.ResponseError as e:
                    replies.append(e)
        except BaseException:
            self.drop()
            raise
        return replies

    def drop(self) -> None:
        """Disconnect, forgetting every reply still due."""
        self._sent.clear()
        if self._conn is not None:
            self._conn.disconnect()
            self._pool.release(self._conn)
            self._conn = None

    def close(self) -> None:
        """Give the connection back to the pool (dropped if replies are still due)."""
        if self._sent:
            self.drop()
        elif self._conn is not None:
            self._pool.release(self._conn)
            self._conn = None


def _exchange(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    """Send the commands in one write and read one reply each (see :class:`Wire`)."""
    wire = Wire(client)
    try:
        wire.send(commands)
        return wire.receive()
    finally:
        wire.close()


def raise_first_error(replies: Sequence[Any]) -> None:
    for reply in replies:
        if isinstance(reply, redis.ResponseError):
            raise reply


def round_trip(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    """The commands in one round trip, not atomic; their replies (the first error is
    raised, after every reply was read)."""
    replies = _exchange(client, commands)
    raise_first_error(replies)
    return replies


def multi_exec(commands: Sequence[Command]) -> list[Command]:
    """The commands wrapped in MULTI and EXEC; :func:`executed` reads the replies."""
    return [(b"MULTI",), *commands, (b"EXEC",)]


def executed(replies: Sequence[Any]) -> list[Any]:
    """The EXEC reply of a :func:`multi_exec`'s replies. A command refused at queue
    time aborts the EXEC; either way the first error is raised."""
    raise_first_error(replies[:-1])  # +OK for MULTI, +QUEUED for each command
    result = replies[-1]
    if isinstance(result, redis.ResponseError):
        raise result
    raise_first_error(result)
    return cast(list[Any], result)


def transaction(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    """MULTI, the commands, EXEC, in one round trip; the EXEC reply."""
    return executed(_exchange(client, multi_exec(commands)))


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
