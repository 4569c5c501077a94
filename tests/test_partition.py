"""Partitions: the hash a producer computes, the keys of one partition, and a worker on
each partition's streams."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import redis
from redis.crc import key_slot

from attnlstm.model import AttentionLSTM
from attnlstm.partition import partition_of
from attnlstm.synthetic import sine_steps
from tests.helpers import (
    WorkerThread,
    assert_forecasts,
    drained,
    entries,
    expected,
    new_worker,
    settings_for,
)
from worker.keys import Keys
from worker.tools.replay import replay


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


def test_a_worker_on_each_partition_forecasts_every_series_once(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str, trained_sines: AttentionLSTM
) -> None:
    """P streams, one worker on each (its partition's stream names), all at once; the
    models keys are shared. Each partition's output is the offline model's forecast of
    its series, one per input."""
    partitions, values = 3, sine_steps(30, 40, seed=31)  # (steps, series)
    names = [f"s{j}" for j in range(values.shape[1])]
    flat = [
        (b"series", name.encode(), b"value", repr(float(v)).encode())
        for row in values
        for name, v in zip(names, row, strict=True)
    ]
    base = Keys.prefixed(stream_prefix)
    replay(redis_client, base.input, flat, rate=None, partitions=partitions)
    with contextlib.ExitStack() as running:
        workers = [
            running.enter_context(
                WorkerThread(
                    new_worker(
                        settings_for(redis_url, base.partition(k, partitions), consumer=f"w{k}"),
                        trained_sines,
                    )
                )
            )
            for k in range(partitions)
        ]
        for k, worker in enumerate(workers):
            worker.wait_for(lambda: drained(redis_client, base.partition(k, partitions)))  # noqa: B023
    for k in range(partitions):
        keys = base.partition(k, partitions)
        mine = [j for j, name in enumerate(names) if partition_of(name, partitions) == k]
        ids = [entry_id for entry_id, _ in entries(redis_client, keys.input)]
        assert_forecasts(redis_client, keys.output, expected(trained_sines, values[:, mine], ids))
