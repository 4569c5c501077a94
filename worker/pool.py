"""Which partitions this worker serves: its fair share of P among the workers in the pool.

Every worker announces itself in the pool with its lease renewals (``attnlstm_pool``,
one sorted set per stream and group) and works out its share from the tokens of those
in it, in sorted order: P // N each, and one more for the first P mod N. A worker over
its share gives partitions back, saving their windows first; one under it takes free
ones, whose leases were given back or lapsed (a worker that died). Partitions change
hands only through their fenced leases (:mod:`worker.lease`), so there are never two
owners at once, whatever each worker thinks of the pool for a while.

One partition (the default) has no pool: its worker holds the one lease, and any other
waits as a hot standby, as before partitions existed.
"""

from __future__ import annotations

import time
import zlib
from typing import cast

import redis

from worker.keys import Keys
from worker.lease import VERSION
from worker.streams import as_str, stream_info


class PartitionsError(ValueError):
    """The streams were written with another number of partitions than this worker's."""


class Pool:
    def __init__(
        self, client: redis.Redis, keys: Keys, *, token: str, ttl_ms: int, partitions: int
    ) -> None:
        self.client, self.keys, self.token = client, keys, token
        self.ttl_ms, self.partitions = ttl_ms, partitions
        self._announce_at = 0.0  # when this worker's entry needs renewing

    def check_partitions(self, *, running: bool) -> int:
        """PartitionsError unless the input is written in this worker's P partitions (the
        first worker with P > 1 marks it so; P = 1 leaves it unmarked on one server,
        where its stream is untagged, and marks it on a Redis Cluster, where its stream
        is sensors{0}, the first of P > 1's too). How many entries the unpartitioned
        stream holds (:meth:`strays`).

        Entries there refuse a start before these partitions were ever served: data
        written before partitions. Once they were (by this ``running`` worker, or a lease
        of theirs ever taken), a producer that ignores P wrote them, and the pool serves
        on: refused, a producer's one stray entry stopped every worker at its next
        re-sync, and each restart after."""
        count, first = self.partitions, self.keys.partition(0, self.partitions).input
        if self.keys.cluster and count == 1:
            self.client.set(self.keys.partitions, 1, nx=True)
        strays = self.strays()
        if strays and not running and not self._served():
            where = "a Redis Cluster, " if self.keys.cluster else ""
            raise PartitionsError(
                f"stream {self.keys.input} holds entries written with one partition on one "
                f"server; this worker reads {where}{count} partition(s) ({first} ..): P is "
                f"fixed for a deployment's life. {_START_OVER}"
            )
        self.check_mark()
        return strays

    def check_mark(self) -> None:
        """PartitionsError unless the partitions mark says this worker's P; the mark is
        written where it is gone (P > 1, or a Redis Cluster)."""
        count = self.partitions
        mark = _count(
            self.keys,
            self.client.fcall("attnlstm_partitions", 1, self.keys.partitions, VERSION, count),
        )
        if mark != count:
            raise _another(self.keys, mark, count, "this worker reads")

    def strays(self) -> int:
        """How many entries the unpartitioned input stream holds, which no worker reads
        while the input is partitioned (0 with P = 1 on one server: it is the input)."""
        if self.keys.partition(0, self.partitions).input == self.keys.input:
            return 0
        info = stream_info(self.client, self.keys.input)  # XINFO: the worker's ACL has no XLEN
        return 0 if info is None else int(info["length"])

    def _served(self) -> bool:
        """Whether a worker ever took the lease of one of these partitions (its fence
        number stays): one round trip, per node on a Redis Cluster."""
        pipe = self.client.pipeline(transaction=False)
        for k in range(self.partitions):  # GET: the worker's ACL has no EXISTS on them
            pipe.get(self.keys.partition(k, self.partitions).fence)
        return any(fence is not None for fence in pipe.execute())

    def share(self) -> int:
        """Announce this worker; how many partitions it should serve now."""
        if self.partitions == 1:
            return 1
        members = sorted(map(as_str, self._call(self.ttl_ms)))
        self._announce_at = time.monotonic() + self.ttl_ms / 3000
        if self.token not in members:  # announced just now, so only a clock jump
            members = sorted([*members, self.token])
        rank = members.index(self.token)
        base, extra = divmod(self.partitions, len(members))
        return base + (rank < extra)

    def stay(self) -> None:
        """This worker announced again when a third of its entry's life has passed since
        it was: through a long re-sync too, where no share is asked. Its entry lapsed
        there, and the others counted one worker fewer and took its share."""
        if self.partitions > 1 and time.monotonic() >= self._announce_at:
            self.share()

    def leave(self) -> None:
        if self.partitions > 1:
            self._call(0)

    def candidates(self, held: set[int]) -> list[int]:
        """The partitions this worker does not hold, in an order of its own (workers
        starting together try different ones first)."""
        start = zlib.crc32(self.token.encode()) % self.partitions
        order = [(start + i) % self.partitions for i in range(self.partitions)]
        return [k for k in order if k not in held]

    def holders(self, partitions: list[int]) -> list[str | None]:
        """The token that holds each one's lease (None: free), in one round trip (per
        node on a Redis Cluster): a lease is taken only where it is free, since a round
        trip and a fresh lane for each held one cost a turn of P = 1024 221 ms."""
        pipe = self.client.pipeline(transaction=False)
        for k in partitions:
            pipe.get(self.keys.partition(k, self.partitions).lease)
        return [None if holder is None else as_str(holder) for holder in pipe.execute()]

    def _call(self, ttl_ms: int) -> list[bytes | str]:
        reply: list[bytes | str] = self.client.fcall(
            "attnlstm_pool", 1, self.keys.pool, VERSION, self.token, ttl_ms
        )
        return reply


def mark_partitions(client: redis.Redis, keys: Keys, partitions: int) -> None:
    """A producer's check before it writes ``partitions`` streams: PartitionsError when
    the mark says another number; the first with P > 1 sets it, and on a Redis Cluster
    the first with any P (see :meth:`Pool.check_partitions`)."""
    if partitions > 1 or keys.cluster:
        client.set(keys.partitions, partitions, nx=True)
    mark = client.get(keys.partitions)
    if (written := _count(keys, mark) if mark else 1) != partitions:
        raise _another(keys, written, partitions, "this writes")


# What to do instead, after "P is fixed for a deployment's life".
_START_OVER = (
    "Set --partitions (ATTNLSTM_PARTITIONS) to what the streams were written with, or start a new "
    "deployment: other stream names (ATTNLSTM_INPUT_STREAM and the rest), or the old "
    "streams, their partitions mark and the workers' state keys deleted"
)


def _count(keys: Keys, mark: object) -> int:
    """The partitions' mark as a count; a PartitionsError naming the key where it holds
    none (it was "invalid literal for int() with base 10: b'x'")."""
    try:
        return int(cast(bytes, mark))
    except (TypeError, ValueError):
        raise PartitionsError(
            f"{keys.partitions} holds {mark!r}, no number of partitions: something else "
            f"wrote it. {_START_OVER}"
        ) from None


def _another(keys: Keys, written: int, count: int, who: str) -> PartitionsError:
    return PartitionsError(
        f"the streams of {keys.input} are written in {written} partitions "
        f"({keys.partitions}); {who} {count}: P is fixed for a deployment's life. {_START_OVER}"
    )
