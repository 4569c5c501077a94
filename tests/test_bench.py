"""``attnlstm bench`` runs end to end. Its figures are measurements, not assertions:
this only checks that every run drained what it should and the report holds up."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import os
import signal
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import torch

from attnlstm.checkpoint import load
from tests.cluster import LocalCluster
from tests.conftest import CLI
from tests.helpers import as_user, user_without, wait_for
from worker.localcluster import LocalClusterError
from worker.settings import Settings
from worker.tools import poolbench
from worker.tools.bench import (
    BenchPlan,
    _settings,
    delete_run_keys,
    format_report,
    run_bench,
    server_of,
)
from worker.tools.poolbench import PoolPlan, format_pool_report, run_pool_bench

PLAN = BenchPlan(
    entries=3_000,
    series=50,
    per_entry_entries=300,
    rate=500,
    seconds=1.0,
    repeats=2,
    scale_series=600,
)


def test_a_small_bench_drains_everything_and_reports(
    redis_url: str,
    redis_client: redis.Redis,
    model_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The drains and the latency runs: the parts that serve ``--model``."""
    caplog.set_level(logging.INFO, logger="attnlstm.bench")
    plan = dataclasses.replace(PLAN, runs=("drains", "latency"))
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
    assert f"torch's kernels {torch.backends.cpu.get_cpu_capability()})" in report["machine"]["cpu"]
    assert "models" not in report
    text = format_report(report)
    assert "| worker (batched) | 3,000 |" in text
    assert "p99" in text
    assert "Model: window 20," in text
    assert "| model served |" not in text
    # Each drain's rate is logged as it lands: a run cut short still tells what it got.
    rates = [r.getMessage() for r in caplog.records if ": drained at " in r.getMessage()]
    assert sum(m.startswith("worker: ") for m in rates) == 2
    assert len(rates) == 4 * 2 + 2  # four loops each round, then the two per-entry ways
    assert not list(redis_client.scan_iter(match="bench-*"))  # it cleans up after itself


def test_the_models_part_alone_prices_each_model(
    redis_url: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """``--runs models``: what a GPU host's few minutes are for."""
    caplog.set_level(logging.INFO, logger="attnlstm.bench")
    plan = dataclasses.replace(PLAN, runs=("models",))
    report = run_bench(plan=plan, device="cpu", url=redis_url, model=None)
    assert not {"worker", "per_entry", "latency", "latency_scale"} & set(report)
    models = {m["name"]: m for m in report["models"]}
    assert len(models) == 3
    for m in models.values():
        assert m["drain"]["entries"] == m["drain"]["forecasts"] == 3_000  # all forecast
        assert len(m["drain"]["rounds"]) == 2
        assert m["drain"]["server_cpu_s"] > 0  # what the server spent on the drain
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
    assert "weekly cycle) | 50 | 1,360 |" in text  # the day-ahead model's fine-tune
    assert "| server CPU per 100,000 entries, s (median) |" in text
    # Each model's drain against the first's, medians and round by round.
    first, day_ahead = report["models"][0]["drain"], report["models"][2]["drain"]
    paired = ", ".join(
        f"{a / b:.2f}" for a, b in zip(day_ahead["rounds"], first["rounds"], strict=True)
    )
    ratio = day_ahead["entries_per_s"] / first["entries_per_s"]
    assert f"| {ratio:.2f}x ({paired}) |" in text
    assert text.count("x (") == 2  # the first row is the baseline: "-"
    assert "worker (batched)" not in text
    assert "p99" not in text
    assert "Model: window" not in text  # the model it would serve is not what it priced
    assert "Peak RSS" in text
    # The server is named, with its allocator: which server the figures were measured on.
    info = {**redis_client.info("server"), **redis_client.info("memory")}
    assert info.get("valkey_version", info["redis_version"]) in report["server"]
    assert info["mem_allocator"] in report["server"]  # "libc" in "..., libc malloc"
    assert f"Server: {report['server']}. Peak RSS" in text
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("the worker serving ") and ": drained at " in m for m in messages) == 6
    assert sum(m.endswith(" windows/s") for m in messages) == 3
    assert not list(redis_client.scan_iter(match="bench-*"))


def test_the_bench_of_one_worker_runs_on_a_cluster(
    redis_cluster: LocalCluster, model_file: Path
) -> None:
    """Its keys were not placed in one slot: the fenced publish was refused (FCALL - all
    keys must map to the same key slot), a traceback; the latency run's worker died and
    the bench waited for its forecasts for ever."""
    plan = dataclasses.replace(
        PLAN, runs=("drains", "latency"), entries=600, per_entry_entries=50, repeats=1
    )
    model = load(model_file).model
    report = run_bench(plan=plan, device="cpu", url=redis_cluster.url, model=model)
    for run in ("worker", "raw", "raw_ahead", "raw_pipeline"):
        assert report[run]["entries"] == 600, run
    assert report["worker"]["forecasts"] == 600
    assert report["latency"]["forecasts"] == 500
    client = redis.RedisCluster.from_url(redis_cluster.url)
    # It cleans up after itself: the model stores' keys too, their tag first ({bench-...)
    assert not list(client.scan_iter(match="*bench-*"))


