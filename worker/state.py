"""Per-series rolling windows, held in one preallocated array indexed by series slot.

Value number ``i`` of a series (counting from 0, ever) lives at ``ring[slot, i % length]``,
so appending a batch and gathering the windows that end at each new value are a few
numpy calls per *round* (the k-th value of each series in the batch), never a Python
loop per value. The state serialises to safetensors bytes with the last input entry id
it reflects; that pair is the worker's recovery point.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

FORMAT = "attnlstm-state"
FORMAT_VERSION = "1"
NO_SLOT = -1  # a new series past max_series
_ENTRY_ID = re.compile(rb"\d{1,20}-\d{1,20}")


class StateError(Exception):
    """A state checkpoint that cannot be read back."""


class WindowState:
    def __init__(self, *, window: int, length: int | None = None, max_series: int) -> None:
        length = window if length is None else length
        if not 1 <= window <= length:
            raise ValueError(f"need 1 <= window <= length, got window={window}, length={length}")
        self.window = window  # values a forecast sees
        self.length = length  # values kept per series (the history)
        self.max_series = max_series
        self.last_id = b"0-0"  # the last input entry these windows reflect
        self._slots: dict[str, int] = {}
        self._names: list[str] = []
        capacity = min(1024, max_series)
        self._ring = np.zeros((capacity, length), dtype=np.float64)  # (S, L)
        self._count = np.zeros(capacity, dtype=np.int64)  # values seen per slot
        self._window_cols = np.arange(-window, 0)  # (W,) offsets from the newest value

    @property
    def series_count(self) -> int:
        return len(self._names)

    def names(self) -> list[str]:
        return list(self._names)

    def slots_for(self, names: Sequence[str]) -> np.ndarray:
        """Slot per name, new names getting the next free one; NO_SLOT past max_series."""
        slots = self._slots
        out = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            slot = slots.get(name)
            out[i] = self._new_slot(name) if slot is None else slot
        return out

    def _new_slot(self, name: str) -> int:
        if len(self._names) >= self.max_series:
            return NO_SLOT
        slot = len(self._names)
        if slot == self._ring.shape[0]:
            self._grow()
        self._slots[name] = slot
        self._names.append(name)
        return slot

    def _grow(self) -> None:
        capacity = min(2 * self._ring.shape[0], self.max_series)
        ring = np.zeros((capacity, self.length), dtype=np.float64)
        ring[: self._ring.shape[0]] = self._ring
        count = np.zeros(capacity, dtype=np.int64)
        count[: self._count.shape[0]] = self._count
        self._ring, self._count = ring, count

    def push(
        self, slots: np.ndarray, values: np.ndarray, *, gather: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Append values in order (a slot may repeat). Returns a mask of the values whose
        window is full, and those windows (n_full, window), oldest step first, in input
        order. ``gather=False`` only appends (replaying history) and returns no windows."""
        n = slots.shape[0]
        full = np.zeros(n, dtype=bool)
        windows = np.empty((n if gather else 0, self.window), dtype=np.float64)
        for idx in rounds(slots):
            s = slots[idx]  # distinct slots within a round
            self._ring[s, self._count[s] % self.length] = values[idx]
            self._count[s] += 1
            full[idx] = self._count[s] >= self.window
            if gather:
                cols = (self._count[s, None] + self._window_cols) % self.length  # (n_r, W)
                windows[idx] = self._ring[s[:, None], cols]
        return full, windows[full] if gather else windows

    def windows(self, names: Sequence[str]) -> np.ndarray:
        """The current window (window,) of each named, known series; NaN where not full."""
        s = np.array([self._slots[name] for name in names], dtype=np.int64)
        cols = (self._count[s, None] + self._window_cols) % self.length
        out: np.ndarray = self._ring[s[:, None], cols]
        out[self._count[s] < self.window] = np.nan
        return out

    def histories(self) -> tuple[list[str], list[np.ndarray]]:
        """Every series' kept values (up to ``length``, oldest first): what fine-tuning
        learns from."""
        n = len(self._names)
        kept = np.minimum(self._count[:n], self.length)
        out = []
        for slot in range(n):
            cols = (self._count[slot] + np.arange(-kept[slot], 0)) % self.length
            out.append(self._ring[slot, cols].copy())
        return list(self._names), out

    def to_bytes(self) -> bytes:
        n = len(self._names)
        cols = (self._count[:n, None] + np.arange(-self.length, 0)) % self.length
        tensors = {
            "values": np.ascontiguousarray(self._ring[np.arange(n)[:, None], cols]),  # (n, L)
            "count": self._count[:n].copy(),
        }
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "last_id": self.last_id.decode(),
            "series": json.dumps(self._names),
        }
        return bytes(st_save(tensors, metadata=meta))

    @classmethod
    def from_bytes(
        cls, data: bytes, *, window: int, length: int | None = None, max_series: int
    ) -> WindowState:
        """Restore, keeping the most recent values when the window or length changed."""
        try:
            meta, tensors = _read(data)
            names = json.loads(meta["series"])
            values, count = tensors["values"], tensors["count"]
            last_id = meta["last_id"].encode()
            if not _ENTRY_ID.fullmatch(last_id):
                raise ValueError(f"last_id {meta['last_id']!r} is not a stream entry id")
            _check_shapes(names, values, count)
        except (SafetensorError, KeyError, ValueError, TypeError, AttributeError) as e:
            raise StateError(f"unreadable state checkpoint: {e}") from e
        if len(names) > max_series:
            raise StateError(f"state holds {len(names)} series, max_series is {max_series}")
        state = cls(window=window, length=length, max_series=max_series)
        for name in names:
            state._new_slot(name)
        n, old_length = values.shape
        kept = min(old_length, state.length)
        state._count[:n] = np.minimum(count, old_length)
        cols = (state._count[:n, None] + np.arange(-kept, 0)) % state.length
        state._ring[np.arange(n)[:, None], cols] = values[:, old_length - kept :]
        state.last_id = last_id
        return state


def _read(data: bytes) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = header.get("__metadata__", {})
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} checkpoint")
    tensors: dict[str, np.ndarray] = st_load(data)
    return meta, tensors


def _check_shapes(names: object, values: np.ndarray, count: np.ndarray) -> None:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("the series names are not a list of strings")
    if values.ndim != 2 or values.shape[0] != len(names) or count.shape != (len(names),):
        raise ValueError(f"{len(names)} series but values {values.shape} and counts {count.shape}")


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
