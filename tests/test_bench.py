"""``attnlstm bench`` runs end to end. Its figures are measurements, not assertions:
this only checks that every run drained what it should and the report holds up."""

from __future__ import annotations

from pathlib import Path

import redis

from attnlstm.checkpoint import load
from tests.cluster import LocalCluster
from worker.tools.bench import BenchPlan, format_report, run_bench
from worker.tools.poolbench import PoolPlan, format_pool_report, run_pool_bench


def test_a_small_bench_drains_everything_and_reports(
    redis_url: str, redis_client: redis.Redis, model_file: Path
) -> None:
    plan = BenchPlan(
        entries=3_000,
        series=50,
        per_entry_entries=300,
        rate=500,
        seconds=1.0,
        repeats=2,
        scale_series=600,
    )
    keys_before = set(redis_client.scan_iter())
    report = run_bench(plan=plan, device="cpu", url=redis_url, model=load(model_file).model)
    for run in ("worker", "raw", "raw_ahead", "raw_pipeline"):
        assert report[run]["entries"] == 3_000, run
        assert len(report[run]["rounds"]) == 2
        assert report[run]["entries_per_s"] > 0
    assert report["worker"]["forecasts"] == 3_000  # windows were full before the clock ran
    assert report["per_entry"]["forecasts"] == report["one_at_a_time"]["forecasts"] == 300
    assert report["latency"]["forecasts"] == 500
    assert 0 <= report["latency"]["p50_ms"] <= report["latency"]["p99_ms"]
    assert report["latency_scale"]["forecasts"] == 500
    assert report["latency_scale"]["series"] == 600
    assert report["latency_scale"]["checkpoint_longest_ms"] > 0  # its chunks were saved
    assert report["machine"]["hiredis"] is True
    models = {m["name"]: m for m in report["models"]}
    assert len(models) == 3
    for m in models.values():
        assert m["drain"]["entries"] == m["drain"]["forecasts"] == 3_000  # all forecast
        assert m["windows_per_s"] > 0
        tune = m["finetune"]  # one fine-tune on the plan's series, the history kept for it
        assert tune["series"] == 50
        assert tune["values"] == (200 if m["context"] == 20 else 1_360)
        assert tune["seconds"] > 0
        assert tune["rss_mb"] >= tune["rss_start_mb"] > 0
    assert sorted((m["context"], m["horizon"]) for m in models.values()) == [
        (20, 1),
        (20, 1),
        (817, 48),
    ]
    text = format_report(report)
    assert "| 48 steps, lags 48/288/336 and a 2-week profile, 48 ahead, 90% intervals" in text
    assert "| worker (batched) | 3,000 |" in text
    assert "weekly cycle) | 50 | 1,360 |" in text  # the day-ahead model's fine-tune
    assert "p99" in text
    assert set(redis_client.scan_iter()) == keys_before  # it cleans up after itself


def test_a_small_pool_bench_drains_everything_beside_as_many_raw_clients(
    redis_url: str, redis_client: redis.Redis, redis_cluster: LocalCluster, model_file: Path
) -> None:
    """Pools of 1 and 2 worker processes on 4 partitions, and as many raw clients: each
    run drains every entry (timed until every group has read and acked them all), on
    one server and on a 3-master cluster."""
    plan = PoolPlan(workers=(1, 2), partitions=4, entries=4_000, series=40)
    model = load(model_file).model
    keys_before = set(redis_client.scan_iter())
    report = run_pool_bench(plan=plan, device="cpu", url=redis_url, model=model)
    cluster = run_pool_bench(plan=plan, device="cpu", url=redis_cluster.url, model=model)
    report["targets"] += cluster["targets"]
    assert [t["redis"] for t in report["targets"]] == ["one server", "3-master cluster"]
    for target in report["targets"]:
        assert [run["workers"] for run in target["runs"]] == [1, 2]
        for run in target["runs"]:
            for side in ("pool", "raw"):
                assert run[side]["entries"] == 4_000
                assert run[side]["entries_per_s"] > 0
            assert len(run["pool"]["rss_mb"]) == run["workers"]
        assert target["runs"][0]["pool_vs_one"] == 1.0
    text = format_pool_report(report)
    assert "| one server | 2 |" in text
    assert "| 3-master cluster | 2 |" in text
    assert set(redis_client.scan_iter()) == keys_before  # the bench's keys are gone
    assert not list(redis_cluster.client().scan_iter(match="bench-pool-*"))
