"""The rolling windows match per-series Python lists, grow without losing data, and
survive a checkpoint round trip, including one to a different window or length."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from worker.state import NO_SLOT, StateError, WindowState

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


@pytest.mark.parametrize(("window", "length"), [(1, 1), (4, 4), (4, 7), (5, 13)])
def test_push_matches_the_reference_with_repeats_in_a_batch(window: int, length: int) -> None:
    state = WindowState(window=window, length=length, max_series=100)
    history: History = {}
    for names, values in _random_batches(seed=window + length, n_batches=60, pool=6):
        _assert_push_matches(state, history, names, values)
    assert sorted(state.names()) == sorted(history)
    names = state.names()
    np.testing.assert_array_equal(
        state.windows(names), np.array([history[n][-window:] for n in names])
    )


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


def test_checkpoint_round_trip() -> None:
    state, _ = _filled(window=3, length=5)
    restored = WindowState.from_bytes(state.to_bytes(), window=3, length=5, max_series=10)
    assert restored.names() == ["long", "short", "empty"]
    assert restored.last_id == b"1700000000000-7"
    np.testing.assert_array_equal(restored.windows(state.names()), state.windows(state.names()))
    for names, values in _random_batches(seed=3, n_batches=10, pool=4):
        full, windows = _push(state, names, values)
        full_r, windows_r = _push(restored, names, values)
        np.testing.assert_array_equal(full_r, full)
        np.testing.assert_array_equal(windows_r, windows)


def test_empty_state_round_trip() -> None:
    restored = WindowState.from_bytes(
        WindowState(window=2, max_series=5).to_bytes(), window=2, max_series=5
    )
    assert restored.names() == []
    assert restored.last_id == b"0-0"


def test_restore_with_a_smaller_window_keeps_the_latest_values() -> None:
    state, history = _filled(window=5, length=5)
    restored = WindowState.from_bytes(state.to_bytes(), window=3, max_series=10)
    assert (restored.window, restored.length) == (3, 3)
    assert restored.windows(["long"]).tolist() == [[97.0, 98.0, 99.0]]
    for names, values in _random_batches(seed=4, n_batches=10, pool=4):
        names = [n.replace("s0", "long").replace("s1", "short") for n in names]
        _assert_push_matches(restored, history, names, values)


def test_restore_with_a_larger_length_is_full_only_where_history_reaches() -> None:
    state, _ = _filled(window=3, length=8)
    restored = WindowState.from_bytes(state.to_bytes(), window=6, length=10, max_series=10)
    windows = restored.windows(["long", "short", "empty"])
    assert windows[0].tolist() == [94.0, 95.0, 96.0, 97.0, 98.0, 99.0]
    assert np.isnan(windows[1:]).all()
    full, out = _push(restored, ["short"] * 4, [2.5, 3.5, 4.5, 5.5])
    assert full.tolist() == [False, False, False, True]
    assert out.tolist() == [[0.5, 1.5, 2.5, 3.5, 4.5, 5.5]]


def test_restore_with_a_window_longer_than_the_kept_history_is_not_full() -> None:
    state, _ = _filled(window=3, length=3)  # only 3 values of "long" were kept
    restored = WindowState.from_bytes(state.to_bytes(), window=4, max_series=10)
    assert np.isnan(restored.windows(["long"])).all()
    full, out = _push(restored, ["long"], [100.0])
    assert full.tolist() == [True]
    assert out.tolist() == [[97.0, 98.0, 99.0, 100.0]]


def _other_format() -> bytes:
    return bytes(st_save({"weight": np.zeros((2, 2), dtype=np.float32)}, metadata={"f": "pt"}))


def _other_version() -> bytes:
    meta = {"format": "attnlstm-state", "format_version": "2", "last_id": "1-0", "series": "[]"}
    tensors = {"values": np.zeros((0, 3)), "count": np.zeros(0, dtype=np.int64)}
    return bytes(st_save(tensors, metadata=meta))


@pytest.mark.parametrize(
    "make",
    [
        lambda good: b"",
        lambda good: b"not a checkpoint at all",
        lambda good: np.random.default_rng(0).bytes(500),
        lambda good: good[:4],
        lambda good: good[:40],
        lambda good: good[:-8],
        lambda good: _other_format(),
        lambda good: _other_version(),
    ],
    ids=["empty", "text", "random", "len-cut", "header-cut", "data-cut", "other", "version"],
)
def test_unreadable_bytes_raise_state_error(make: Callable[[bytes], bytes]) -> None:
    good = _filled(window=3, length=5)[0].to_bytes()
    with pytest.raises(StateError):
        WindowState.from_bytes(make(good), window=3, length=5, max_series=10)


def test_more_series_than_the_new_max_series_raise_state_error() -> None:
    data = _filled(window=3, length=5)[0].to_bytes()
    WindowState.from_bytes(data, window=3, max_series=3)  # exactly enough
    with pytest.raises(StateError, match="3 series"):
        WindowState.from_bytes(data, window=3, max_series=2)


def _labelled(series: str, values: np.ndarray, count: np.ndarray) -> bytes:
    meta = {"format": "attnlstm-state", "format_version": "1", "last_id": "1-0", "series": series}
    return bytes(st_save({"values": values, "count": count}, metadata=meta))


@pytest.mark.parametrize(
    "data",
    [
        (2).to_bytes(8, "little") + b"[]",
        (1).to_bytes(8, "little") + b"5",
        _labelled("5", np.zeros((1, 3)), np.zeros(1, dtype=np.int64)),
        _labelled(json.dumps(["a"]), np.zeros((1, 3)), np.zeros(2, dtype=np.int64)),
    ],
    ids=["header-list", "header-number", "series-not-a-list", "count-too-long"],
)
def test_corrupt_checkpoint_with_a_readable_header_raises_state_error(data: bytes) -> None:
    with pytest.raises(StateError):
        WindowState.from_bytes(data, window=2, length=3, max_series=5)


def test_window_longer_than_length_is_refused() -> None:
    with pytest.raises(ValueError, match="window <= length"):
        WindowState(window=5, length=4, max_series=1)
