"""Per-series rolling windows, held in one preallocated array indexed by series slot.

Value number ``i`` of a series (counting from 0, ever) lives at ``ring[slot, i % length]``,
so appending a batch and gathering the windows that end at each new value are a few
numpy calls per *round* (the k-th value of each series in the batch), never a Python
loop per value.

Every series keeps its last ``window`` values, what a forecast sees. Only the series of
the first ``history_slots`` slots (``history_series``, in whole chunks) also keep their
last ``length`` values, in an array of their own: the history fine-tuning learns from.
A window costs ``window`` values, a history ``length``: a million series can have
windows where they could not all have histories.

A series whose last value is older than ``idle_ms`` (by entry time) starts afresh when
its next value comes, and :meth:`WindowState.sweep` frees its slot for another series:
junk names cannot hold slots for ever. Both follow from the entries alone, so a replay
builds the same windows.

The checkpoint is saved in pieces: slots in chunks of ``CHUNK``, each saved (as
safetensors bytes) once it has changed and its last save is old enough, a chunk or a
few with a batch's publish, so its cost follows what changed and no single write is
large. Each chunk records the last input entry it reflects (its stamp), and carries what
the caller's ``scoring`` gives for its series (:mod:`worker.online.scoring`: their
pending forecasts, intervals and multipliers) as it stood with the windows. The ``meta``
field, a few bytes written with every chunk, names the saved chunks and the entry to
re-read the stream from: the oldest stamp of a chunk changed since its save (and any
entries put aside after it, which the re-read skips). A chunk
unchanged since its save holds its series up to every later entry, so restored, a
series skips the entries up to its chunk's stamp or the re-read entry, whichever is
later.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from collections.abc import Callable, Sequence

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from worker.contract import ID_PART_MAX

FORMAT = "attnlstm-state"
FORMAT_VERSION = "3"
CHUNK = 128  # slots per saved chunk: 128 x 200 values x 8 bytes = 200 KB, with histories
NO_SLOT = -1  # a new series past max_series
# Windows at least this long are gathered a slot at a time, in two slices each, not by
# one fancy index of (slots, window): for 1,000 slots, 1.6 against 1.9 ms at 128 values,
# 1.6 against 7.1 at 384, 2.1 against 9.6 at 817 (the profile's context); 0.2 against
# 1.6 at 20.
ROW_COPY_MIN = 128
# Slots a rotation is shared by, on average, for them to be gathered a rotation at a
# time: for 1,000 slots in step at 817 values, 0.8 against 1.6-2.7 ms a slot at a time.
SHARED_CUT_MIN = 8
META = b"meta"
SCORING = "scoring."  # the prefix of a chunk's scoring arrays (save_chunk)
# Per-slot arrays to save beside the given slots' windows, by name.
Scoring = Callable[[np.ndarray], dict[str, np.ndarray]]
_ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")


class StateError(Exception):
    """A state checkpoint that cannot be read back."""


def _run(index: np.ndarray) -> np.ndarray | slice:
    """``index`` as a slice where it counts up by one, else itself: a slice reads and
    writes in place, where an index array's read is copied before it is written (640
    windows of 817 values, cache cold: 0.98 against 1.44 ms; the day-ahead drain 3.7%
    faster, the median of eight interleaved pairs: BENCHMARKS.md)."""
    if index.size and bool((np.diff(index) == 1).all()):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def chunk_field(k: int) -> bytes:
    return b"chunk:%d" % k


def id_pair(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class WindowState:
    def __init__(
        self,
        *,
        window: int,
        length: int | None = None,
        max_series: int,
        idle_ms: int = 0,
        history_series: int | None = None,
    ) -> None:
        """``history_series``: how many series keep ``length`` values (None: all)."""
        length = window if length is None else length
        if not 1 <= window <= length:
            raise ValueError(f"need 1 <= window <= length, got window={window}, length={length}")
        self.window = window  # values a forecast sees
        self.length = length  # values a series with a history keeps
        self.max_series = max_series
        kept = max_series if history_series is None else min(history_series, max_series)
        # The slots whose series keep a history: whole chunks, so that a saved chunk
        # holds histories or windows, not both.
        self.history_slots = min(-(-kept // CHUNK) * CHUNK, max_series)
        self.idle_ms = idle_ms  # 0: a series keeps its slot for ever
        self.last_id = b"0-0"  # the last input entry these windows reflect
        self._slots: dict[str, int] = {}
        self._names: list[str | None] = []  # by slot; None: free
        self._free: list[int] = []  # a heap of free slots below len(_names)
        capacity = min(1024, max_series)
        self._ring = np.zeros((capacity, window), dtype=np.float64)  # (S, W)
        self._history = np.zeros((min(capacity, self.history_slots), length), dtype=np.float64)
        self._count = np.zeros(capacity, dtype=np.int64)  # values seen per slot
        self._last_ms = np.zeros(capacity, dtype=np.int64)  # entry time of the last value
        self._used = np.zeros(capacity, dtype=bool)  # slots that hold a series
        self.fresh = np.zeros(0, dtype=bool)  # of the last push: see push
        self._window_cols = np.arange(-window, 0)  # (W,) from the oldest value, wrapping
        # Saving: the chunks changed since their save, each with the entry the stream
        # must be re-read from for it; their stamps; when each was saved (monotonic s).
        self._dirty: dict[int, tuple[tuple[int, int], bytes]] = {}  # id, parsed first
        self._stamps: dict[int, bytes] = {}
        self._saved_at: dict[int, float] = {}
        # Restored and re-reading the stream: per slot, the last entry its windows hold.
        self._holds: np.ndarray | None = None  # (S, 2): ms, seq
        # Entries put aside (dead-lettered at max_attempts) after the entry the stream is
        # re-read from: acked, and never in the windows, so a re-read skips them rather
        # than take them in (and handle the poison again, as an acked entry no attempt
        # counts). Saved in the meta field, forgotten once the re-read starts past them.
        self.put_aside: set[bytes] = set()
        # Restored from a checkpoint: each chunk's slots and what it saved of their
        # scoring (save_chunk).
        self.restored = False
        self.restored_scoring: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []

    @property
    def series_count(self) -> int:
        return len(self._slots)

    def names(self) -> list[str | None]:
        """The series of each slot (None: a free slot)."""
        return list(self._names)

    def slots_for(self, names: Sequence[str], room: int | None = None) -> np.ndarray:
        """Slot per name, new names getting a free one; NO_SLOT past max_series, or once
        ``room`` new names have one (a worker's series across its partitions count
        against one max_series)."""
        slots = self._slots
        room = self.max_series if room is None else room
        out = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            slot = slots.get(name)
            if slot is None:
                slot = self._new_slot(name) if room > 0 else NO_SLOT
                room -= slot != NO_SLOT
            out[i] = slot
        return out

    def _new_slot(self, name: str) -> int:
        if len(self._slots) >= self.max_series:
            return NO_SLOT
        if self._free:
            slot = heapq.heappop(self._free)
            self._names[slot] = name
        else:
            slot = len(self._names)
            if slot == self._ring.shape[0]:
                self._grow()
            self._names.append(name)
        self._slots[name] = slot
        self._count[slot] = 0
        self._used[slot] = True
        if self._holds is not None:  # new since the checkpoint: every value counts
            self._holds[slot] = 0
        self._touch(np.array([slot]))
        return slot

    def _grow(self) -> None:
        capacity = min(2 * self._ring.shape[0], self.max_series)
        self._ring = _grown(self._ring, capacity)
        if self._history.shape[0] < self.history_slots:
            self._history = _grown(self._history, min(capacity, self.history_slots))
        self._count = _grown(self._count, capacity)
        self._last_ms = _grown(self._last_ms, capacity)
        self._used = _grown(self._used, capacity)
        if self._holds is not None:
            self._holds = _grown(self._holds, capacity)

    def _touch(self, slots: np.ndarray) -> None:
        """The chunks of ``slots`` change now, before the windows take in entries past
        ``last_id``: until saved, each is re-read from here, where its saved copy
        holds every series it had (unchanged since saved, in step). While re-reading
        after a restore, from its stamp if earlier: a series it gains now may have
        values before ``last_id`` that its saved copy lacks."""
        for k in np.unique(slots // CHUNK).tolist():
            if k not in self._dirty:
                stamp = self.last_id
                if self._holds is not None:
                    stamp = min(self._stamps.get(k, stamp), stamp, key=id_pair)
                self._dirty[k] = (id_pair(stamp), stamp)

    def push(
        self,
        slots: np.ndarray,
        values: np.ndarray,
        *,
        ms: np.ndarray | None = None,
        gather: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Append values in order (a slot may repeat), each at entry time ``ms`` (None:
        0, no idle reset). Returns a mask of the values whose window is full, and those
        windows (n_full, window), oldest step first, in input order. ``gather=False``
        only appends (replaying history) and returns no windows. ``fresh`` marks the
        values that started their series afresh (idle past ``idle_ms``)."""
        n = slots.shape[0]
        ms = np.zeros(n, dtype=np.int64) if ms is None else ms
        full = np.zeros(n, dtype=bool)
        self.fresh = np.zeros(n, dtype=bool)
        windows = np.empty((n if gather else 0, self.window), dtype=np.float64)
        for idx in rounds(slots):
            s = slots[idx]  # distinct slots within a round
            if self.idle_ms:
                stale = ms[idx] - self._last_ms[s] > self.idle_ms
                self._count[s[stale]] = 0  # idle too long: a fresh start
                self.fresh[idx[stale]] = True
            v = values[idx]
            self._ring[s, self._count[s] % self.window] = v
            kept = s < self.history_slots
            h = s[kept]
            self._history[h, self._count[h] % self.length] = v[kept]
            self._count[s] += 1
            self._last_ms[s] = ms[idx]
            full[idx] = self._count[s] >= self.window
            if gather:
                self._newest(s, out=windows, rows=idx)
        self._touch(slots)
        # Full windows, most often all of them: then as they are, not copied once more.
        return full, windows if full.all() or not gather else windows[full]

    def replace(self, slot: int, back: int, value: float) -> bool:
        """Put ``value`` in the place of the value ``back`` values before ``slot``'s newest
        (0: the newest), in its window and its history where they still hold it; False
        where it came before the series' fresh start (idle), and is in neither."""
        at = int(self._count[slot]) - 1 - back
        if at < 0:
            return False
        if back < self.window:
            self._ring[slot, at % self.window] = value
        if slot < self.history_slots and back < self.length:
            self._history[slot, at % self.length] = value
        return True

    def holds(self, slots: np.ndarray, ids: Sequence[bytes]) -> np.ndarray:
        """Restored and re-reading: which of these entries (of these slots) the
        restored windows already hold. All False once the re-read is over."""
        if self._holds is None or not ids:
            return np.zeros(len(ids), dtype=bool)
        pairs = np.array([id_pair(i) for i in ids], dtype=np.int64)
        held = self._holds[slots]
        older: np.ndarray = (pairs[:, 0] < held[:, 0]) | (
            (pairs[:, 0] == held[:, 0]) & (pairs[:, 1] <= held[:, 1])
        )
        return older

    def reread_done(self) -> None:
        self._holds = None

    def sweep(self, now_ms: int) -> np.ndarray:
        """Free the slots of series idle for longer than ``idle_ms``; those slots."""
        if not self.idle_ms or not self._slots:
            return np.empty(0, dtype=np.int64)
        n = len(self._names)
        # An entry id past ID_PART_MAX ms is dead-lettered, yet moves ``last_id`` (and the
        # stream's clock) on: the clock is then past every value held, as far as int64 goes.
        now_ms = min(now_ms, ID_PART_MAX)
        idle = np.flatnonzero(self._used[:n] & (now_ms - self._last_ms[:n] > self.idle_ms))
        for slot in idle.tolist():
            self._unplace(slot)
            heapq.heappush(self._free, slot)
        self._touch(idle)
        return idle

    def _unplace(self, slot: int) -> None:
        """Take ``slot``'s series out of it (its last entry time stays, as a sweep left it
        before: the idle reset of the slot's next series goes by it)."""
        name = self._names[slot]
        assert name is not None
        del self._slots[name]
        self._names[slot] = None
        self._count[slot] = 0
        self._used[slot] = False

    def windows(self, names: Sequence[str]) -> np.ndarray:
        """The current window (window,) of each named, known series; NaN where not full."""
        s = np.array([self._slots[name] for name in names], dtype=np.int64)
        out = np.empty((s.size, self.window))
        self._newest(s, out=out, rows=np.arange(s.size))
        out[self._count[s] < self.window] = np.nan
        return out

    def _newest(self, s: np.ndarray, *, out: np.ndarray, rows: np.ndarray) -> None:
        """Write into ``out[rows]`` the ``window`` values up to the newest of each slot
        in ``s``, oldest first: ring[slot] rotated to start at its oldest value, count %
        window."""
        oldest = self._count[s] % self.window
        if self.window < ROW_COPY_MIN:
            cols = oldest[:, None] + self._window_cols  # (n, W), from -W: no modulo
            out[rows] = self._ring[s[:, None], cols]
            return
        # Series that have seen the same number of values modulo the window (those fed in
        # step, as a shared clock feeds them) have their oldest value at the same place:
        # one copy of each half for them all, through slices where their slots and rows
        # run consecutively (as series fed in step in a fixed order do). Where few share
        # it, a copy per slot.
        order = np.argsort(oldest, kind="stable")
        sorted_cuts = oldest[order]
        starts = np.flatnonzero(np.r_[True, sorted_cuts[1:] != sorted_cuts[:-1]])
        if starts.size * SHARED_CUT_MIN > s.size:
            for row, slot, cut in zip(rows.tolist(), s.tolist(), oldest.tolist(), strict=True):
                out[row, : self.window - cut] = self._ring[slot, cut:]
                out[row, self.window - cut :] = self._ring[slot, :cut]
            return
        for group in np.split(order, starts[1:]):
            cut, r, g = int(oldest[group[0]]), _run(rows[group]), _run(s[group])
            out[r, : self.window - cut] = self._ring[g, cut:]
            out[r, self.window - cut :] = self._ring[g, :cut]

    def histories(self) -> tuple[list[str], list[np.ndarray]]:
        """The histories (up to ``length`` values, oldest first) of the series that keep
        one: what fine-tuning learns from."""
        names, out = [], []
        for name, slot in self._slots.items():
            if slot >= self.history_slots:
                continue
            kept = min(int(self._count[slot]), self.length)
            cols = (self._count[slot] + np.arange(-kept, 0)) % self.length
            names.append(name)
            out.append(self._history[slot, cols].copy())
        return names, out

    # -- saving ------------------------------------------------------------------------

    def due_chunk(self, now: float, interval_s: float) -> int | None:
        """The changed chunk saved longest ago, if that was ``interval_s`` or more
        before ``now``; None when none is due, and while re-reading after a restore (a
        chunk then holds series at different entries: no one stamp says what it holds)."""
        if self._holds is not None:
            return None
        due = [k for k in self._dirty if now - self._saved_at.get(k, -math.inf) >= interval_s]
        return min(due, key=lambda k: self._saved_at.get(k, -math.inf)) if due else None

    def save_chunk(self, k: int, now: float, scoring: Scoring | None = None) -> dict[bytes, bytes]:
        """Chunk ``k`` and the meta field, to write to the state hash now; with
        ``scoring``, what it gives for the chunk's slots, saved beside their windows
        (restored as :attr:`restored_scoring`)."""
        self._dirty.pop(k, None)
        self._stamps[k] = self.last_id
        self._saved_at[k] = now
        return {chunk_field(k): self._chunk_bytes(k, scoring), META: self.meta()}

    def _chunk_bytes(self, k: int, scoring: Scoring | None) -> bytes:
        lo, hi = k * CHUNK, min((k + 1) * CHUNK, len(self._names))
        pos = [s - lo for s in range(lo, hi) if self._names[s] is not None]
        slots = np.asarray(pos, dtype=np.int64) + lo
        ring, width = (
            (self._history, self.length) if lo < self.history_slots else (self._ring, self.window)
        )
        cols = (self._count[slots, None] + np.arange(-width, 0)) % width
        tensors = {
            "values": np.ascontiguousarray(ring[slots[:, None], cols]),  # (n, L or W)
            "count": self._count[slots].copy(),
            "last_ms": self._last_ms[slots].copy(),
            "pos": np.asarray(pos, dtype=np.int64),
        }
        if scoring is not None:
            tensors |= {SCORING + name: a for name, a in scoring(slots).items()}
        names = [self._names[s] for s in slots.tolist()]
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "series": json.dumps(names),
            "stamp": self._stamps[k].decode(),
        }
        return bytes(st_save(tensors, metadata=meta))

    def meta(self) -> bytes:
        """The saved chunks (as runs of numbers: [first, last] pairs), the entry to
        re-read from (the oldest stamp of a chunk changed since its save, or the last
        entry), and the entries put aside after it, which it forgets before it (a few:
        each is ``max_attempts`` crashes)."""
        first, reread_from = min([(id_pair(self.last_id), self.last_id), *self._dirty.values()])
        self.put_aside = {i for i in self.put_aside if id_pair(i) > first}
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "chunk": CHUNK,
            "last_id": reread_from.decode(),
            "chunks": _runs(sorted(self._stamps)),
            "put_aside": sorted(i.decode() for i in self.put_aside),
        }
        return json.dumps(meta).encode()

    def latest_stamp(self) -> bytes:
        """The newest entry any saved chunk claims to hold."""
        return max([self.last_id, *self._stamps.values()], key=id_pair)

    @classmethod
    def restore(
        cls,
        read: Callable[[bytes], bytes | None],
        *,
        window: int,
        length: int | None = None,
        max_series: int,
        idle_ms: int = 0,
        history_series: int | None = None,
    ) -> WindowState:
        """Restore from the state hash, reading one field at a time (``read(field)``,
        None: missing), keeping the most recent values when the window, length or
        history series changed; StateError when it is not a whole, valid checkpoint.
        The windows then skip what each chunk holds: :meth:`holds`."""
        state = cls(
            window=window,
            length=length,
            max_series=max_series,
            idle_ms=idle_ms,
            history_series=history_series,
        )
        try:
            meta = json.loads(_field(read, META))
            if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} checkpoint")
            if meta["chunk"] != CHUNK:
                raise ValueError(f"chunks of {meta['chunk']} slots, not {CHUNK}")
            last_id = _entry_id(meta["last_id"])
            put_aside = {_entry_id(i) for i in meta.get("put_aside", [])}  # (none: older)
            stamps: dict[int, bytes] = {}
            for k in _chunks(meta["chunks"], -(-max_series // CHUNK)):
                state._restore_chunk(k, _field(read, chunk_field(k)), stamps)
            if len(state._slots) > max_series:
                raise ValueError(f"more series than max_series ({max_series})")
        except (
            SafetensorError,
            KeyError,
            ValueError,
            TypeError,
            AttributeError,
            RecursionError,  # JSON nested too deep: the meta, a chunk's header or series
        ) as e:
            raise StateError(f"unreadable state checkpoint: {e}") from e
        state.restored = True
        state.last_id = last_id
        state.put_aside = put_aside
        state._holds = np.zeros((state._ring.shape[0], 2), dtype=np.int64)
        state._holds[:] = id_pair(last_id)
        for k, stamp in stamps.items():  # free slots too: _new_slot sets a new series'
            state._holds[k * CHUNK : (k + 1) * CHUNK] = max(id_pair(stamp), id_pair(last_id))
        state._stamps = stamps
        state._free = [slot for slot, name in enumerate(state._names) if name is None]
        heapq.heapify(state._free)
        state.restored_scoring = [  # less the rows of copies dropped (_restore_chunk)
            (s[state._used[s]], {n: a[state._used[s]] for n, a in arrays.items()})
            for s, arrays in state.restored_scoring
        ]
        return state

    def _restore_chunk(self, k: int, data: bytes, stamps: dict[int, bytes]) -> None:
        """Place a chunk's series in their slots, and its stamp in ``stamps`` (those of
        the chunks placed before it)."""
        meta, tensors = _read(data)
        names, stamp = json.loads(meta["series"]), _entry_id(meta["stamp"])
        stamps[k] = stamp
        values, count, last_ms, pos = (
            tensors["values"], tensors["count"], tensors["last_ms"], tensors["pos"]
        )  # fmt: skip
        _check_chunk(names, values, count, last_ms, pos)
        scoring = {n[len(SCORING) :]: a for n, a in tensors.items() if n.startswith(SCORING)}
        if any(a.shape[:1] != pos.shape for a in scoring.values()):  # a row per series
            raise ValueError("scoring arrays that do not match the series")
        slots: list[int] = (k * CHUNK + pos).tolist()
        while self._ring.shape[0] <= max(slots, default=-1):
            if self._ring.shape[0] == self.max_series:
                raise ValueError(
                    f"slot {max(slots)} is past max_series ({self.max_series}): saved with "
                    "more series than max_series now allows (lowered since?)"
                )
            self._grow()
        while len(self._names) <= max(slots, default=-1):
            self._names.append(None)
        own = self._place(names, slots, stamps, k)
        old_length = values.shape[1]
        values, count, last_ms = values[own], count[own], last_ms[own]
        scoring = {n: a[own] for n, a in scoring.items()}
        s = np.asarray(slots, dtype=np.int64)[own]
        self._count[s] = np.minimum(count, old_length)
        self._last_ms[s] = last_ms
        kept = min(old_length, self.window)
        cols = (self._count[s, None] + np.arange(-kept, 0)) % self.window
        self._ring[s[:, None], cols] = values[:, old_length - kept :]
        if k * CHUNK < self.history_slots:
            kept = min(old_length, self.length)
            cols = (self._count[s, None] + np.arange(-kept, 0)) % self.length
            self._history[s[:, None], cols] = values[:, old_length - kept :]
        if scoring:
            self.restored_scoring.append((s, scoring))

    def _place(
        self, names: list[str], slots: list[int], stamps: dict[int, bytes], k: int
    ) -> np.ndarray:
        """Chunk ``k``'s series in their slots: which of them are theirs.

        A series may be saved in two chunks: gone idle, its slot freed (and taken), back
        in a slot of another chunk, saved there before its old chunk was saved again. The
        copy of the later stamp is its own, the other dropped (refusing such a state made
        a worker rebuild every window from the stream). Two copies of one stamp are no
        such thing: refused."""
        own = np.ones(len(names), dtype=bool)
        mine = id_pair(stamps[k])
        for i, (name, slot) in enumerate(zip(names, slots, strict=True)):
            if (other := self._slots.get(name)) is not None:
                theirs = id_pair(stamps[other // CHUNK])
                if mine == theirs:
                    raise ValueError(f"series {name!r} saved twice at entry {stamps[k].decode()}")
                if mine < theirs:
                    own[i] = False
                    continue
                self._unplace(other)
            self._slots[name] = slot
            self._names[slot] = name
            self._used[slot] = True
        return own


def _field(read: Callable[[bytes], bytes | None], name: bytes) -> bytes:
    value = read(name)
    if value is None:
        raise ValueError(f"the {name.decode()} field is missing")
    return value


def _runs(numbers: list[int]) -> list[list[int]]:
    """Sorted numbers as [first, last] pairs of consecutive runs."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return runs


def _chunks(runs: object, limit: int) -> list[int]:
    """The chunk numbers of :func:`_runs` pairs, checked: each below ``limit``."""
    if not isinstance(runs, list):
        raise ValueError("the saved chunks are not a list")
    out: list[int] = []
    for run in runs:
        first, last = run
        if not (isinstance(first, int) and isinstance(last, int) and 0 <= first <= last):
            raise ValueError(f"{run!r} is not a run of chunk numbers")
        if last >= limit:
            raise ValueError(f"chunk {last} is past max_series ({limit} chunks)")
        if out and first <= out[-1]:
            raise ValueError("the saved chunks are out of order")
        out += range(first, last + 1)
    return out


def _grown(array: np.ndarray, capacity: int) -> np.ndarray:
    out = np.zeros((capacity, *array.shape[1:]), dtype=array.dtype)
    out[: array.shape[0]] = array
    return out


def _entry_id(text: object) -> bytes:
    if not isinstance(text, str) or not _ENTRY_ID.fullmatch(text):
        raise ValueError(f"{text!r} is not a stream entry id")
    if max(id_pair(text)) > ID_PART_MAX:  # dead-lettered, never in the windows
        raise ValueError(f"entry id {text} is past what the windows hold (int64)")
    return text.encode()


def _read(data: bytes) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = header.get("__metadata__", {})
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} chunk")
    tensors: dict[str, np.ndarray] = st_load(data)
    return meta, tensors


def _check_chunk(
    names: object, values: np.ndarray, count: np.ndarray, last_ms: np.ndarray, pos: np.ndarray
) -> None:
    """A chunk's arrays as :meth:`WindowState._chunk_bytes` saves them: of its dtypes and
    of numbers a series can have. Restored, a value that is not finite would make every
    forecast of its series so, and a count that is not a whole number (NaN, cast to
    -2**63) would keep the series from ever being forecast again."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("the series names are not a list of strings")
    n = len(names)
    rows = (count, last_ms, pos)
    if values.ndim != 2 or values.shape[0] != n or any(a.shape != (n,) for a in rows):
        shapes = ", ".join(str(a.shape) for a in rows)
        raise ValueError(f"{n} series but values {values.shape} and counts, times, slots {shapes}")
    for name, a, dtype in (
        ("values", values, np.float64),
        ("count", count, np.int64),
        ("last_ms", last_ms, np.int64),
        ("pos", pos, np.int64),
    ):
        if a.dtype != dtype:
            raise ValueError(f"{name} of dtype {a.dtype}, not {np.dtype(dtype)}")
    in_chunk = n == 0 or (pos.min() >= 0 and pos.max() < CHUNK)
    if not in_chunk or (count < 0).any() or (last_ms < 0).any():
        raise ValueError("slot positions, counts or times out of range")
    if np.unique(pos).size != n:
        raise ValueError("a slot saved twice")
    # Only the values a series has: the places before its first are never read. Only the
    # columns some series has values in are looked at: a chunk of no series claims any
    # width in a few bytes, and a mask of that width once took (0, 2**40): 8 TiB.
    width = values.shape[1]
    cols = min(width, int(count.max(initial=0)))  # the last ones: those any series has
    held = np.arange(cols) >= cols - np.minimum(count, cols)[:, None]  # (n, cols)
    if not np.isfinite(values[:, width - cols :][held]).all():
        raise ValueError("values that are not finite")


def rounds(slots: np.ndarray) -> list[np.ndarray]:
    """Indices of the 1st, 2nd, ... occurrence of each slot, each in input order."""
    n = slots.shape[0]
    if n == 0:
        return []
    order = np.argsort(slots, kind="stable")
    sorted_slots = slots[order]
    starts = np.flatnonzero(np.r_[True, sorted_slots[1:] != sorted_slots[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - group_start
    by_rank = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[by_rank], np.arange(1, int(rank.max()) + 1))
    return np.split(by_rank, bounds)