def test_the_bench_reads_no_attnlstm_variables_nor_a_dotenv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The README has users export ATTNLSTM_PARTITIONS=12: the bench's worker must not
    read it, nor any other setting of a deployment."""
    monkeypatch.setenv("ATTNLSTM_PARTITIONS", "12")
    monkeypatch.setenv("ATTNLSTM_DEVICE", "gpu")
    monkeypatch.setenv("ATTNLSTM_HISTORY_LEN", "50")
    (tmp_path / ".env").write_text("ATTNLSTM_BLOCK_MS=20\n")
    monkeypatch.chdir(tmp_path)
    url = "redis://localhost:1/0"
    settings = _settings(redis.Redis.from_url(url), url, "bench:", PLAN, "cpu")
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    assert settings.partitions == defaults["partitions"]
    assert settings.history_len == defaults["history_len"]
    assert settings.block_ms == defaults["block_ms"]
    assert settings.device == "cpu"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_bench_stopped_mid_latency_run_exits_with_every_process_it_started(
    signum: int, tmp_path: Path
) -> None:
    """Ctrl-C left the worker's thread retrying the embedded server gone with the bench,
    and the command never exited; SIGTERM killed it on the spot. Then the producer wrote
    on for its whole run after the bench had exited (and deleted its keys), and Ctrl-C,
    which a terminal sends to the whole process group, printed its traceback."""
    cmd = [*CLI, "bench", "--runs", "latency", "--rate", "100", "--seconds", "120",
           "--series", "5", "--scale-series", "5"]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # a group of its own, as a terminal's job: its pgid, its pid
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a shell has it
    )
    assert proc.stderr is not None
    try:
        url = ""
        for line in proc.stderr:  # until the producer runs
            url = url or line.partition(" at unix://")[2].strip()
            if "latency: warmed up; the producer runs" in line:
                break
        # and sends (imported torch: its Ctrl-C was a traceback), past the prefill
        with contextlib.closing(redis.Redis.from_url(f"unix://{url}")) as client:
            (stream,) = client.keys("*:latency:sensors")
            wait_for(lambda: client.xlen(stream) > 5 * 20, what="the producer's entries")
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # Ctrl-C, as a terminal sends it
        else:
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().endswith("attnlstm bench: interrupted")
    assert "Traceback" not in err
    wait_for(lambda: not _in_group(proc.pid), timeout=10, what="the bench's processes to go")


def _in_group(pgid: int) -> list[int]:
    """The pids of the live processes of process group ``pgid``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def test_a_bench_runs_something() -> None:
    with pytest.raises(ValueError, match="runs must be some of drains, latency, models"):
        dataclasses.replace(PLAN, runs=())
    with pytest.raises(ValueError, match=r"got \['gpu'\]"):
        dataclasses.replace(PLAN, runs=("gpu",))


