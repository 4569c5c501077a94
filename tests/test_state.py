"""The rolling windows match per-series Python lists, grow without losing data, free
idle series, and survive a checkpoint round trip (chunk by chunk), including one to a
different window or length."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from worker.state import (
    CHUNK,
    META,
    NO_SLOT,
    ROW_COPY_MIN,
    StateError,
    WindowState,
    chunk_field,
)

History = dict[str, list[float]]


def _push(
    state: WindowState, names: Sequence[str], values: Sequence[float], *, gather: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    return state.push(state.slots_for(names), np.asarray(values, dtype=np.float64), gather=gather)


def _reference(
    history: History, names: Sequence[str], values: Sequence[float], window: int
) -> tuple[list[bool], list[list[float]]]:
    """The obvious loop: append, and the window ending at a value is the last ``window``."""
    full, windows = [], []
    for name, value in zip(names, values, strict=True):
        kept = history.setdefault(name, [])
        kept.append(value)
        full.append(len(kept) >= window)
        if full[-1]:
            windows.append(kept[-window:])
    return full, windows


def _assert_push_matches(
    state: WindowState, history: History, names: Sequence[str], values: Sequence[float]
) -> None:
    full, windows = _push(state, names, values)
    ref_full, ref_windows = _reference(history, names, values, state.window)
    assert full.tolist() == ref_full
    assert windows.shape == (len(ref_windows), state.window)
    assert windows.tolist() == ref_windows


def _random_batches(seed: int, n_batches: int, pool: int) -> list[tuple[list[str], list[float]]]:
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        size = int(rng.integers(0, 25))
        names = [f"s{i}" for i in rng.integers(0, pool, size=size)]  # repeats within a batch
        batches.append((names, rng.normal(size=size).round(3).tolist()))
    return batches


@pytest.mark.parametrize(
    ("window", "length"),
    # the last: windows long enough to be gathered a slot at a time
    [(1, 1), (4, 4), (4, 7), (5, 13), (ROW_COPY_MIN + 3, ROW_COPY_MIN + 10)],
)
def test_push_matches_the_reference_with_repeats_in_a_batch(window: int, length: int) -> None:
    state = WindowState(window=window, length=length, max_series=100)
    history: History = {}
    # enough batches to fill the long windows many times over (12 values a batch, 6 series)
    batches = _random_batches(seed=window + length, n_batches=60 + 2 * window, pool=6)
    for names, values in batches:
        _assert_push_matches(state, history, names, values)
    names = [name for name in state.names() if name is not None]
    assert sorted(names) == sorted(history)
    np.testing.assert_array_equal(
        state.windows(names), np.array([history[n][-window:] for n in names])
    )


def test_series_fed_in_step_and_a_few_out_of_it_match_the_reference() -> None:
    """Long windows of many series in step are gathered a rotation at a time; a few
    series a value or two ahead make rotations of their own, in the same batch."""
    window = ROW_COPY_MIN + 3
    state = WindowState(window=window, length=window, max_series=100)
    history: History = {}
    rng = np.random.default_rng(5)
    names = [f"s{i}" for i in range(40)]
    for k in range(2 * window + 7):
        ahead = ["s0"] * (k % 50 == 7) + ["s1"] * (k % 70 == 3)  # each a value ahead, now
        batch = names + ahead if k % 2 else ahead + names
        _assert_push_matches(state, history, batch, rng.normal(size=len(batch)).tolist())


def test_one_batch_holding_a_series_many_times() -> None:
    state = WindowState(window=2, length=3, max_series=10)
    full, windows = _push(state, ["a", "b", "a", "a", "b", "a"], [1, 10, 2, 3, 20, 4])
    assert full.tolist() == [False, False, True, True, True, True]
    assert windows.tolist() == [[1, 2], [2, 3], [10, 20], [3, 4]]  # in input order


def test_values_before_the_window_is_full_are_kept() -> None:
    state = WindowState(window=3, max_series=10)
    full, windows = _push(state, ["a"], [1.0])
    assert full.tolist() == [False]
    assert windows.shape == (0, 3)
    full, windows = _push(state, ["a"], [2.0])
    assert full.tolist() == [False]
    full, windows = _push(state, ["a"], [3.0])
    assert full.tolist() == [True]
    assert windows.tolist() == [[1.0, 2.0, 3.0]]


def test_new_series_get_the_next_slot_on_first_sight() -> None:
    state = WindowState(window=2, max_series=10)
    assert state.slots_for(["a", "b", "a", "c"]).tolist() == [0, 1, 0, 2]
    assert state.slots_for(["c", "d"]).tolist() == [2, 3]
    assert state.names() == ["a", "b", "c", "d"]
    assert state.series_count == 4


def test_past_max_series_new_names_get_no_slot_and_known_ones_still_work() -> None:
    state = WindowState(window=2, max_series=2)
    assert state.slots_for(["a", "b", "c"]).tolist() == [0, 1, NO_SLOT]
    assert state.slots_for(["c", "b", "a"]).tolist() == [NO_SLOT, 1, 0]
    assert state.names() == ["a", "b"]
    _push(state, ["a", "b"], [1.0, 2.0])
    full, windows = _push(state, ["a", "b"], [3.0, 4.0])
    assert full.tolist() == [True, True]
    assert windows.tolist() == [[1.0, 3.0], [2.0, 4.0]]


def test_growing_past_the_initial_capacity_keeps_the_data() -> None:
    state = WindowState(window=3, length=4, max_series=3000)
    history: History = {}
    first = [f"s{i}" for i in range(1000)]
    everyone = [f"s{i}" for i in range(2500)]  # grows 1024 -> 2048 -> 3000
    for step in range(3):
        _assert_push_matches(state, history, first, [i + step / 10 for i in range(1000)])
    for step in range(3, 6):
        _assert_push_matches(state, history, everyone, [i + step / 10 for i in range(2500)])
    assert state.series_count == 2500
    np.testing.assert_array_equal(
        state.windows(everyone), np.array([history[n][-3:] for n in everyone])
    )
    assert state.windows(["s0"]).tolist() == [[0.3, 0.4, 0.5]]
    assert state.windows(["s2499"]).tolist() == [[2499.3, 2499.4, 2499.5]]


def test_gather_false_only_appends() -> None:
    batches = _random_batches(seed=7, n_batches=30, pool=5)
    replayed = WindowState(window=3, length=5, max_series=10)
    gathered = WindowState(window=3, length=5, max_series=10)
    for names, values in batches[:20]:
        full, windows = _push(replayed, names, values, gather=False)
        assert windows.shape == (0, 3)
        assert full.shape == (len(names),)
        _push(gathered, names, values)
    for names, values in batches[20:]:
        full_r, windows_r = _push(replayed, names, values)
        full_g, windows_g = _push(gathered, names, values)
        np.testing.assert_array_equal(full_r, full_g)
        np.testing.assert_array_equal(windows_r, windows_g)


def test_windows_are_nan_for_series_not_yet_full() -> None:
    state = WindowState(window=3, max_series=10)
    _push(state, ["a", "b", "a", "a", "b"], [1.0, 5.0, 2.0, 3.0, 6.0])
    out = state.windows(["b", "a"])
    assert np.isnan(out[0]).all()
    assert out[1].tolist() == [1.0, 2.0, 3.0]


def _filled(window: int, length: int, *, max_series: int = 10) -> tuple[WindowState, History]:
    """A state with a long series, a short one, one with a slot and no values."""
    state = WindowState(window=window, length=length, max_series=max_series)
    history: History = {}
    _assert_push_matches(state, history, ["long"] * 100, [float(i) for i in range(100)])
    _assert_push_matches(state, history, ["short"] * 2, [0.5, 1.5])
    state.slots_for(["empty"])
    state.last_id = b"1700000000000-7"
    return state, history


def _save(state: WindowState, into: dict[bytes, bytes] | None = None) -> dict[bytes, bytes]:
    """What the worker writes at a stop: every changed chunk, one at a time, then meta."""
    fields = {} if into is None else into
    while (k := state.due_chunk(0.0, 0)) is not None:
        fields.update(state.save_chunk(k, 0.0))
    fields[META] = state.meta()
    return fields


def _restore(fields: dict[bytes, bytes], **kwargs: Any) -> WindowState:
    return WindowState.restore(fields.get, **kwargs)


def test_checkpoint_round_trip() -> None:
    state, _ = _filled(window=3, length=5)
    restored = _restore(_save(state), window=3, length=5, max_series=10)
    assert restored.names() == ["long", "short", "empty"]
    assert restored.last_id == b"1700000000000-7"
    names = ["long", "short", "empty"]
    np.testing.assert_array_equal(restored.windows(names), state.windows(names))
    for names, values in _random_batches(seed=3, n_batches=10, pool=4):
        full, windows = _push(state, names, values)
        full_r, windows_r = _push(restored, names, values)
        np.testing.assert_array_equal(full_r, full)
        np.testing.assert_array_equal(windows_r, windows)


def test_empty_state_round_trip() -> None:
    restored = _restore(_save(WindowState(window=2, max_series=5)), window=2, max_series=5)
    assert restored.names() == []
    assert restored.last_id == b"0-0"


def test_only_changed_chunks_are_saved_each_in_its_turn() -> None:
    """The cost of a checkpoint follows what changed: one chunk at a time, the one
    saved longest ago first, and only once ``interval_s`` has passed since its save."""
    state = WindowState(window=2, max_series=4 * CHUNK)
    slots = state.slots_for([f"s{i}" for i in range(3 * CHUNK)])  # chunks 0, 1, 2
    state.push(slots, np.zeros(slots.size))
    state.last_id = b"10-0"
    saved = []
    while (k := state.due_chunk(0.0, 5.0)) is not None:
        state.save_chunk(k, 0.0)
        saved.append(k)
    assert saved == [0, 1, 2]
    assert state.due_chunk(100.0, 5.0) is None  # nothing changed since
    state.push(state.slots_for([f"s{CHUNK + 1}"]), np.ones(1))  # chunk 1 only
    state.last_id = b"11-0"
    assert state.due_chunk(1.0, 5.0) is None  # saved 1 s ago: not yet
    assert state.due_chunk(5.0, 5.0) == 1
    fields = state.save_chunk(1, 5.0)
    assert set(fields) == {chunk_field(1), META}
    # One chunk's bytes: per series 2 values, count, last_ms, position; and its name.
    assert len(fields[chunk_field(1)]) < CHUNK * (5 * 8 + 10) + 1024


def test_a_restore_re_reads_from_the_oldest_unsaved_change_and_skips_what_chunks_hold() -> None:
    """Chunk 0 saved at entry 5-0, then changed at 6-0 and not saved again; chunk 1
    saved at 6-0. A restore re-reads from 5-0: series of chunk 1 skip the entries up to
    6-0 (they hold them), those of chunk 0 take them."""
    state = WindowState(window=2, length=3, max_series=2 * CHUNK)
    names = [f"s{i}" for i in range(CHUNK + 1)]  # s0 .. in chunk 0, the last in chunk 1
    fields: dict[bytes, bytes] = {}
    state.push(state.slots_for(names), np.zeros(len(names)))
    state.last_id = b"5-0"
    _save(state, fields)
    state.push(state.slots_for(["s0", f"s{CHUNK}"]), np.array([1.0, 1.0]))  # entries 6-0, 6-1
    state.last_id = b"6-1"
    fields.update(state.save_chunk(1, 0.0))  # chunk 1 only
    restored = _restore(fields, window=2, length=3, max_series=2 * CHUNK)
    assert restored.last_id == b"5-0"
    slots = restored.slots_for(["s0", f"s{CHUNK}", "new"])
    held = restored.holds(slots, [b"6-0", b"6-1", b"6-2"])
    assert held.tolist() == [False, True, False]
    restored.push(slots[[0, 2]], np.array([1.0, 2.0]))  # what the re-read takes in
    assert restored.due_chunk(0.0, 0) is None  # not saved while series differ in age
    restored.reread_done()
    assert restored.due_chunk(0.0, 0) is not None
    assert not restored.holds(slots, [b"6-0", b"6-1", b"6-2"]).any()


def test_a_chunk_unchanged_since_its_save_holds_up_to_the_re_read_entry() -> None:
    """Both chunks saved at 5-0; only chunk 1 changes (at 6-0) and is saved again. The
    re-read starts after 6-0, and chunk 0's series hold up to there though its stamp
    says 5-0: the meta field, not a stamp per chunk, carries that."""
    state = WindowState(window=2, length=3, max_series=2 * CHUNK)
    names = [f"s{i}" for i in range(CHUNK + 1)]
    state.push(state.slots_for(names * 2), np.zeros(2 * len(names)))
    state.last_id = b"5-0"
    fields = _save(state)
    state.push(state.slots_for([f"s{CHUNK}"]), np.ones(1))
    state.last_id = b"6-0"
    fields.update(state.save_chunk(1, 0.0))
    assert len(fields[META]) < 200  # whatever the number of chunks
    restored = _restore(fields, window=2, length=3, max_series=2 * CHUNK)
    assert restored.last_id == b"6-0"
    slots = restored.slots_for(["s0", f"s{CHUNK}"])
    assert restored.holds(slots, [b"6-0", b"6-0"]).tolist() == [True, True]
    assert restored.holds(slots, [b"6-1", b"6-1"]).tolist() == [False, False]
    assert restored.windows(["s0", f"s{CHUNK}"]).tolist() == [[0.0, 0.0], [0.0, 1.0]]


def test_a_series_idle_past_idle_ms_starts_afresh_and_its_slot_is_freed() -> None:
    state = WindowState(window=2, length=3, max_series=2, idle_ms=1000)
    a, b = state.slots_for(["a", "b"]).tolist()
    state.push(np.array([a, a, b]), np.array([1.0, 2.0, 9.0]), ms=np.array([0, 100, 100]))
    assert state.fresh.tolist() == [False, False, False]
    full, _ = state.push(np.array([a]), np.array([3.0]), ms=np.array([2000]))  # a: idle 1.9 s
    assert full.tolist() == [False]  # a fresh start: one value
    assert state.fresh.tolist() == [True]  # its scoring starts afresh too (tests/test_scoring.py)
    assert state.slots_for(["c"]).tolist() == [NO_SLOT]  # full up
    assert state.sweep(now_ms=2000).tolist() == [b]  # b: idle since 100
    assert state.names() == ["a", None]
    assert state.slots_for(["c"]).tolist() == [b]  # junk names cannot hold slots for ever
    full, windows = state.push(np.array([b, b]), np.array([5.0, 6.0]), ms=np.array([2001, 2002]))
    assert windows.tolist() == [[5.0, 6.0]]  # c does not inherit b's values
    restored = _restore(_save(state), window=2, length=3, max_series=2, idle_ms=1000)
    assert restored.names() == ["a", "c"]


def test_restore_with_a_smaller_window_keeps_the_latest_values() -> None:
    state, history = _filled(window=5, length=5)
    restored = _restore(_save(state), window=3, max_series=10)
    assert (restored.window, restored.length) == (3, 3)
    assert restored.windows(["long"]).tolist() == [[97.0, 98.0, 99.0]]
    for names, values in _random_batches(seed=4, n_batches=10, pool=4):
        names = [n.replace("s0", "long").replace("s1", "short") for n in names]
        _assert_push_matches(restored, history, names, values)


def test_restore_with_a_larger_length_is_full_only_where_history_reaches() -> None:
    state, _ = _filled(window=3, length=8)
    restored = _restore(_save(state), window=6, length=10, max_series=10)
    windows = restored.windows(["long", "short", "empty"])
    assert windows[0].tolist() == [94.0, 95.0, 96.0, 97.0, 98.0, 99.0]
    assert np.isnan(windows[1:]).all()
    full, out = _push(restored, ["short"] * 4, [2.5, 3.5, 4.5, 5.5])
    assert full.tolist() == [False, False, False, True]
    assert out.tolist() == [[0.5, 1.5, 2.5, 3.5, 4.5, 5.5]]


def test_restore_with_a_window_longer_than_the_kept_history_is_not_full() -> None:
    state, _ = _filled(window=3, length=3)  # only 3 values of "long" were kept
    restored = _restore(_save(state), window=4, max_series=10)
    assert np.isnan(restored.windows(["long"])).all()
    full, out = _push(restored, ["long"], [100.0])
    assert full.tolist() == [True]
    assert out.tolist() == [[97.0, 98.0, 99.0, 100.0]]


def _other_format() -> bytes:
    return bytes(st_save({"weight": np.zeros((2, 2), dtype=np.float32)}, metadata={"f": "pt"}))


def _chunk(
    series: str,
    values: np.ndarray,
    count: np.ndarray,
    *,
    version: str = "3",
    last_ms: np.ndarray | None = None,
    pos: np.ndarray | None = None,
) -> bytes:
    n = values.shape[0]
    meta = {"format": "attnlstm-state", "format_version": version, "series": series,
            "stamp": "1-0"}  # fmt: skip
    last_ms = np.zeros(n, dtype=np.int64) if last_ms is None else last_ms
    pos = np.arange(n, dtype=np.int64) if pos is None else pos
    tensors = {"values": values, "count": count, "last_ms": last_ms, "pos": pos}
    return bytes(st_save(tensors, metadata=meta))


DEEP = b"[" * 100_000 + b"]" * 100_000  # JSON nested past Python's recursion limit


def _with_meta(**changes: object) -> Callable[[bytes], bytes]:
    def make(good: bytes) -> bytes:
        return json.dumps({**json.loads(good), **changes}).encode()

    return make


@pytest.mark.parametrize(
    ("field", "make"),
    [
        (chunk_field(0), lambda good: b""),
        (chunk_field(0), lambda good: b"not a checkpoint at all"),
        (chunk_field(0), lambda good: np.random.default_rng(0).bytes(500)),
        (chunk_field(0), lambda good: good[:4]),
        (chunk_field(0), lambda good: good[:40]),
        (chunk_field(0), lambda good: good[:-8]),
        (chunk_field(0), lambda good: _other_format()),
        (chunk_field(0), lambda good: _chunk("[]", np.zeros((0, 3)), np.zeros(0), version="1")),
        (chunk_field(0), lambda good: (2).to_bytes(8, "little") + b"[]"),
        (chunk_field(0), lambda good: _chunk("5", np.zeros((1, 3)), np.zeros(1, dtype=np.int64))),
        (chunk_field(0), lambda good: _chunk('["a"]', np.zeros((1, 3)), np.zeros(2, np.int64))),
        (chunk_field(0), lambda good: _chunk('["a"]', np.zeros((1, 3)), -np.ones(1, np.int64))),
        (chunk_field(0), lambda good: len(DEEP).to_bytes(8, "little") + DEEP),
        (
            chunk_field(0),
            lambda good: _chunk(DEEP.decode(), np.zeros((1, 3)), np.ones(1, np.int64)),
        ),
        (META, lambda good: b"{}"),
        (META, lambda good: b"[1, 2]"),
        (META, _with_meta(format_version="1")),
        (META, _with_meta(chunk=CHUNK // 2)),
        (META, _with_meta(last_id="yesterday")),
        (META, _with_meta(chunks=[[0, 1]])),  # chunk 1 is missing
        (META, _with_meta(chunks=[[0, 10**12]])),  # past max_series: not a long loop
        (META, _with_meta(chunks=[[0, 0], [0, 0]])),  # chunk 0 twice
        (META, _with_meta(chunks={"0": 0})),
        (META, lambda good: DEEP),
    ],
    ids=[
        "empty",
        "text",
        "random",
        "len-cut",
        "header-cut",
        "data-cut",
        "other",
        "version",
        "header-list",
        "series-not-a-list",
        "count-too-long",
        "negative-count",
        "header-nested",
        "series-nested",
        "meta-empty",
        "meta-list",
        "meta-version",
        "meta-chunk",
        "meta-id",
        "meta-missing-chunk",
        "meta-chunks-past-max-series",
        "meta-chunk-twice",
        "meta-chunks-not-a-list",
        "meta-nested",
    ],
)
def test_unreadable_checkpoints_raise_state_error(
    field: bytes, make: Callable[[bytes], bytes]
) -> None:
    fields = _save(_filled(window=3, length=5)[0])
    fields[field] = make(fields[field])
    with pytest.raises(StateError):
        _restore(fields, window=3, length=5, max_series=10)


def _one_series(
    values: np.ndarray | None = None,
    count: np.ndarray | None = None,
    last_ms: np.ndarray | None = None,
    pos: np.ndarray | None = None,
) -> bytes:
    """A chunk of one series, "a", that has seen its three values; or those given."""
    values = np.array([[1.0, 2.0, 3.0]]) if values is None else values
    count = np.array([3]) if count is None else count
    return _chunk('["a"]', values, count, last_ms=last_ms, pos=pos)


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        ({"values": np.array([[1.0, np.nan, 3.0]])}, "values that are not finite"),
        ({"values": np.array([[1.0, 2.0, -np.inf]])}, "values that are not finite"),
        ({"values": np.ones((1, 3), dtype=np.float32)}, "values of dtype float32, not float64"),
        ({"count": np.array([np.nan])}, "count of dtype float64, not int64"),
        ({"count": np.array([3.0])}, "count of dtype float64, not int64"),
        ({"last_ms": np.array([-1])}, "counts or times out of range"),
        ({"last_ms": np.array([0.0])}, "last_ms of dtype float64, not int64"),
        ({"pos": np.array([0], dtype=np.int32)}, "pos of dtype int32, not int64"),
    ],
    ids=["nan", "inf", "float32", "count-nan", "count-float", "negative-ms", "ms-float", "pos-32"],
)
def test_a_chunk_of_numbers_no_series_can_have_is_refused(
    arrays: dict[str, np.ndarray], reason: str
) -> None:
    """Restored, a non-finite value made every forecast of its series non-finite (each
    entry then dead-lettered), and a NaN count became -2**63: a series never forecast
    again. The worker rebuilds from the stream instead."""
    fields = _save(_filled(window=3, length=5)[0])
    _restore(fields | {chunk_field(0): _one_series()}, window=3, length=5, max_series=10)
    with pytest.raises(StateError, match=reason):
        _restore(
            fields | {chunk_field(0): _one_series(**arrays)}, window=3, length=5, max_series=10
        )


def test_the_places_before_a_short_series_first_value_are_not_checked() -> None:
    """A series that has seen fewer values than the chunk's width never reads the places
    before its first: they fill before its window is full (saved, they hold zeros or an
    idle series' old values). Only the values it has are checked."""
    fields = _save(_filled(window=3, length=5)[0])
    values = np.array([[np.nan, np.nan, 7.0]])
    fields[chunk_field(0)] = _one_series(values=values, count=np.array([1]))
    restored = _restore(fields, window=3, length=5, max_series=10)
    _push(restored, ["a", "a"], [8.0, 9.0])
    assert restored.windows(["a"]).tolist() == [[7.0, 8.0, 9.0]]
    names, histories = restored.histories()
    assert names == ["a"]
    assert histories[0].tolist() == [7.0, 8.0, 9.0]


def test_more_series_than_the_new_max_series_raise_state_error() -> None:
    fields = _save(_filled(window=3, length=5)[0])
    _restore(fields, window=3, max_series=3)  # exactly enough
    # Said as what it is: a review read the message as a damaged checkpoint.
    with pytest.raises(StateError, match=r"max_series \(2\): saved with more series than"):
        _restore(fields, window=3, max_series=2)


def test_window_longer_than_length_is_refused() -> None:
    with pytest.raises(ValueError, match="window <= length"):
        WindowState(window=5, length=4, max_series=1)


def test_a_chunk_quiet_since_an_old_save_is_re_read_from_its_change_not_its_save() -> None:
    """Chunk 0 saved at 5-0, untouched until 900-0: its saved copy holds its series up
    to there, so the re-read starts there, not at 5-0 (a day of stream, in life)."""
    state = WindowState(window=2, length=3, max_series=2 * CHUNK)
    state.push(state.slots_for(["a", "a"]), np.zeros(2))
    state.last_id = b"5-0"
    fields = _save(state)
    state.last_id = b"900-0"  # other chunks' entries went by
    state.push(state.slots_for(["a"]), np.ones(1))
    assert json.loads(state.meta())["last_id"] == "900-0"
    restored = _restore(fields | {META: state.meta()}, window=2, length=3, max_series=2 * CHUNK)
    assert restored.windows(["a"]).tolist() == [[0.0, 0.0]]  # the value at 900-1 comes again


def test_only_the_first_history_series_keep_a_history_and_every_series_its_window() -> None:
    """``history_series`` bounds the history (whole chunks of series keep one); every
    series still forecasts from its full window, before and after a checkpoint, and
    restored with another ``history_series`` the windows are unchanged."""
    pool = 3 * CHUNK
    state = WindowState(window=3, length=6, max_series=4 * CHUNK, history_series=CHUNK + 1)
    assert state.history_slots == 2 * CHUNK
    history: History = {}
    names = [f"s{i}" for i in range(pool)]
    for step in range(8):  # 8 values each, one round a batch, every window checked
        _assert_push_matches(state, history, names, [step * 1000.0 + i for i in range(pool)])
    kept, values = state.histories()
    assert kept == names[: 2 * CHUNK]  # the first two chunks' series, in slot order
    assert [v.tolist() for v in values] == [history[name][-6:] for name in kept]
    fields = _save(state)
    widths = [st_load(fields[chunk_field(k)])["values"].shape for k in range(3)]
    assert widths == [(CHUNK, 6), (CHUNK, 6), (CHUNK, 3)]  # histories, then windows only
    for history_series in (CHUNK + 1, 1, None):
        restored = _restore(
            fields, window=3, length=6, max_series=4 * CHUNK, history_series=history_series
        )
        np.testing.assert_array_equal(restored.windows(names), state.windows(names))
        kept, values = restored.histories()
        assert kept == names[: restored.history_slots]
        # A series saved with its window only has only that once it keeps a history.
        assert [v.tolist() for v in values] == [
            history[name][-(6 if i < 2 * CHUNK else 3) :] for i, name in enumerate(kept)
        ]


def test_scoring_saved_with_a_chunk_comes_back_with_its_slots() -> None:
    """A chunk carries what ``scoring`` gives for its series, beside their windows; a
    chunk saved without (by an earlier version) restores its windows alone."""
    state = WindowState(window=2, max_series=2 * CHUNK)
    names = [f"s{i}" for i in range(CHUNK + 2)]  # chunk 0 full, two in chunk 1
    slots = state.slots_for(names)
    state.push(slots, np.arange(slots.size, dtype=np.float64))
    state.last_id = b"3-0"
    per_slot = np.arange(2 * CHUNK, dtype=np.float64) * 0.5
    fields = state.save_chunk(0, 0.0, lambda s: {"log_m": per_slot[s], "quiet": s % 3})
    fields |= state.save_chunk(1, 0.0)  # without
    restored = _restore(fields, window=2, max_series=2 * CHUNK)
    assert restored.restored
    ((got_slots, got),) = restored.restored_scoring  # chunk 0's only
    np.testing.assert_array_equal(got_slots, np.arange(CHUNK))
    np.testing.assert_array_equal(got["log_m"], per_slot[:CHUNK])
    np.testing.assert_array_equal(got["quiet"], np.arange(CHUNK) % 3)
    np.testing.assert_array_equal(restored.windows(names), state.windows(names))
    assert not WindowState(window=2, max_series=1).restored


def test_a_chunk_whose_scoring_does_not_match_its_series_is_refused() -> None:
    state = WindowState(window=2, max_series=CHUNK)
    slots = state.slots_for(["a", "b"])
    state.push(slots, np.ones(2))
    fields = state.save_chunk(0, 0.0, lambda s: {"log_m": np.zeros(s.size + 1)})
    with pytest.raises(StateError, match="scoring"):
        _restore(fields, window=2, max_series=CHUNK)


def test_a_value_replaced_is_replaced_in_its_window_and_history_where_they_hold_it() -> None:
    state = WindowState(window=3, length=5, max_series=2, idle_ms=1000)
    slots = state.slots_for(["a", "b"])
    state.push(slots[[0, 0, 0, 0, 1]], np.array([1.0, 2.0, 3.0, 4.0, 9.0]), ms=np.zeros(5, int))
    assert state.replace(int(slots[0]), 1, 30.0)  # the 3 before the newest, 4
    assert state.replace(int(slots[0]), 3, 10.0)  # the 1: out of the window, in the history
    assert state.windows(["a"]).tolist() == [[2.0, 30.0, 4.0]]
    names, histories = state.histories()
    assert histories[names.index("a")].tolist() == [10.0, 2.0, 30.0, 4.0]
    assert not state.replace(int(slots[0]), 4, 0.0)  # before the series' first value
    # b idle for 2 s: its next value starts it afresh, and the one before is in neither.
    state.push(slots[[1]], np.array([5.0]), ms=np.array([2000]))
    assert not state.replace(int(slots[1]), 1, 0.0)
    assert state.histories()[1][names.index("b")].tolist() == [5.0]


def _back_in_another_chunk() -> tuple[dict[bytes, bytes], list[str], np.ndarray]:
    """Chunks 0 (full) and 1 saved; s5 goes idle, its slot is freed and taken by "y", s5
    comes back in chunk 1, which is saved again; the worker stops before chunk 0 is: its
    saved copy still holds s5. What is saved, chunk 0's other series, and their windows
    as saved."""
    state = WindowState(window=2, max_series=4 * CHUNK, idle_ms=1000)
    names = [f"s{i}" for i in range(CHUNK + 1)]  # chunk 0 full, one series in chunk 1
    ms = np.full(len(names), 1000, dtype=np.int64)
    state.push(state.slots_for(names * 2), np.arange(2.0 * len(names)), ms=np.r_[ms, ms])
    state.last_id = b"1000-300"
    fields: dict[bytes, bytes] = {}
    for k in (0, 1):  # each series' scoring: its slot
        fields |= state.save_chunk(k, 0.0, lambda s: {"slot": s})
    others = [n for n in names if n != "s5"]
    saved = state.windows(others[: CHUNK - 1])
    state.push(state.slots_for(others), np.ones(len(others)), ms=np.full(len(others), 5000))
    state.last_id = b"5000-200"
    assert state.sweep(now_ms=5000).tolist() == [5]
    state.push(state.slots_for(["y", "s5", "s5"]), np.array([7.0, 8.0, 9.0]), ms=np.full(3, 5001))
    state.last_id = b"5001-2"
    assert state.slots_for(["y", "s5"]).tolist() == [5, CHUNK + 1]
    fields |= state.save_chunk(1, 0.0, lambda s: {"slot": s})  # and the meta: not chunk 0
    return fields, others[: CHUNK - 1], saved


def test_a_series_saved_in_two_chunks_comes_back_as_its_later_copy() -> None:
    """Restored, s5 is chunk 1's copy, saved later; chunk 0's, from before s5 went idle,
    is dropped, and its slot goes to the next new series, as it went (before, the state
    was refused, and every window rebuilt from the stream)."""
    fields, chunk_0, saved = _back_in_another_chunk()
    restored = _restore(fields, window=2, max_series=4 * CHUNK, idle_ms=1000)
    assert restored.series_count == CHUNK + 1  # y was saved in no chunk
    assert restored.windows(["s5"]).tolist() == [[8.0, 9.0]]
    np.testing.assert_array_equal(restored.windows(chunk_0), saved)
    slots = np.concatenate([s for s, _ in restored.restored_scoring])
    scored = np.concatenate([arrays["slot"] for _, arrays in restored.restored_scoring])
    assert sorted(slots.tolist()) == [s for s in range(CHUNK + 2) if s != 5]  # s5's old, not
    np.testing.assert_array_equal(scored, slots)
    assert restored.slots_for(["y", "s5"]).tolist() == [5, CHUNK + 1]
    # Chunk 0's series take the re-read's entries; chunk 1's hold them already.
    held = restored.holds(restored.slots_for(["s0", "s5"]), [b"5000-0", b"5001-1"])
    assert held.tolist() == [False, True]
    # The other way round, the later copy in the lower chunk: the chunks' bytes swapped.
    swapped = {chunk_field(0): fields[chunk_field(1)], chunk_field(1): fields[chunk_field(0)]}
    restored = _restore(fields | swapped, window=2, max_series=4 * CHUNK, idle_ms=1000)
    assert restored.series_count == CHUNK + 1
    assert restored.windows(["s5"]).tolist() == [[8.0, 9.0]]


def test_one_series_in_two_chunks_of_one_stamp_is_refused() -> None:
    """No series went idle and came back between two saves at one entry: corrupt."""
    one = np.zeros((1, 2))
    fields = {
        chunk_field(0): _chunk('["a"]', one, np.ones(1, np.int64)),
        chunk_field(1): _chunk('["a"]', one, np.ones(1, np.int64)),
        META: _with_meta(chunks=[[0, 1]])(_save(WindowState(window=2, max_series=1))[META]),
    }
    with pytest.raises(StateError, match="'a' saved twice at entry 1-0"):
        _restore(fields, window=2, max_series=2 * CHUNK)
    fields[chunk_field(1)] = _chunk('["a", "b"]', np.zeros((2, 2)), np.ones(2, np.int64),
                                    pos=np.zeros(2, np.int64))  # fmt: skip
    with pytest.raises(StateError, match="a slot saved twice"):
        _restore(fields, window=2, max_series=2 * CHUNK)


def test_a_checkpoint_holding_an_entry_id_past_int64_is_refused() -> None:
    """Redis ids are two unsigned 64-bit numbers; the windows hold them as int64. Such an
    entry is dead-lettered (worker.contract), yet the windows' last entry, and so the
    stamps saved, may be it: refused (the worker rebuilds from the stream), where the
    restore raised OverflowError, at every start."""
    for last_id in (b"1700000000000-9223372036854775808", b"9223372036854775808-0"):
        state, _ = _filled(window=3, length=5)
        state.last_id = last_id
        with pytest.raises(StateError, match="past what the windows hold"):
            _restore(_save(state), window=3, length=5, max_series=10)


def test_idle_by_a_clock_past_int64_frees_every_slot() -> None:
    """After an entry id of 2**63 ms or more (dead-lettered), the stream's clock is there."""
    state = WindowState(window=2, max_series=4, idle_ms=1000)
    state.push(state.slots_for(["a", "b"]), np.ones(2), ms=np.array([5, 2000]))
    assert state.sweep(now_ms=2**63).tolist() == [0, 1]


def test_a_chunk_of_no_series_claiming_a_huge_width_costs_nothing() -> None:
    """Its values, (0, 2**40), take no bytes; checking them took a mask of that width
    (8 TiB: MemoryError, not StateError, at every start)."""
    fields = _save(WindowState(window=2, max_series=1))
    empty = _chunk("[]", np.zeros((0, 2**40)), np.zeros(0, np.int64))
    fields |= {chunk_field(0): empty, META: _with_meta(chunks=[[0, 0]])(fields[META])}
    assert _restore(fields, window=2, max_series=1).names() == []


def test_entries_put_aside_are_in_the_meta_until_the_re_read_starts_past_them() -> None:
    state = WindowState(window=2, max_series=CHUNK)
    state.push(state.slots_for(["a"]), np.ones(1))
    state.last_id = b"5-0"
    fields = _save(state)
    state.push(state.slots_for(["a"]), np.ones(1))  # chunk 0 changed at 5-0
    state.last_id = b"7-0"
    state.put_aside.add(b"6-0")
    fields[META] = state.meta()
    restored = _restore(fields, window=2, max_series=CHUNK)
    assert (restored.last_id, restored.put_aside) == (b"5-0", {b"6-0"})
    _save(state, fields)  # the re-read starts after 7-0 now
    assert _restore(fields, window=2, max_series=CHUNK).put_aside == set()
    assert state.put_aside == set()
