"""Getting in step with the consumer group, and leaving it in step.

At start, after any Redis error, and whenever the loop finds it is no longer sure its
windows match the group, the worker: takes the lease (one worker per stream and group,
fenced: :mod:`worker.lease`), makes sure the group exists, restores the window state
checkpoint, and re-syncs: it claims every pending entry and re-reads the stream from
the checkpoint's id up to the group's last delivered entry, replaying acked entries
(the loop puts them into the windows, and through the model and the scoring, but does
not publish them) and handling the pending ones, renewing the lease as it goes. At a
stop it saves the state, with each series' scoring, and hands the lease back.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from worker.attempts import ALONE_FROM, Mark, attempts_of, chunks
from worker.keys import Keys
from worker.lease import Fence, FencedError, Lease, fenced
from worker.metrics import Metrics
from worker.settings import Settings
from worker.state import META, Scoring, StateError, WindowState
from worker.streams import (
    Command,
    Entry,
    OutOfStepError,
    as_str,
    cluster_of,
    ensure_group,
    group_info,
    id_key,
    pages,
    round_trip,
    stream_info,
    what_to_fix,
)

log = logging.getLogger("attnlstm.worker")

# Handles entries in stream order: those in ``pending`` (with their handling attempts
# so far) are forecast and acked; the others were acked before and are not published again.
Handler = Callable[[list[Entry], dict[bytes, int]], None]
CLAIM_PAGE = 1000  # pending entries claimed a call
DELETED_PENDING = "deleted from the stream while pending"


class Recovery:
    """One partition's (``keys``: those of :meth:`Keys.partition`)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        keys: Keys,
        token: str,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        """``token``: this process's (:func:`worker.lease.process_token`)."""
        self.client, self.settings, self.metrics = client, settings, metrics
        self.keys = keys
        self.lease = Lease(
            client,
            key=keys.lease,
            fence_key=keys.fence,
            owner=settings.consumer,
            ttl_ms=settings.lease_ttl_ms,
            token=token,
        )
        # The lease as held, for every write; a placeholder the server refuses until
        # take_lease() has taken it.
        self.fence = Fence(keys, self.lease.token, 0, self.lease.ttl_ms)
        self._renew_at = 0.0
        self._had_group = False
        self._found_behind = b"0-0"  # the last entry read that check_kept found lost
        self.lag: int | None = None  # the group's, at the last audit
        # How many entries the group has read, as far as this worker knows (the
        # logical number of its last delivered entry); None: unknown.
        self._read: int | None = None

    def take_lease(self) -> str:
        """Take the lease if it is free, or begin a new term of it if ours (a re-sync
        follows): the holder's token, ours (``lease.token``) or another worker's. A new
        term's fence number refuses what this worker sent before it: a publish that
        waited in the buffer of a connection since dropped would otherwise land after
        the re-sync had published the same entries again. The function library is
        loaded (the worker ensures it before it takes any lease)."""
        holder, number = self.lease.acquire(new_term=True)
        self.metrics.connected = True
        self.metrics.beat()  # a standby is healthy: alive, and Redis answers
        if holder != self.lease.token:
            return holder
        if number != self.fence.number:
            log.info("took the lease on %s (fence %d)", self.keys.input, number)
        self.fence = Fence(self.keys, self.lease.token, number, self.lease.ttl_ms)
        self._renew_later()
        return holder

    def renew_lease(self) -> None:
        """Renew the lease when due; FencedError when it is no longer ours as taken."""
        if time.monotonic() < self._renew_at:
            return
        holder, number = self.lease.acquire()
        if (holder, number) != (self.fence.token, self.fence.number):
            raise FencedError(
                f"lost the lease on {self.keys.input} (fence {self.fence.number}) to "
                f"{holder} (fence {number})"
            )
        self._renew_later()

    def _renew_later(self) -> None:
        """A third of the lease's life from now: two renewals may fail before it ends."""
        self._renew_at = time.monotonic() + self.lease.ttl_ms / 3000

    def ensure_group(self) -> bool:
        """Create the group if missing: loudly when it was there before. True when it
        was created."""
        created = ensure_group(self.client, self.keys)
        if created and self._had_group:
            log.error(
                "consumer group %r on %r had vanished (Redis restarted without persistence, "
                "or the stream was deleted): created it again from the start of the stream",
                self.keys.group,
                self.keys.input,
            )
            self.metrics.groups_recreated.inc()
        elif created:
            log.info("created consumer group %r on %r", self.keys.group, self.keys.input)
        self._had_group = True
        return created

    def check_kept(self, handled: bytes, *, group_created: bool = False) -> None:
        """An error logged, and counted, where the group is behind what this worker read:
        its last delivered entry is before ``handled`` (the last entry in this worker's
        windows), which a server that kept every write it acknowledged cannot show. Redis
        went back to an earlier moment (a failover to a replica that had not received the
        last writes, a restart that lost the end of its data, an older snapshot loaded)
        and took with it, in this partition's slot, what was written since: forecasts and
        their acks, the saved windows, the lease's fence number and, where ``handled`` is
        gone from the stream, input; or the group was set back by hand. Once for each
        going back: not again for the entries already found behind, nor for a group
        ``group_created`` again (:meth:`ensure_group` says so), nor where there is no
        group (its next holder creates it)."""
        if id_key(handled) <= id_key(self._found_behind):
            return
        if group_created:
            self._found_behind = handled
            return
        try:
            delivered = as_str(group_info(self.client, self.keys)["last-delivered-id"]).encode()
        except redis.ResponseError as e:
            if "nogroup" in str(e).lower() or "no such key" in str(e).lower():
                return
            raise
        if id_key(delivered) >= id_key(handled):
            return
        self._found_behind = handled
        kept = self.client.xrange(self.keys.input, min=handled, max=handled, count=1)
        gone = "" if kept else f"; input is gone too ({handled.decode()} among it)"
        behind = id_key(handled)[0] - id_key(delivered)[0]
        self.metrics.rollbacks.inc()
        log.error(
            "Redis went back on %s: its group last delivered %s, %s %s, which this worker "
            "had read. Redis lost writes it had acknowledged (a failover to a replica that "
            "had not received them, a restart that lost the end of its data), or the group "
            "was set back by hand: forecasts published from there may be gone, and are "
            "published again from what Redis holds (a consumer may read them twice)%s",
            self.keys.input,
            delivered.decode(),
            f"{behind / 1000:.1f} s of entries before" if id_key(delivered) > (0, 0) else "before",
            handled.decode(),
            gone,
        )

    def restore(self, empty: WindowState) -> WindowState:
        """The saved windows (:mod:`worker.state`), reshaped like ``empty``; ``empty``
        when there are none, or they are refused (logged)."""
        key = self.keys.state
        kind = as_str(self.client.type(key))
        if kind == "none":
            return empty
        if kind != "hash":
            log.error(
                "the window state key %s is a %s, not a state hash (an older version's "
                "format, or not the worker's): rebuilding the windows from the stream",
                key,
                kind,
            )
            return empty
        try:
            state = WindowState.restore(
                lambda field: cast(bytes | None, self.client.hget(key, field)),  # one by one
                window=empty.window,
                length=empty.length,
                max_series=empty.max_series,
                idle_ms=empty.idle_ms,
                history_series=empty.history_slots,
            )
        except StateError as e:
            log.error("%s; rebuilding the windows from the stream instead", e)
            return empty
        info = stream_info(self.client, self.keys.input) or {}
        last = as_str(info.get("last-generated-id", "0-0")).encode()
        claimed = state.latest_stamp()
        if id_key(claimed) > id_key(last):
            log.error(
                "the saved window state claims entry %s, past the stream's last, %s (a "
                "tampered or foreign state key): refused; rebuilding the windows from the "
                "stream instead",
                claimed.decode(),
                last.decode(),
            )
            return empty
        head = info.get("first-entry")  # None: none left, the first is any next one
        first = id_key(as_str(head[0]).encode()) if head else _next(id_key(last))
        if id_key(state.last_id) > (0, 0) and first > id_key(state.last_id):
            # Trimmed past the saved state's entry, which it handled: the re-read from there
            # would miss what was trimmed after it, and each series' window would join the
            # values before that gap to those after it, without a word.
            log.warning(
                "the input was trimmed past the saved window state's entry %s (its first "
                "is now %s): rebuilding the windows from what the stream holds instead; "
                "trim only behind what the worker has saved (checkpoint_interval_s)",
                state.last_id.decode(),
                f"{first[0]}-{first[1]}",
            )
            return empty
        log.info(
            "restored windows of %d series at entry %s",
            state.series_count,
            state.last_id.decode(),
        )
        return state

    def resync(self, state: WindowState, handle: Handler, keep_alive: Callable[[], None]) -> None:
        """Bring ``state`` up to the group's last delivered entry, handling what is
        pending on the way (counting attempts: :mod:`worker.attempts`) and replaying
        what was acked. ``keep_alive`` renews, page by page, this lease and every other
        that the worker holds: a re-sync may outlast them."""
        group = group_info(self.client, self.keys)
        delivered, restored = group["last-delivered-id"], state.last_id
        pending = self._claim_pending()
        if late := [entry_id for entry_id in pending if id_key(entry_id) > id_key(delivered)]:
            # Read by another consumer since the group was asked (a worker that froze
            # holding a read wakes up): past what this re-sync re-reads, so none would
            # be met, and each would be acked unhandled. Ours now: the next re-sync.
            raise OutOfStepError(
                f"{len(late)} entries read by another consumer during a re-sync, the first "
                f"{min(late, key=id_key).decode()}"
            )
        mark = Mark.decode(cast(bytes | None, self.client.get(self.keys.handling)))
        attempts = attempts_of(mark, pending, self.fence.token)
        met: set[bytes] = set()
        replayed = 0
        for page in pages(
            self.client,
            self.keys.input,
            first=b"(" + state.last_id,
            last=delivered,
            count=self.settings.max_batch,
        ):
            keep_alive()  # a long re-sync keeps the leases
            met.update(entry_id for entry_id, _ in page if entry_id in attempts)
            for piece, tries in chunks(page, attempts):
                if tries:  # this attempt counts from now: written before it starts
                    alone = piece[0][0] if tries >= ALONE_FROM else None
                    mark = Mark(state.last_id, tries, self.fence.token, until=alone)
                    self._write(self.fence.publish(mark=mark))
                handle(piece, attempts)
            replayed += len(page)
        if unmet := [entry_id for entry_id in pending if entry_id not in met]:
            # At or before the restored state's entry: handled before the crash, only
            # the ack is left. After it: deleted from the stream while pending.
            # Those deleted are recorded with the acks, in one step: counted once.
            deleted = [i for i in unmet if id_key(i) > id_key(restored)]
            lost = _Lost(deleted, "pending", DELETED_PENDING)
            maxlen = self.settings.output_maxlen
            self._write(self.fence.publish(acks=unmet, dead=lost.records, maxlen=maxlen))
            self._count(lost)
        # Counting on from the group's own count, taken before any read moves it on. A
        # group that has read nothing has none (XGROUP CREATE ... 0 leaves it nil, and so
        # it stayed: input trimmed unread went uncounted for a deployment's first run):
        # from what the stream holds, the entries removed before now left out.
        self._read = group.get("entries-read")
        if self._read is None and as_str(delivered) == "0-0":
            info = stream_info(self.client, self.keys.input) or {}
            self._read = int(info.get("entries-added", 0)) - int(info.get("length", 0))
        if replayed or pending:
            log.info(
                "re-synced to %s: %d entries re-read, %d were pending",
                state.last_id.decode(),
                replayed,
                len(pending),
            )

    def _claim_pending(self) -> list[bytes]:
        """Take over every pending entry of the group (we hold the lease, so their
        consumers are gone): their ids. Those deleted from the stream meanwhile are
        dropped from the group by the claim, and recorded as lost in the same call (a
        dead letter each page of CLAIM_PAGE)."""
        cursor, claimed = b"0-0", []
        s = self.settings
        while True:
            call = self.fence.claim(
                consumer=s.consumer,
                start=cursor,
                count=CLAIM_PAGE,
                maxlen=s.output_maxlen,
                reason="pending",
                what=DELETED_PENDING,
            )
            cursor, entries, deleted = self._write(call)
            claimed += [entry_id for entry_id, _ in entries]
            if deleted:
                self._count(_Lost(deleted, "pending", DELETED_PENDING))
            if cursor == b"0-0":
                return claimed

    def delivered(self, entries: int) -> None:
        """A live read delivered ``entries`` to the group."""
        if self._read is not None:
            self._read += entries

    def audit(self) -> None:
        """Between batches: the group's lag; input lost unread (accounted for); and
        OutOfStepError when entries are pending outside any batch (a read whose reply
        was lost: ours; or a consumer that died holding them: theirs, once idle for
        ``claim_idle_ms``)."""
        keys, s = self.keys, self.settings
        group = group_info(self.client, keys)
        self.lag = group.get("lag")
        ours = self.client.xpending_range(
            keys.input, keys.group, min="-", max="+", count=1, consumername=s.consumer
        )
        idle = self.client.xpending_range(
            keys.input, keys.group, min="-", max="+", count=1, idle=s.claim_idle_ms
        )
        if ours or idle:
            raise OutOfStepError(
                "entries pending outside any batch (a lost reply or a dead consumer)"
            )
        self.account_unread(group)

    def account_unread(self, group: dict[str, Any] | None = None) -> None:
        """Once the group has read the whole stream, every entry ever added was read, or
        removed before it could be: the difference is input lost unread. ``group``: its
        XINFO GROUPS entry, when at hand."""
        delivered = (group or group_info(self.client, self.keys))["last-delivered-id"]
        stream = self.client.xinfo_stream(self.keys.input)
        if as_str(delivered) != as_str(stream["last-generated-id"]):
            return  # not caught up: counted once it is
        added = int(stream["entries-added"])
        if added == int(stream["length"]):
            # Nothing ever removed, so nothing lost, whatever the group's count says: a
            # replica of Redis 7.0, once promoted, gives a group's count of entries read
            # thousands short of its primary's (its last delivered entry in step), and
            # each failover logged, counted and dead-lettered input lost that was all
            # there (a review). Where entries were removed, such a shortfall cannot be
            # told from a loss that a worker read past before it stopped: counted.
            if self._read != added:  # set right on the server too, for its lag
                if self._read is not None:
                    log.info("the group's count of entries read on %s was %d, not %d, with "
                             "nothing ever removed: set to %d", self.keys.input,
                             self._read, added, added)  # fmt: skip
                maxlen = self.settings.output_maxlen
                self._write(
                    self.fence.skip(
                        last_delivered=delivered, entries_read=added, dead=(), maxlen=maxlen
                    )
                )
            self._read = added
            return
        if self._read is None:
            return
        if added > self._read and self._read_by_others():
            return  # read, not lost: this worker claims them (audit), and counts on then
        if added > self._read:
            what = "removed from the stream (trimmed or deleted) before it was read"
            lost = _Lost([delivered], "unread", what, count=added - self._read)
            maxlen = self.settings.output_maxlen
            skip = self.fence.skip(
                last_delivered=delivered, entries_read=added, dead=lost.records[0], maxlen=maxlen
            )
            self._write(skip)  # the group may have moved on since: the record stands
            self._count(lost)
        self._read = added

    def _read_by_others(self) -> bool:
        """Whether another consumer holds entries of the group: read by a worker that
        froze holding a read, or by a reader that is not a worker. Entries it read are
        not among this worker's reads, yet not lost."""
        summary = self.client.xpending(self.keys.input, self.keys.group)
        mine = self.settings.consumer
        return any(as_str(c["name"]) != mine for c in summary.get("consumers") or [])

    def _count(self, lost: _Lost) -> None:
        """Input lost: a log line and the metric (its record: ``lost.records``)."""
        if lost.count:
            log.error("%d input entries lost (%s: %s), %s %s", lost.count, lost.reason,
                      lost.what, lost.at, lost.first.decode())  # fmt: skip
            self.metrics.lost.labels(reason=lost.reason).inc(lost.count)

    def save(self, state: WindowState, scoring: Scoring) -> None:
        """At a stop, in step: save the windows (a chunk per call: bounded), with
        ``scoring``'s arrays for their series, and hand the lease back. ValueError for a
        refusal that no retry mends (an ACL without a right the save needs: a burst on an
        empty stream exited 0 with a warning), its lease handed back."""
        try:
            while (k := state.due_chunk(time.monotonic(), 0)) is not None:
                chunk = state.save_chunk(k, time.monotonic(), scoring)
                self._write(self.fence.publish(state=chunk))
            self._write(self.fence.publish(state={META: state.meta()}))
            self.lease.release()
        except (FencedError, redis.RedisError) as e:
            clustered = cluster_of(self.client) is not None
            if (fix := what_to_fix(e, clustered, self.settings.redis_password_file)) is not None:
                with contextlib.suppress(redis.RedisError):
                    self.lease.release()
                raise ValueError(fix) from None
            log.warning("could not save the window state of %s (%s); the last one stands",
                        self.keys.input, e)  # fmt: skip
            return
        log.info(  # at a stop, or a partition handed back to the pool
            "saved windows of %d series at entry %s of %s, and handed its lease back",
            state.series_count,
            state.last_id.decode(),
            self.keys.input,
        )

    def _write(self, call: Command) -> Any:
        """One fenced call, now: its reply; FencedError when the lease is no longer ours."""
        try:
            return round_trip(self.client, [call])[0]
        except redis.ResponseError as e:
            raise fenced(e) or e from None


class _Lost:
    """Input entries lost: ``count`` of them (``ids``' by default), ``first`` the
    earliest of ``ids`` (unread: the last entry read when the loss was noticed, for the
    stream's counts say how many, not where); ``records``: the dead letter that records
    them (``lost``: how many, ``reason``, ``src``: ``first``), none when no id is lost."""

    def __init__(
        self, ids: list[bytes], reason: str, what: str, *, count: int | None = None
    ) -> None:
        self.count = len(ids) if count is None else count
        self.reason, self.what = reason, what
        self.at = "the first" if count is None else "noticed at"
        self.first = min(ids, key=id_key) if ids else b""
        error = f"{self.count} input entries {what}".encode()
        record = [b"lost", b"%d" % self.count, b"reason", reason.encode(), b"src", self.first,
                  b"error", error]  # fmt: skip
        self.records = [record] if ids else []


def _next(entry: tuple[int, int]) -> tuple[int, int]:
    """The entry id after ``entry``, as :func:`worker.streams.id_key` gives them."""
    return entry[0], entry[1] + 1
