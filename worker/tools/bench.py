"""``attnlstm bench``: the worker's throughput and latency, beside baselines measured in
the same run on the same server.

- worker: ``attnlstm worker --burst`` draining pre-filled entries (in-process).
- raw: the same reads, publishes and acks with no validation, windows or model: the
  ceiling Redis and redis-py put on any worker written this way.
- per-entry: the worker with one model call per entry (the article's way of calling
  the model), its Redis I/O still batched; and one-at-a-time: the same with max_batch 1,
  read one entry, forecast it, publish it, the way a naive consumer serves.
- latency: a producer process writing at a steady rate while the worker runs; the
  end-to-end latency of each forecast is its entry id's time minus its input's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import multiprocessing
import os
import platform
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import redis
import torch
from pydantic import SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource
from redis.utils import HIREDIS_AVAILABLE

from attnlstm.checkpoint import Checkpoint, dumps, version_of
from attnlstm.device import cpu_info
from attnlstm.experiment import seasonal_config
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.synthetic import SineSpec, make_sines, sine_steps
from attnlstm.train import new_model
from worker.attempts import Mark
from worker.contract import BOUND_DIGITS, FORECAST_FIELDS, YHAT_DIGITS, decimal_rows, entry_ms
from worker.embedded import die_with_parent, url_or_embedded
from worker.engine import Engine, batch_rows
from worker.keys import Keys
from worker.lease import Fence, Lease, ensure_library
from worker.loop import BURST_BLOCK_MS, Worker
from worker.online.finetune import FinetuneConfig, Job, history_kept, init_process, run_job
from worker.settings import Settings
from worker.signals import deaf_children
from worker.streams import (
    Command,
    Entry,
    Wires,
    cluster_of,
    connect,
    ensure_group,
    entries_of,
    keys_on,
    primaries,
    raise_first_error,
    read_entries,
    read_group,
)
from worker.tools import RUNS
from worker.tools.served import Served

log = logging.getLogger("attnlstm.bench")


@dataclass(frozen=True)
class BenchPlan:
    entries: int = 100_000  # pre-filled entries for the drain runs
    series: int = 1_000  # series they are spread over
    per_entry_entries: int = 20_000  # the per-entry baselines are slow: fewer entries
    repeats: int = 3  # rounds of the fast drains; the median is reported
    rate: int = 2_000  # entries/s offered in the latency run
    scale_series: int = 100_000  # series in the latency run at scale (window state size)
    seconds: float = 20.0  # length of the latency run
    max_batch: int = 1024
    max_wait_ms: float = 5.0
    runs: tuple[str, ...] = RUNS  # which parts to run (a lent GPU's minutes are few)

    def __post_init__(self) -> None:
        if not self.runs or not set(self.runs) <= set(RUNS):
            raise ValueError(f"runs must be some of {', '.join(RUNS)}, got {list(self.runs)}")


class PerEntryEngine(Engine):
    """The article's way of serving: the model called once for every entry."""

    def forecast(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ys, attns = [], []
        with torch.inference_mode():
            for row in windows:
                x = torch.as_tensor(row[None], dtype=torch.float64, device=self.device)
                yhat, attn = self.model(x)
                ys.append(yhat.cpu().numpy())
                attns.append(attn.cpu().numpy())
        if not ys:
            return np.empty((0, self.horizon)), np.empty((0, self.window), dtype=np.float32)
        return np.concatenate(ys), np.concatenate(attns)


def cpu_name() -> str:
    """The CPU as a benchmark record needs it. Virtual machines often give only the brand
    ("AMD EPYC"), where one generation drains at three times another's rate, so also its
    family and model numbers where /proc/cpuinfo has them, and the kernels torch picked
    for it (AVX2, AVX512), which set both its speed and its rounding."""
    name = cpu_info("model name") or platform.processor() or platform.machine()
    family, model = cpu_info("cpu family"), cpu_info("model")
    numbers = f"family {family}, model {model}; " if family and model else ""
    return f"{name} ({numbers}torch's kernels {torch.backends.cpu.get_cpu_capability()})"


def machine() -> dict[str, Any]:
    out: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "redis_py": redis.__version__,
        "hiredis": HIREDIS_AVAILABLE,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def prefill(client: redis.Redis, stream: str, n_entries: int, n_series: int) -> None:
    """n_entries sine values, round-robin over n_series, pipelined."""
    values = sine_steps(n_series, -(-n_entries // n_series)).ravel()[:n_entries]
    for start in range(0, n_entries, 10_000):
        pipe = client.pipeline(transaction=False)
        for k in range(start, min(start + 10_000, n_entries)):
            pipe.xadd(stream, {"series": f"s{k % n_series}", "value": repr(float(values[k]))})
        pipe.execute()


def _batch(plan: BenchPlan, context: int) -> int:
    """The batch a worker with the plan's max_batch (and the default batch_values) cuts
    for a model that reads ``context`` values."""
    return batch_rows(plan.max_batch, Settings.model_fields["batch_values"].default, context)


class _BenchSettings(Settings):
    """Settings from the bench's arguments alone. ATTNLSTM_* variables and a .env belong
    to a deployment (the README has its users export ATTNLSTM_PARTITIONS) and would
    change what the bench measures, or stop it; poolbench's workers go without them too."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def _settings(
    client: redis.Redis,
    url: str,
    prefix: str,
    plan: BenchPlan,
    device: str,
    max_batch: int | None = None,
    finetune_interval_s: float = 0.0,
    coverage: float = Settings.model_fields["coverage"].default,
) -> Settings:
    settings = _BenchSettings(
        redis_url=SecretStr(url),
        finetune_interval_s=finetune_interval_s,
        coverage=coverage,
        consumer="bench",
        device=device,
        max_batch=max_batch or plan.max_batch,
        max_wait_ms=plan.max_wait_ms,
        max_series=max(plan.series, 1),
        metrics_port=0,
    )
    # On a cluster, each run's keys in one slot: unplaced, the fenced publish was refused
    # (FCALL - all keys must map to the same key slot).
    return settings.on(client).with_keys(keys_on(client, Keys.prefixed(prefix)))


def _keys(settings: Settings) -> Keys:
    """The keys the worker serves with ``settings``: its one partition's, tagged ``{0}``
    on a cluster."""
    return settings.keys.partition(0, 1)


def _drain(
    client: redis.Redis,
    settings: Settings,
    engine: Engine,
    n_entries: int,
    n_series: int,
    *,
    warm: bool = True,
) -> dict[str, Any]:
    """Fill every window first (untimed; ``warm`` False: they are full already), then
    time the drain of n_entries, each of which is forecast."""
    if warm:
        prefill(client, _keys(settings).input, n_series * engine.context, n_series)
        Worker(client, engine=engine, settings=settings, burst=True).run()
    prefill(client, _keys(settings).input, n_entries, n_series)
    cpu_before = server_cpu_s(client)
    report = Worker(client, engine=engine, settings=settings, burst=True).run()
    cpu_after = server_cpu_s(client)
    seconds = report["seconds"] - BURST_BLOCK_MS / 1000  # the last, empty read's wait
    return {
        "entries": report["read"],
        "forecasts": report["forecasts"],
        "seconds": round(seconds, 3),
        "entries_per_s": round(report["read"] / seconds, 1),
        "server_cpu_s": (
            None if cpu_before is None or cpu_after is None else round(cpu_after - cpu_before, 3)
        ),
    }


def server_of(client: redis.Redis) -> str | None:
    """The server's name, version and memory allocator as INFO gives them ("Valkey
    8.1.8, libc malloc"), so that a report says which server its figures were measured
    on. None where the server does not say: a user without INFO, a cluster (one INFO
    per node)."""
    try:
        info = {**client.info("server"), **client.info("memory")}
    except redis.ResponseError:
        return None
    if "redis_version" not in info:
        return None
    if "valkey_version" in info:  # Valkey gives both: redis_version is what it is like
        name, version = "Valkey", info["valkey_version"]
    else:
        name, version = "Redis", info["redis_version"]
    allocator = str(info.get("mem_allocator", "an allocator INFO does not name"))
    return f"{name} {version}, {'libc malloc' if allocator == 'libc' else allocator}"


def server_cpu_s(client: redis.Redis) -> float | None:
    """CPU seconds the server's main thread has used (user and system), as INFO reports
    them: what serving the worker costs the server, without its background threads
    (which free the deleted output streams of the rounds before). None where the server
    does not say: a user without INFO, a cluster (one INFO per node)."""
    try:
        info = client.info("cpu")
        return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])
    except (redis.ResponseError, KeyError, TypeError, ValueError):
        return None


def _logged(what: str, result: dict[str, Any]) -> dict[str, Any]:
    """A drain's rate as it lands: a run cut short still tells what it measured."""
    log.info("%s: drained at %s entries/s", what, f"{result['entries_per_s']:,.0f}")
    return result


def drain_raw(
    client: redis.Redis, settings: Settings, shape: Shape, *, pipeline: bool = False
) -> dict[str, float]:
    """The same reads, publishes (same field sizes) and acks, and nothing else, each
    waited for in turn.

    Reads and publishes go over :class:`Wires`, the worker's own path (its fenced
    call); ``pipeline`` uses redis-py's own commands and a MULTI/EXEC pipeline instead:
    what a loop written with stock redis-py gets.
    """
    keys, fence = _keys(settings), _take_lease(client, settings)
    ensure_group(client, keys)
    wire = Wires(client)
    read = read_group(keys, settings.consumer, settings.max_batch, BURST_BLOCK_MS)
    started, n = time.perf_counter(), 0
    while True:
        if pipeline:
            reply = client.xreadgroup(
                keys.group, settings.consumer, {keys.input: ">"}, settings.max_batch, BURST_BLOCK_MS
            )
            entries = entries_of(reply)
        else:
            wire.send([read])
            entries = read_entries(wire.receive()[0])
        if not entries:
            break
        forecasts = raw_forecasts(entries, shape)
        if pipeline:
            pipe = client.pipeline(transaction=True)
            for values in forecasts:
                fields = dict(zip(FORECAST_FIELDS, values, strict=True))
                pipe.xadd(keys.output, fields, maxlen=settings.output_maxlen)  # type: ignore[arg-type]
            pipe.xack(keys.input, keys.group, *(e for e, _ in entries))
            pipe.execute()
        else:
            wire.send([raw_call(settings.output_maxlen, fence, entries, forecasts)])
            raise_first_error(wire.receive())
        n += len(entries)
    wire.close()
    return _rate(n, started)


def drain_raw_ahead(client: redis.Redis, settings: Settings, shape: Shape) -> dict[str, float]:
    """:func:`drain_raw` reading ahead as the worker does: each read goes out, without
    blocking, before the batch in hand is published, and the publish's reply is read a
    batch later."""
    keys, fence = _keys(settings), _take_lease(client, settings)
    ensure_group(client, keys)
    wire = Wires(client)
    wait = read_group(keys, settings.consumer, settings.max_batch, BURST_BLOCK_MS)
    ahead = read_group(keys, settings.consumer, settings.max_batch, None)
    started, n, held = time.perf_counter(), 0, False
    entries: list[Entry] = []
    while True:
        if not entries:  # a read that blocks: an empty one means drained
            if held:
                raise_first_error(wire.receive())
                held = False
            wire.send([wait])
            entries = read_entries(wire.receive()[0])
            if not entries:
                break
        wire.send([ahead])  # cannot block: answered at once
        call = raw_call(settings.output_maxlen, fence, entries, raw_forecasts(entries, shape))
        n += len(entries)
        if held:
            raise_first_error(wire.receive())
        entries = read_entries(wire.receive()[0])
        wire.send([call])
        held = True
    wire.close()
    return _rate(n, started)


def _take_lease(client: redis.Redis, settings: Settings) -> Fence:
    """The lease on the raw loop's stream, as the worker takes it."""
    ensure_library(client)
    keys = _keys(settings)
    lease = Lease(
        client, key=keys.lease, fence_key=keys.fence, owner="bench", ttl_ms=settings.lease_ttl_ms
    )
    holder, number = lease.acquire()
    assert holder == lease.token, f"{holder} holds the bench's lease"
    return Fence(keys, lease.token, number, settings.lease_ttl_ms)


def _rate(n: int, started: float) -> dict[str, float]:
    seconds = time.perf_counter() - started - BURST_BLOCK_MS / 1000  # the last, empty read
    return {"entries": n, "seconds": round(seconds, 3), "entries_per_s": round(n / seconds, 1)}


Shape = tuple[int, int]  # a forecast's attention width and horizon


def raw_forecasts(entries: list[Entry], shape: Shape) -> list[tuple[bytes, ...]]:
    """A forecast's values per input entry, of the worker's sizes (with intervals)."""
    attn_width, horizon = shape
    row = np.full((1, horizon), 1.2345678901234567)
    yhat, bound = decimal_rows(row, YHAT_DIGITS)[0], decimal_rows(row, BOUND_DIGITS)[0]
    attn = ("[" + ", ".join(["0.0500001"] * attn_width) + "]").encode()
    forecasts: list[tuple[bytes, ...]] = []
    for entry_id, fields in entries:
        assert fields is not None  # nothing deletes from the bench's streams
        ts = b"%d" % entry_ms(entry_id)
        forecasts.append((fields[b"series"], entry_id, ts, yhat, attn, b"0" * 16, bound, bound))
    return forecasts


def raw_call(
    maxlen: int, fence: Fence, entries: list[Entry], forecasts: list[tuple[bytes, ...]]
) -> Command:
    """The forecasts, the acks and the handling mark as the worker publishes them: one
    fenced call."""
    acks = [entry_id for entry_id, _ in entries]
    mark = Mark(acks[-1], 0, fence.token)
    return fence.publish(forecasts=forecasts, acks=acks, mark=mark, maxlen=maxlen)


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate, and every round's rate beside it; with the drains'
    (``server_cpu_s``), the median of the server's CPU seconds."""
    ordered = sorted(results, key=lambda r: r["entries_per_s"])
    median = {**ordered[len(ordered) // 2], "rounds": [r["entries_per_s"] for r in results]}
    if any("server_cpu_s" in r for r in results):
        cpu = [seconds for r in results if (seconds := r.get("server_cpu_s")) is not None]
        median["server_cpu_s"] = float(np.median(cpu)) if len(cpu) == len(results) else None
    return median


def _produce(
    url: str, stream: str, n_series: int, rate: int, seconds: float, first: int, parent: int
) -> None:
    """A steady producer (its own process, gone with ``parent``, the bench, even after
    kill -9): entry k goes out at start + k / rate, the sines going on from step
    ``first`` (the steps before were the prefill)."""
    die_with_parent(parent)
    client = connect(url, socket_timeout_s=30, client_name="bench-producer")  # or a cluster
    total = int(rate * seconds)
    values = sine_steps(n_series, first + total // n_series + 1)
    started, sent = time.perf_counter(), 0
    while sent < total:
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        if due > sent:
            pipe = client.pipeline(transaction=False)
            for k in range(sent, due):
                value = repr(float(values[first + k // n_series, k % n_series]))
                pipe.xadd(stream, {"series": f"s{k % n_series}", "value": value})
            pipe.execute()
            sent = due
        time.sleep(0.0005)
    client.close()


def latency_run(
    client: redis.Redis,
    url: str,
    settings: Settings,
    engine: Engine,
    plan: BenchPlan,
    *,
    warm_steps: int = 20,
) -> dict[str, float]:
    """p50/p99 end-to-end latency at a steady offered load, after ``warm_steps`` values
    of every series (at least the model's context) were drained."""
    keys = _keys(settings)
    prefill(client, keys.input, plan.series * warm_steps, plan.series)
    worker = Worker(client, engine=engine, settings=settings, burst=False)
    # Stopped whatever ends the run: after Ctrl-C the worker went on retrying the
    # embedded server gone with it, and the command never exited.
    served = Served(worker)
    served.thread.start()
    producer = None
    try:
        warm = plan.series * (warm_steps - engine.context + 1)  # every prefilled full window
        _serving(lambda: client.xlen(keys.output) >= warm, served, "its warm-up")
        context = multiprocessing.get_context("spawn")
        producer = context.Process(
            target=_produce,
            args=(url, keys.input, plan.series, plan.rate, plan.seconds, warm_steps, os.getpid()),
        )
        with deaf_children():
            producer.start()
        log.info("latency: warmed up; the producer runs")
        producer.join()
        if producer.exitcode != 0:
            raise ValueError(f"the bench's producer process failed (exit code {producer.exitcode})")
        expected = warm + int(plan.rate * plan.seconds)
        deadline = time.monotonic() + 30
        while client.xlen(keys.output) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:  # Ctrl-C or a stop signal: it wrote on into the keys the bench then deleted
        if producer is not None and producer.is_alive():
            producer.terminate()
            producer.join()
        worker.stop()
        served.thread.join(timeout=60)
    rows = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.output))[warm:]
    out_ms = np.array([entry_ms(i) for i, _ in rows], dtype=np.float64)
    sent_ms = np.array([entry_ms(f[b"src"]) for _, f in rows], dtype=np.float64)
    latency = out_ms - sent_ms
    # From the first value sent to the last forecast: a worker behind the offered rate
    # takes longer than the producer did (the producer's span said the offered rate).
    span = (out_ms.max() - sent_ms.min()) / 1000 if rows else 0.0
    return {
        "offered_per_s": plan.rate,
        "seconds": plan.seconds,
        "offered": expected - warm,  # forecasts past this were not made within 30 s
        "forecasts": len(rows),
        "achieved_per_s": round(float(len(rows) / span), 1) if span else 0.0,
        "p50_ms": float(np.percentile(latency, 50)),
        "p99_ms": float(np.percentile(latency, 99)),
        "max_ms": float(latency.max()),
        "series": plan.series,
        "checkpoint_longest_ms": round(worker.metrics.checkpoint_longest_s * 1000, 2),
        "finetunes": worker.tuner.cycles,
        "finetune_busy_s": round(worker.tuner.busy_s, 1),
    }


def _serving(
    condition: Callable[[], bool], served: Served, what: str, timeout_s: float = 300
) -> None:
    """Until ``condition()``; a ValueError once the worker's thread has stopped (its
    error said) or ``timeout_s`` has passed: the bench waited for ever on a worker that
    died at its start."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if not served.thread.is_alive():
            why = served.error or "it returned"
            raise ValueError(f"the bench's worker stopped before {what}: {why}")
        if time.monotonic() > deadline:
            raise ValueError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def delete_run_keys(client: redis.Redis, run_id: str) -> None:
    """Every key of the run deleted, node by node on a cluster, where the model store's
    keys carry their tag first (``{<run_id>:...:models}``: left behind, 12 a run, while
    only ``<run_id>*`` was scanned). A node that does not answer is named in a warning,
    and the others cleaned all the same (the run's own error, if any, says why it
    failed); a refusal (no right to SCAN) is raised: a warning and exit 0 left them."""
    nodes = cluster_of(client)
    servers = [node.redis_connection for node in primaries(nodes)] if nodes else [client]
    patterns = (f"{run_id}*", f"{{{run_id}*")
    for server in servers:
        try:
            for pattern in patterns:
                for key in server.scan_iter(match=pattern, count=1000):
                    server.delete(key)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            log.warning(
                "the bench's keys %s may be left on a server (%s)", " and ".join(patterns), e
            )


def run_bench(
    *, plan: BenchPlan, device: str, url: str | None, model: AttentionLSTM | None
) -> dict[str, Any]:
    model = model or new_model(ModelConfig(), seed=0)
    checkpoint = Checkpoint(model=model, version=version_of(model))
    report: dict[str, Any] = {
        "machine": machine(),
        "device": device,
        "model": model.config.to_dict(),
    }
    report["model"]["params"] = model.num_params()
    with url_or_embedded(url) as server_url:
        client = connect(server_url, socket_timeout_s=30, client_name="bench")
        run_id = f"bench-{os.getpid()}-{int(time.time())}"
        report["server"] = server_of(client)
        try:
            report.update(_runs(client, server_url, run_id, checkpoint, plan, device))
        finally:
            delete_run_keys(client, run_id)
            client.close()
    report["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return report


def _runs(
    client: redis.Redis,
    url: str,
    run_id: str,
    checkpoint: Checkpoint,
    plan: BenchPlan,
    device: str,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # The batches the worker cuts for this model (fewer entries for a long context):
    # the raw loops read as many at a time.
    served = dataclasses.replace(plan, max_batch=_batch(plan, checkpoint.config.context))
    engine = Engine(checkpoint, device=device, max_batch=served.max_batch)
    if "drains" in plan.runs:
        out.update(_drain_runs(client, url, run_id, engine, served, device))
    if "latency" in plan.runs:
        out.update(_latency_runs(client, url, run_id, engine, served, device))
    if "models" in plan.runs:
        out["models"] = _model_runs(client, url, run_id, plan, device)
    return out


def _drain_runs(
    client: redis.Redis, url: str, run_id: str, engine: Engine, plan: BenchPlan, device: str
) -> dict[str, Any]:
    """The worker beside the raw loops, round by round, then the per-entry ways."""
    out: dict[str, Any] = {}
    checkpoint, shape = engine.checkpoint, (engine.window, engine.horizon)
    raws: dict[str, Callable[[redis.Redis, Settings, Shape], dict[str, float]]] = {
        "raw": drain_raw,
        "raw_ahead": drain_raw_ahead,
        "raw_pipeline": functools.partial(drain_raw, pipeline=True),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in [*raws, "worker"]}
    for rep in range(plan.repeats):  # interleaved, so that noise hits them all alike
        log.info("round %d of %d: the raw loops, the worker", rep + 1, plan.repeats)
        for name, drain in raws.items():
            s = _settings(client, url, f"{run_id}:{name}{rep}:", plan, device)
            prefill(client, _keys(s).input, plan.entries, plan.series)
            runs[name].append(_logged(name, drain(client, s, shape)))
        s = _settings(client, url, f"{run_id}:worker{rep}:", plan, device)
        runs["worker"].append(
            _logged("worker", _drain(client, s, engine, plan.entries, plan.series))
        )
    for name, results in runs.items():
        out[name] = _median(results)

    log.info("per-entry model calls: %d entries", plan.per_entry_entries)
    s = _settings(client, url, f"{run_id}:per-entry:", plan, device)
    per_entry = PerEntryEngine(checkpoint, device=device, max_batch=plan.max_batch)
    out["per_entry"] = _logged(
        "per-entry model calls",
        _drain(client, s, per_entry, plan.per_entry_entries, plan.series),
    )

    log.info("one entry at a time (max_batch 1): %d entries", plan.per_entry_entries)
    s = _settings(client, url, f"{run_id}:one-at-a-time:", plan, device, max_batch=1)
    one = PerEntryEngine(checkpoint, device=device, max_batch=1)
    out["one_at_a_time"] = _logged(
        "one entry at a time", _drain(client, s, one, plan.per_entry_entries, plan.series)
    )
    worker_rate = out["worker"]["entries_per_s"]
    out["worker_vs_raw"] = round(worker_rate / out["raw"]["entries_per_s"], 3)
    out["worker_vs_raw_ahead"] = round(worker_rate / out["raw_ahead"]["entries_per_s"], 3)
    out["worker_vs_per_entry"] = round(worker_rate / out["per_entry"]["entries_per_s"], 1)
    out["worker_vs_one_at_a_time"] = round(worker_rate / out["one_at_a_time"]["entries_per_s"], 1)
    return out


def _latency_runs(
    client: redis.Redis, url: str, run_id: str, engine: Engine, plan: BenchPlan, device: str
) -> dict[str, Any]:
    """End-to-end latency under a steady load: alone, with fine-tunes back to back, and
    over ``plan.scale_series`` series."""
    out: dict[str, Any] = {}
    # Both latency runs start from a full history, so that fine-tuning has data at once.
    history = max(Settings.model_fields["history_len"].default, engine.context)
    log.info("latency: %d entries/s for %.0f s", plan.rate, plan.seconds)
    s = _settings(client, url, f"{run_id}:latency:", plan, device)
    out["latency"] = latency_run(client, url, s, engine, plan, warm_steps=history)
    log.info("latency with fine-tunes back to back: %d entries/s", plan.rate)
    s = _settings(client, url, f"{run_id}:latency-finetune:", plan, device, finetune_interval_s=1.0)
    out["latency_finetune"] = latency_run(client, url, s, engine, plan, warm_steps=history)
    out["finetune_p99_ratio"] = round(
        out["latency_finetune"]["p99_ms"] / out["latency"]["p99_ms"], 2
    )
    scaled = dataclasses.replace(plan, series=plan.scale_series)
    log.info("latency with %d series: %d entries/s", scaled.series, plan.rate)
    s = _settings(client, url, f"{run_id}:latency-scale:", scaled, device)
    out["latency_scale"] = latency_run(client, url, s, engine, scaled, warm_steps=engine.context)
    return out


# The models the cost comparison serves, untrained (speed does not depend on the weights):
# the short-window model as it was before seasonal context, its intervals off (what the
# worker published then); that model with today's linear map and intervals (the default
# without a period: sines); and the default for half-hourly data with a weekly cycle.
COST_MODELS = {
    "20 steps, 1 ahead, no intervals (the previous default)": (
        ModelConfig(linear=False),
        0.0,
    ),
    "20 steps, 1 ahead, 90% intervals (the default without a period)": (ModelConfig(), 0.9),
    "48 steps, lags 48/288/336 and a 2-week profile, 48 ahead, 90% intervals "
    "(half-hourly default, weekly cycle)": (
        seasonal_config(48, [4032], weekly_cycle=True),
        0.9,
    ),
}
MODEL_ONLY_BATCHES = 20  # batches of max_batch windows timed per model


def _model_runs(
    client: redis.Redis, url: str, run_id: str, plan: BenchPlan, device: str
) -> list[dict[str, Any]]:
    """What a model costs: its forward passes alone (windows/s), and the worker's drain
    serving it, every model's drains interleaved round by round."""
    engines, drains, batches = [], [], []
    for config, _ in COST_MODELS.values():
        model = new_model(config, seed=0)
        checkpoint = Checkpoint(model=model, version=version_of(model))
        batches.append(_batch(plan, config.context))
        engines.append(Engine(checkpoint, device=device, max_batch=batches[-1]))
        drains.append(list[dict[str, float]]())
    settings = [
        _settings(client, url, f"{run_id}:model{k}:", plan, device, coverage=coverage)
        for k, (_, coverage) in enumerate(COST_MODELS.values())
    ]
    for rep in range(plan.repeats):
        log.info("round %d of %d: the models' drains", rep + 1, plan.repeats)
        for name, engine, s, done in zip(COST_MODELS, engines, settings, drains, strict=True):
            # Each round from an empty output stream, as the first: otherwise each
            # round's server holds the forecasts of the rounds before (3 KB each, a day
            # ahead), and the later rounds drain slower for it (14,896 -> 9,735 over 5).
            client.delete(_keys(s).output)
            drained = _drain(client, s, engine, plan.entries, plan.series, warm=rep == 0)
            done.append(_logged(f"the worker serving {name}", drained))
    costs = []
    for name, engine, done, batch in zip(COST_MODELS, engines, drains, batches, strict=True):
        windows_per_s = _windows_per_s(engine, batch)
        log.info("%s, model only: %s windows/s", name, f"{windows_per_s:,.0f}")
        costs.append(
            {
                "name": name,
                "params": engine.model.num_params(),
                "context": engine.context,
                "horizon": engine.horizon,
                "batch": batch,
                "windows_per_s": windows_per_s,
                "drain": _median(done),
                "finetune": _finetune_cost(engine.model, plan.series),
            }
        )
    return costs


def _finetune_cost(model: AttentionLSTM, n_series: int) -> dict[str, float]:
    """One fine-tune of ``model`` as the worker runs it (a child process, one torch
    thread, nice 10) on ``n_series`` sines of the history the worker keeps for it: its
    seconds and the process's peak RSS, before the job and after."""
    config = model.config
    default = Settings.model_fields["history_len"].default
    length = history_kept(default, config.context, config.horizon, FinetuneConfig().holdout)
    histories = list(make_sines(SineSpec(n_series=n_series, n_points=length), seed=1).values)
    job = Job(histories=histories, config=FinetuneConfig(), serving=dumps(model)[0])
    log.info("one fine-tune: %d series of %d values, %d ahead", n_series, length, config.horizon)
    # a fresh process for each, so that each peak is its own
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=init_process, initargs=(1,)) as pool:
        with deaf_children():  # its process starts with the first job
            timed = pool.submit(_timed_job, job)
        seconds, before, after = timed.result()
    return {
        "series": n_series,
        "values": length,
        "seconds": seconds,
        "rss_start_mb": before,
        "rss_mb": after,
    }


def _timed_job(job: Job) -> tuple[float, float, float]:
    before = _peak_rss_mb()
    started = time.perf_counter()
    run_job(job)
    return round(time.perf_counter() - started, 2), before, _peak_rss_mb()


def _peak_rss_mb() -> float:
    """This process's peak RSS: Linux's VmHWM, its own since its exec, where ru_maxrss
    starts from its parent's peak (the bench's, 700 MB); elsewhere ru_maxrss."""
    peak = proc_status_mb(os.getpid(), "VmHWM")
    if math.isnan(peak):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return peak


def proc_status_mb(pid: int, field: str) -> float:
    """A memory field of a process's /proc status (VmRSS, VmHWM) in MB; NaN where there
    is none (not Linux, or the process is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    return math.nan


def _windows_per_s(engine: Engine, batch: int) -> float:
    """The model alone, batches of ``batch`` windows of sines: windows per second."""
    windows = sine_steps(batch, engine.context + 1).T[:, 1:]  # (batch, context)
    engine.forecast(windows)  # the first call sets up lazily
    started = time.perf_counter()
    for _ in range(MODEL_ONLY_BATCHES):
        engine.forecast(windows)
    return round(MODEL_ONLY_BATCHES * batch / (time.perf_counter() - started), 1)


def format_report(report: dict[str, Any]) -> str:
    """The figures as Markdown, ready for BENCHMARKS.md: the parts that were run."""
    m, model = report["machine"], report["model"]
    served = ""  # the default or --model: what the drains and latency runs serve
    if "worker" in report or "latency" in report:
        served = (
            f"Model: window {model['window']}, hidden {model['hidden_size']}, "
            f"{model['params']} parameters. "
        )
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if 'gpu' in m else ''}; "
        f"device {report['device']}; Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} thread{'s' * (m['torch_threads'] != 1)}), redis-py "
        f"{m['redis_py']}, hiredis {m['hiredis']}.",
        f"{served}Server: {report.get('server') or 'not named (no INFO)'}. "
        f"Peak RSS {report['max_rss_mb']} MB.",
    ]
    if "worker" in report:
        lines += _drain_lines(report)
    if "latency" in report:
        lines += _latency_lines(report)
    if "models" in report:
        lines += _model_lines(report["models"])
    return "\n".join(lines)


def _drain_lines(report: dict[str, Any]) -> list[str]:
    rows = [
        ("worker (batched)", report["worker"]),
        ("raw Redis I/O, no model", report["raw"]),
        ("raw Redis I/O, reading ahead like the worker", report["raw_ahead"]),
        ("raw Redis I/O through redis-py's pipeline", report["raw_pipeline"]),
        ("one model call per entry, batched Redis I/O", report["per_entry"]),
        ("one entry at a time: read, model call, publish", report["one_at_a_time"]),
    ]
    return [
        "",
        "| run | entries | seconds | entries/s (median) | each round |",
        "| --- | ---: | ---: | ---: | --- |",
        *(
            f"| {name} | {r['entries']:,} | {r['seconds']:.2f} | {r['entries_per_s']:,.0f} "
            f"| {', '.join(f'{x:,.0f}' for x in r.get('rounds', []))} |"
            for name, r in rows
        ),
        "",
        f"Worker / raw ceiling: {report['worker_vs_raw']:.0%} "
        f"({report['worker_vs_raw_ahead']:.0%} of the raw loop reading ahead). "
        f"Worker / one model call per entry: {report['worker_vs_per_entry']:.1f}x. "
        f"Worker / one entry at a time: {report['worker_vs_one_at_a_time']:.1f}x.",
    ]


def _latency_lines(report: dict[str, Any]) -> list[str]:
    lat, ft = report["latency"], report["latency_finetune"]
    return [
        "",
        f"Steady load {lat['offered_per_s']:,} entries/s offered ({lat['achieved_per_s']:,.0f} "
        f"forecast/s, {_forecasts(lat)}): end-to-end latency p50 "
        f"{lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms, max {lat['max_ms']:.0f} ms.",
        f"The same with fine-tunes back to back ({ft['finetunes']} finished while the worker "
        f"ran, {ft['finetune_busy_s']:.0f} s of training in all; {_forecasts(ft)}): p50 "
        f"{ft['p50_ms']:.0f} ms, p99 {ft['p99_ms']:.0f} ms, max {ft['max_ms']:.0f} ms; "
        f"p99 {report['finetune_p99_ratio']:.2f}x that without.",
        "",
        "| series (window state) | forecasts | p50 ms | p99 ms | max ms "
        "| longest checkpoint work of one batch, ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {r['series']:,} | {_forecasts(r)} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
            f"| {r['max_ms']:.0f} | {r['checkpoint_longest_ms']:.2f} |"
            for r in (lat, report["latency_scale"])
        ),
    ]


def _forecasts(run: dict[str, Any]) -> str:
    """How many forecasts a latency run's percentiles are of: each one offered, or
    those made within 30 s of the last value (the slowest, left out, are said so)."""
    if run["forecasts"] >= run["offered"]:
        return f"{run['forecasts']:,} forecasts"
    return f"{run['forecasts']:,} of {run['offered']:,} forecasts, the rest not within 30 s"


def _per_100k(seconds: float | None, entries: int) -> str:
    return "-" if seconds is None or not entries else f"{seconds / entries * 100_000:.2f}"


def _against(drain: dict[str, Any], first: dict[str, Any]) -> str:
    """A drain's rate over the first model's: their medians' ratio, then each round's
    against the same round's (the drains interleave, so a round's pair shares what the
    machine was doing): "0.62x (0.50, 0.62, 0.66)"."""
    rounds = ", ".join(
        f"{a / b:.2f}" for a, b in zip(drain["rounds"], first["rounds"], strict=True)
    )
    return f"{drain['entries_per_s'] / first['entries_per_s']:.2f}x ({rounds})"


def _model_lines(models: list[dict[str, Any]]) -> list[str]:
    return [
        "",
        "| model served | parameters | values read | batch | model only, windows/s "
        "| worker drain, entries/s (median) | each round "
        "| drain against the first row's: medians (each round) "
        "| server CPU per 100,000 entries, s (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
        *(
            f"| {r['name']} | {r['params']:,} | {r['context']} | {r['batch']} "
            f"| {r['windows_per_s']:,.0f} "
            f"| {r['drain']['entries_per_s']:,.0f} "
            f"| {', '.join(f'{x:,.0f}' for x in r['drain']['rounds'])} "
            f"| {'-' if k == 0 else _against(r['drain'], models[0]['drain'])} "
            f"| {_per_100k(r['drain'].get('server_cpu_s'), r['drain']['entries'])} |"
            for k, r in enumerate(models)
        ),
        "",
        "| model fine-tuned | series | values each | seconds "
        "| peak RSS of the fine-tuning process, MB (before the job) |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {r['name']} | {f['series']:,} | {f['values']:,} | {f['seconds']:.1f} "
            f"| {f['rss_mb']:,.0f} ({f['rss_start_mb']:,.0f}) |"
            for r in models
            for f in [r["finetune"]]
        ),
    ]
