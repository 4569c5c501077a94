"""The read-ahead pipeline: the worker's reads and batch publishes on one connection,
sent early and answered late, so that Redis works while the model does.

While the loop forecasts a batch, Redis answers the read for the next one (a read that
cannot block: Redis runs nothing more from a connection while a read on it is blocked)
and applies the publish of the batch before. What the loop calls:

- :meth:`Pipeline.serve`: the partitions to read (their input streams, one read for
  all of them);
- :meth:`Pipeline.next_batch`: the entries read ahead, or else a read that waits for
  one; then more, until the batch is full or ``max_wait_ms`` has passed;
- :meth:`Pipeline.read_ahead`: ask for the batch after this one now;
- :meth:`Pipeline.publish`: send this batch's fenced calls (one per partition: its
  forecasts, dead letters and acks, in one atomic step); their replies are read while
  the next batch is worked on, and :meth:`Pipeline.drain` reads them at once. A refused
  call (another worker holds that partition's lease) raises FencedError there.

Every read also fetches, per partition, the first entry of the stream after the last
one the windows saw, so that a read that skips entries (a lost reply, a reset group) is
caught, and the ``models`` events not seen yet: a promotion or a rollback counts from
the batch it arrives with, so every entry added after it is forecast by the model it
names.

On one server all of this is one write and one XREADGROUP for every partition, which
may block. On a Redis Cluster each command goes to its partition's node
(:class:`worker.streams.Wires`), each partition has its own XREADGROUP (one command's
keys must share a slot), and none blocks: a read that found nothing is asked again
every ``CLUSTER_POLL_S`` until ``block_ms`` has passed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from worker.batch import BatchWindow, Receipt
from worker.keys import Keys
from worker.lease import fenced
from worker.settings import Settings
from worker.streams import (
    REDIS_ERRORS,
    Command,
    Entry,
    OutOfStepError,
    Wires,
    cluster_of,
    raise_first_error,
    range_entries,
    read_groups,
    read_streams,
)

Positions = dict[int, bytes]  # per partition, the last entry read (or handled) so far
CLUSTER_POLL_S = 0.01  # on a cluster, how often a read that found nothing asks again


@dataclass
class Read:
    entries: dict[int, list[Entry]] = field(default_factory=dict)  # per partition, if any
    events: list[Entry] = field(default_factory=list)  # of the models stream, not seen yet

    @property
    def count(self) -> int:
        return sum(map(len, self.entries.values()))

    def last(self, after: Positions) -> Positions:
        """Per partition, the last entry of this read, or else ``after``'s."""
        return after | {k: entries[-1][0] for k, entries in self.entries.items()}

    def extend(self, more: Read) -> None:
        for k, entries in more.entries.items():
            self.entries.setdefault(k, []).extend(entries)
        self.events += more.events


@dataclass(frozen=True)
class _Sent:
    """A publish whose replies are still to be read."""

    receipts: list[Receipt]  # one per call sent
    sent_ms: float  # when it went out: its forecasts' publish time, for the latency


