"""Partitions: the hash a producer computes, and the keys of one partition (the pool of
workers that serves them: tests/test_pool.py)."""

from __future__ import annotations

from collections import Counter

import pytest
from redis.crc import key_slot

from attnlstm.partition import partition_of
from worker.keys import Keys


def test_the_partition_of_a_series_is_the_crc32_of_its_utf8_id_mod_p() -> None:
    assert partition_of("123456789", 2**32) == 0xCBF43926  # CRC-32's published check value
    assert partition_of(b"123456789", 1000) == 262
    assert partition_of("Zürich/4", 2**32) == 2629700893  # UTF-8, pinned: it never changes
    assert partition_of("sensor-7", 1) == 0
    with pytest.raises(ValueError, match="at least 1"):
        partition_of("sensor-7", 0)


def test_series_spread_evenly_over_the_partitions() -> None:
    counts = Counter(partition_of(f"sensor-{i}", 12) for i in range(12_000))
    assert sorted(counts) == list(range(12))
    assert max(abs(n - 1000) for n in counts.values()) < 100  # within 10% of a fair share


def test_the_keys_of_a_partition_share_one_cluster_slot() -> None:
    keys = Keys().partition(3, 12)
    assert (keys.input, keys.output, keys.dead) == ("sensors{3}", "forecasts{3}", "sensors:dead{3}")
    assert keys.state == "sensors{3}:windows:forecasters"
    written = [keys.input, keys.output, keys.dead, keys.state, keys.lease, keys.fence]
    assert {key_slot(name.encode()) for name in [*written, keys.handling]} == {key_slot(b"{3}")}
    assert (keys.models, keys.serving) == ("models", "models:serving")  # shared
    assert len({key_slot(Keys().partition(k, 12).input.encode()) for k in range(12)}) == 12
    assert Keys().partition(0, 1) == Keys()  # one partition: the names as they are


@pytest.mark.parametrize(
    ("keys", "k", "message"),
    [
        (Keys(), 12, "partition 12 is not one of 0 .. 11"),
        (Keys(), -1, "partition -1 is not one of 0 .. 11"),
        (Keys(input="in{x}"), 0, "stream name 'in{x}' has a brace"),
        (Keys(output="out}"), 0, "stream name 'out}' has a brace"),
    ],
)
def test_a_partition_that_cannot_be_is_refused(keys: Keys, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        keys.partition(k, 12)