def test_a_local_cluster_that_cannot_start_leaves_what_one_server_measured(
    model_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With no URL the pool bench runs on an embedded server, then on a local cluster.
    A cluster that will not start (a node's port taken every time) is a warning with the
    node's words, and the report keeps the one server's runs: before, a traceback."""

    def failing(tmp_path: Path) -> None:
        raise LocalClusterError("node 127.0.0.1:7 exited (1): Address already in use")

    monkeypatch.setattr(poolbench, "local_cluster", failing)
    caplog.set_level(logging.WARNING, logger="attnlstm.bench")
    plan = PoolPlan(workers=(1,), partitions=1, entries=200, series=4)
    report = run_pool_bench(plan=plan, device="cpu", url=None, model=load(model_file).model)
    assert [t["redis"] for t in report["targets"]] == ["one server"]
    assert report["targets"][0]["runs"][0]["pool"]["entries"] == 200
    said = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("node 127.0.0.1:7 exited (1): Address already in use")
        and m.endswith(": the bench ran on one server only")
        for m in said
    )


def test_a_small_pool_bench_drains_everything_beside_as_many_raw_clients(
    redis_url: str,
    redis_client: redis.Redis,
    redis_cluster: LocalCluster,
    model_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Pools of 1 and 2 worker processes on 4 partitions, and as many raw clients: each
    run drains every entry (timed until every group has read and acked them all), on
    one server and on a 3-master cluster."""
    caplog.set_level(logging.INFO, logger="attnlstm.bench")
    plan = PoolPlan(workers=(1, 2), partitions=4, entries=4_000, series=40)
    model = load(model_file).model
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
        one, two = (run["pool"]["entries_per_s"] for run in target["runs"])
        assert target["runs"][1]["pool_vs_one"] == round(two / one, 2)  # (run 0's is 1.0)
    rates = [r.getMessage() for r in caplog.records if "entries/s, " in r.getMessage()]
    assert [m.split(" worker(s) ")[0] for m in rates] == [
        "one server: 1",
        "one server: 2",
        "3-master cluster: 1",
        "3-master cluster: 2",
    ]  # each size's rates as it finishes
    # Each target names its server, as INFO does: the cluster by one of its nodes.
    one_server, on_cluster = (t["server"] for t in report["targets"])
    assert one_server == server_of(redis_client)
    assert on_cluster is not None
    assert on_cluster == server_of(redis_cluster.node_client(redis_cluster.ports[-1]))
    text = format_pool_report(report)
    assert f"| one server ({one_server}) | 2 |" in text
    assert f"| 3-master cluster ({on_cluster}) | 2 |" in text
    assert not list(redis_client.scan_iter(match="bench-pool-*"))  # the bench's keys are gone
    # On the cluster too, the model store's tagged first ({bench-pool-...:pool1:models}...)
    assert not list(redis_cluster.client().scan_iter(match="*bench-pool-*"))


@pytest.mark.parametrize(
    ("refused", "last_line"),
    [
        # The pool's worker: it says why and exits; the bench waited 600 s for its share.
        (
            "-zadd",
            "attnlstm bench: error: the bench's worker bench0 (pid *) stopped before every "
            "process to hold its share (exit code 1)",
        ),
        # A raw client: a traceback of a TypeError (the refusal read as entries), then
        # the bench waited for the drain.
        (
            "-xreadgroup",
            "attnlstm bench: error: a raw client of the bench stopped: Redis: User "
            "bench-xreadgroup has no permissions to run the 'xreadgroup' command; run "
            "`attnlstm bench` as a user with every right (`user admin on #SHA256 ~* &* "
            "+@all`, deploy/README.md), not as one of the services' users",
        ),
    ],
)
def test_a_pool_bench_whose_process_is_refused_a_right_stops_saying_so(
    refused: str, last_line: str, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A user without one right: the bench stops at once, with one line of its own (and
    the worker's), and leaves no key behind. (Its password in a file, out of `ps`: the
    raw clients and the pool's workers reach Redis with it, and are refused the right.)"""
    if "@" in redis_url.partition("://")[2]:
        pytest.skip("REDIS_URL names a user: this test gives its own")
    user = f"bench-{refused[1:]}"
    with user_without([redis_client], user, refused) as password:
        (tmp_path / "password").write_text(password + "\n")
        done = subprocess.run(
            [*CLI, "bench", "--workers", "1", "--partitions", "2", "--entries", "200",
             "--series", "4", "--redis-url", as_user(redis_url, user),
             "--redis-password-file", "password"],
            cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert fnmatch.fnmatchcase(done.stderr.strip().splitlines()[-1], last_line), done.stderr
    for pattern in ("bench-pool-*", "{bench-pool-*"):
        assert not list(redis_client.scan_iter(match=pattern))


def test_the_pool_s_workers_find_the_files_a_url_names_from_the_bench_s_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The workers run in another folder: a CA named relative to the bench's was not
    found there, and they retried it for ever (the bench waited 600 s)."""
    monkeypatch.chdir(tmp_path)
    url = "rediss://u:p%40ss@h:1/0?ssl_ca_certs=ca.crt&ssl_certfile=/etc/c.crt&db=0"
    assert poolbench._absolute(url) == (
        f"rediss://u:p%40ss@h:1/0?ssl_ca_certs={quote(str(tmp_path / 'ca.crt'), safe='')}"
        "&ssl_certfile=%2Fetc%2Fc.crt&db=0"
    )
    assert poolbench._absolute("unix:///run/r.sock?db=1") == "unix:///run/r.sock?db=1"


def test_a_cleanup_refused_is_an_error_not_a_warning(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """A user without SCAN: its keys left, a warning, exit 0."""
    if "@" in redis_url.partition("://")[2]:
        pytest.skip("REDIS_URL names a user: this test gives its own")
    try:
        with user_without([redis_client], "bench-no-scan", "-scan") as password:
            url = as_user(redis_url, "bench-no-scan", password)
            with contextlib.closing(redis.Redis.from_url(url)) as client:
                client.set("bench-0-0:x", "1")
                with pytest.raises(redis.exceptions.NoPermissionError, match="'scan'"):
                    delete_run_keys(client, "bench-0-0")
    finally:
        redis_client.delete("bench-0-0:x")