class Pipeline:
    def __init__(
        self,
        client: redis.Redis,
        *,
        settings: Settings,
        events_query: Callable[[bytes | None], Command],
        on_applied: Callable[[Receipt, float], None],
    ) -> None:
        """``events_query(after)``: the read of the models events after ``after`` (None:
        those not seen yet). ``on_applied(receipt, sent_ms)``: a publish's reply
        said it was applied."""
        self._client = client
        self._wires = Wires(client)
        # A cluster refuses a read of several partitions' streams (their slots differ), and
        # a blocked read on one node would hold the others' entries back: there each
        # partition has its own read, none blocks, and an empty one is asked again.
        self._cluster = cluster_of(client) is not None
        self._group, self._consumer = settings.group, settings.consumer
        self._max_batch, self._max_wait_ms = settings.max_batch, settings.max_wait_ms
        self._events_query, self._on_applied = events_query, on_applied
        self._partitions: dict[int, Keys] = {}  # those read, with their keys
        self._names: dict[bytes, int] = {}  # their input streams' names
        self._unsettled: _Sent | None = None  # the last publish, its replies not read
        self._ahead: Positions | None = None  # a read ahead went out for entries after these
        self._next: Read | OutOfStepError | None = None  # its reply: the next batch's start

    def serve(self, partitions: dict[int, Keys]) -> None:
        """Read these partitions from now on (nothing may be due: after :meth:`reset`,
        or a :meth:`drain` with nothing read ahead)."""
        assert not self.holds_next, "entries were read ahead"
        assert self._unsettled is None, "a publish is due"
        self._next = None  # a read ahead that found no entries: its events come again
        self._partitions = dict(sorted(partitions.items()))
        self._names = {keys.input.encode(): k for k, keys in self._partitions.items()}

    @property
    def holds_next(self) -> bool:
        """Entries of the next batch were read ahead (pending on us, not yet handled),
        or may have been: the reply is not read yet, or it showed a gap."""
        if self._ahead is not None or isinstance(self._next, OutOfStepError):
            return True
        return self._next is not None and bool(self._next.entries)

    def next_batch(self, after: Positions, *, block_ms: int) -> Read:
        """Up to ``max_batch`` entries (or one per partition, if more) after ``after``
        (per partition), in stream order: those read ahead, or else a read that waits up
        to ``block_ms`` for one; then more, until the batch is full or ``max_wait_ms``
        has passed since the first arrived. OutOfStepError when the reads skipped
        entries."""
        read = self._take_next()
        if read is None or not read.entries:  # nothing read ahead: wait for the first
            read = self._read(after, block_ms, count=self._max_batch, events_after=None)
        if not read.entries:
            return read
        window = BatchWindow(max_batch=self._max_batch, max_wait_ms=self._max_wait_ms)
        window.add(read.count)
        # Each stream's read asks for an equal part of the room left: at least one entry
        # each, so less room than streams means the batch is full.
        while window.room >= len(self._partitions) and (block := window.block_ms()) is not None:
            seen = read.events[-1][0] if read.events else None
            more = self._read(read.last(after), block, count=window.room, events_after=seen)
            window.add(more.count)
            read.extend(more)
        return read

    def read_ahead(self, after: Positions) -> None:
        """Ask now for the batch after the one in hand (``after``: per partition, its
        last entry, or the last one handled)."""
        self._send_read(after, None, count=self._max_batch, events_after=None)
        self._ahead = after

    def publish(self, calls: list[tuple[Command | None, Receipt]]) -> None:
        """Send a batch's calls, one per partition (None: it has nothing to write). The
        replies to those before, and the entries read ahead, are read first."""
        self._settle()
        if self._ahead is not None:
            # Taken before the calls go out: a reply too big for the socket's buffer
            # would otherwise wait behind the calls' execution.
            after, self._ahead = self._ahead, None
            try:
                self._next = self._take_read(after)
            except OutOfStepError as gap:  # this batch still goes out; the next re-syncs
                self._next = gap
        now_ms = time.time() * 1000
        for call, receipt in calls:
            if call is None:
                self._on_applied(receipt, now_ms)
        sent = [(call, receipt) for call, receipt in calls if call is not None]
        if sent:
            self._send([call for call, _ in sent])
            self._unsettled = _Sent([receipt for _, receipt in sent], now_ms)

    def drain(self) -> None:
        """Read the last publish's reply: everything published is applied."""
        self._settle()

    def reset(self) -> None:
        """Before a re-sync: read every reply still due, so that a publish sent is known
        to be applied (or not: refused, or failed), or drop the connection. Entries read
        ahead stay pending on us: the re-sync claims and handles them."""
        try:
            with contextlib.suppress(redis.ResponseError, OutOfStepError):
                self._settle()
            while self._wires.waiting:
                self._wires.receive()
        except REDIS_ERRORS:
            self._wires.drop()
        finally:
            self._forget()

    def close(self) -> None:
        self.reset()
        self._wires.close()

    def _send(self, commands: list[Command]) -> None:
        try:
            self._wires.send(commands)
        except BaseException:
            self._forget()
            raise

    def _receive(self) -> list[Any]:
        try:
            return self._wires.receive()
        except BaseException:
            self._forget()
            raise

    def _forget(self) -> None:
        """Nothing is due any more: every reply was read, or the wire dropped its
        connection and the replies with it (any error does). What this pipeline knew of
        them goes too: a publish unsettled, a read ahead."""
        self._unsettled, self._ahead, self._next = None, None, None

    def _settle(self) -> None:
        sent, self._unsettled = self._unsettled, None
        if sent is None:
            return
        replies = self._receive()
        for reply, receipt in zip(replies, sent.receipts, strict=True):
            if not isinstance(reply, redis.ResponseError):
                self._on_applied(receipt, sent.sent_ms)
        for reply in replies:
            if isinstance(reply, redis.ResponseError):
                raise fenced(reply) or reply

    def _take_next(self) -> Read | None:
        ahead, self._next = self._next, None
        if isinstance(ahead, OutOfStepError):
            raise ahead
        return ahead

    def _read(
        self, after: Positions, block_ms: int, *, count: int, events_after: bytes | None
    ) -> Read:
        self._settle()  # the last publish's replies are due on the wire before this read's
        if not self._cluster:
            self._send_read(after, block_ms, count=count, events_after=events_after)
            return self._take_read(after)
        deadline = time.monotonic() + block_ms / 1000
        while True:
            self._send_read(after, None, count=count, events_after=events_after)
            read = self._take_read(after)
            left = deadline - time.monotonic()
            if read.entries or read.events or left <= 0:
                return read
            time.sleep(min(CLUSTER_POLL_S, left))

    def _send_read(
        self, after: Positions, block_ms: int | None, *, count: int, events_after: bytes | None
    ) -> None:
        """Up to ``count`` new entries for this consumer in all (at least one per
        partition), waiting up to
        ``block_ms`` for one (None: not at all); with them the first entry of each
        stream after ``after``'s, and the models events after ``events_after``, read
        once the entries are in."""
        each = max(count // len(self._partitions), 1)
        inputs = [keys.input for keys in self._partitions.values()]
        groups = [inputs] if not self._cluster else [[name] for name in inputs]
        self._send(
            [
                *(
                    (b"XRANGE", keys.input.encode(), b"(" + after[k], b"+", b"COUNT", b"1")
                    for k, keys in self._partitions.items()
                ),
                *(read_groups(self._group, self._consumer, g, each, block_ms) for g in groups),
                self._events_query(events_after),
            ]
        )

    def _take_read(self, after: Positions) -> Read:
        """The entries of the read sent last, checked to start right after ``after``.

        When a stream had nothing new before the read blocked, the first entry after
        ``after`` is fetched again. If the read starts elsewhere, entries between were
        delivered to this consumer and never reached us (a reply lost on the way): they
        are pending on us, and the windows must see them first.
        """
        replies = self._receive()
        raise_first_error(replies)
        n = len(self._partitions)
        first = dict(zip(self._partitions, replies[:n], strict=True))
        read = Read(events=range_entries(replies[-1]))
        streams = {name: e for reply in replies[n:-1] for name, e in read_streams(reply).items()}
        for name, entries in streams.items():
            if not entries:
                continue
            k = self._names[name]
            keys, since = self._partitions[k], b"(" + after[k]
            next_one = first[k] or self._client.xrange(keys.input, min=since, count=1)
            if not next_one or entries[0][0] != next_one[0][0]:
                raise OutOfStepError(
                    f"a read of {keys.input} for entries after {after[k].decode()} started "
                    f"at {entries[0][0].decode()}: entries were delivered to this consumer "
                    "and never reached it (a lost reply?), or the group was reset"
                )
            read.entries[k] = entries
        return read
