"""``attnlstm bench --workers 1,2,4 --partitions P``: what a pool of workers drains
together, beside as many raw clients on the same partitions, in the same run: on an
embedded server and on a local 3-master Redis Cluster (:mod:`worker.localcluster`), or
on the Redis of ``--redis-url``, whichever it is.

- pool of N: N ``attnlstm worker`` processes sharing P partitions (worker/pool.py);
- raw, N clients: N processes, each reading its share of the partitions with one
  XREADGROUP (one per partition, polled, on a cluster) and publishing each partition's
  forecasts (fixed values of the worker's sizes) and acks through the same fenced call,
  with no validation, windows or model: the ceiling the server puts on a pool of that
  size.

Each run starts its processes on empty streams whose consumer groups begin past any
entry, waits until every partition is held (the pool balanced), writes the entries,
then moves every group back to the start in one round trip: the clock runs from there
until every group has read and acked everything. Process start, imports and the
pool's first rebalancing stay off the clock.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from attnlstm.checkpoint import save
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.partition import partition_of
from attnlstm.synthetic import sine_steps
from attnlstm.train import new_model
from worker.embedded import die_with_parent, pdeathsig_preexec, url_or_embedded
from worker.keys import Keys
from worker.lease import Fence, Lease, ensure_library, process_token
from worker.localcluster import LocalClusterError, local_cluster
from worker.pipeline import CLUSTER_POLL_S
from worker.settings import URL_FILES
from worker.signals import deaf_children
from worker.streams import (
    REDIS_ERRORS,
    Wires,
    cluster_of,
    connect,
    fix_for,
    keys_on,
    primaries,
    raise_first_error,
    read_groups,
    read_streams,
)
from worker.tools.bench import (
    delete_run_keys,
    machine,
    proc_status_mb,
    raw_call,
    raw_forecasts,
    server_of,
)

log = logging.getLogger("attnlstm.bench")

PAST_EVERY_ENTRY = b"99999999999999-0"  # a group starting here delivers nothing yet
LEASE_TTL_MS = 5_000
BLOCK_MS = 50
MAXLEN = 1_000_000  # the output streams' cap, as the worker's default


@dataclass(frozen=True)
class PoolPlan:
    workers: tuple[int, ...] = (1, 2, 4)
    partitions: int = 12
    entries: int = 100_000
    series: int = 1_000
    max_batch: int = 1024
    cluster: bool = True  # with no URL given, a local 3-master cluster after one server


@dataclass(frozen=True)
class Child:
    """A process the bench started: what it is, its pid, and its exit code once it has
    exited (None before), so that no wait outlives it."""

    name: str
    pid: int
    exitcode: Callable[[], int | None]


def run_pool_bench(
    *, plan: PoolPlan, device: str, url: str | None, model: AttentionLSTM | None
) -> dict[str, Any]:
    model = model or new_model(ModelConfig(), seed=0)
    report: dict[str, Any] = {
        "machine": machine(),
        "device": device,
        "partitions": plan.partitions,
        "entries": plan.entries,
        "series": plan.series,
        "targets": [],
    }
    with tempfile.TemporaryDirectory(prefix="attnlstm-bench-") as tmp:
        model_file = Path(tmp) / "model.safetensors"
        save(model_file, model)
        with url_or_embedded(url) as server_url:
            report["targets"].append(_runs(server_url, plan, model_file, device))
        if url is None and plan.cluster:
            try:
                with local_cluster(Path(tmp) / "cluster") as cluster:
                    report["targets"].append(_runs(cluster.url, plan, model_file, device))
            except LocalClusterError as e:  # none to build here, or one that would not start
                log.warning("%s: the bench ran on one server only", e)
    return report


def _runs(url: str, plan: PoolPlan, model_file: Path, device: str) -> dict[str, Any]:
    """Raw clients, then a pool, of each size, on the Redis at ``url``."""
    client = connect(url, socket_timeout_s=30, client_name="bench")
    nodes = cluster_of(client)
    where = f"{len(primaries(nodes))}-master cluster" if nodes else "one server"
    # A cluster is named by its first primary: its nodes run one server, as a rule.
    server = server_of(primaries(nodes)[0].redis_connection if nodes else client)
    run_id = f"bench-pool-{os.getpid()}-{int(time.time())}"
    runs: list[dict[str, Any]] = []
    try:
        for n in plan.workers:
            log.info("%s: %d raw client(s) over %d partitions", where, n, plan.partitions)
            base = keys_on(client, Keys.prefixed(f"{run_id}:raw{n}:"))
            raw = _timed(client, base, plan, _raw_clients(url, base, plan, n))
            log.info("%s: a pool of %d worker(s) over %d partitions", where, n, plan.partitions)
            base = keys_on(client, Keys.prefixed(f"{run_id}:pool{n}:"))
            workers = _workers(url, base, plan, n, model_file, device)
            pool = _timed(client, base, plan, workers)
            runs.append({"workers": n, "pool": pool, "raw": raw})
            log.info(
                "%s: %d worker(s) %s entries/s, %d raw client(s) %s",
                where,
                n,
                f"{pool['entries_per_s']:,.0f}",
                n,
                f"{raw['entries_per_s']:,.0f}",
            )
    finally:
        delete_run_keys(client, run_id)
        client.close()
    one = runs[0]["pool"]["entries_per_s"]
    for run in runs:
        run["pool_vs_raw"] = round(run["pool"]["entries_per_s"] / run["raw"]["entries_per_s"], 3)
        run["pool_vs_one"] = round(run["pool"]["entries_per_s"] / one, 2)
    return {"redis": where, "server": server, "runs": runs}


@contextlib.contextmanager
def _workers(
    url: str, base: Keys, plan: PoolPlan, n: int, model_file: Path, device: str
) -> Iterator[list[Child]]:
    """N ``attnlstm worker`` processes on ``base``'s partitions."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNLSTM_")}
    # The URL, with any password in it, where only this user may read it: not in `ps`;
    # its files named from here, as the workers run elsewhere.
    env["ATTNLSTM_REDIS_URL"] = _absolute(url)
    flags = [
        "--model", str(model_file), "--device", device,
        "--threads", "1", "--metrics-port", "0", "--finetune-interval-s", "0",
        "--partitions", str(plan.partitions), "--max-batch", str(plan.max_batch),
        "--max-series", str(plan.series), "--lease-ttl-ms", str(LEASE_TTL_MS),
        "--block-ms", str(BLOCK_MS), "--input-stream", base.input,
        "--output-stream", base.output, "--dead-stream", base.dead,
        "--models-stream", base.models, "--log-level", "WARNING",
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", *flags, "--consumer", f"bench{i}"],
            env=env,
            cwd=model_file.parent,  # not a .env of the bench's folder: it reads none
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # each one's exit report
            preexec_fn=pdeathsig_preexec(),  # gone with the bench, even after kill -9
        )
        for i in range(n)
    ]
    try:
        yield [Child(f"worker bench{i}", p.pid, p.poll) for i, p in enumerate(procs)]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)


def _absolute(url: str) -> str:
    """``url`` with the files its query names (:data:`URL_FILES`) made absolute, from
    this process's folder: a relative one was looked for in the workers' folder. (A
    unix:// socket's path is one already, to redis-py.)"""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if not any(key in URL_FILES for key, _ in query):
        return url
    absolute = [(k, os.path.abspath(v) if k in URL_FILES else v) for k, v in query]
    return urlunsplit(parts._replace(query=urlencode(absolute)))


@contextlib.contextmanager
def _raw_clients(url: str, base: Keys, plan: PoolPlan, n: int) -> Iterator[list[Child]]:
    """N raw client processes, each on its share of ``base``'s partitions."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    shares = [list(range(i, plan.partitions, n)) for i in range(n)]
    pipes = [context.Pipe(duplex=False) for _ in shares]
    procs = [
        context.Process(
            target=_raw_client,
            args=(url, base, plan, share, stop, said, os.getpid()),
            daemon=True,
        )
        for share, (_, said) in zip(shares, pipes, strict=True)
    ]
    with deaf_children():
        for p in procs:
            p.start()
    try:
        yield [
            Child(f"raw client {i}", cast(int, p.pid), _exit_of(p, heard))
            for i, (p, (heard, _)) in enumerate(zip(procs, pipes, strict=True))
        ]
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=60)


def _exit_of(process: Any, heard: Connection) -> Callable[[], int | None]:
    """The raw client's exit code, None while it runs; a ValueError with what it said
    where it stopped on an error (one line, as the bench's own)."""

    def exitcode() -> int | None:
        if heard.poll():
            raise ValueError(f"a raw client of the bench stopped: {heard.recv()}")
        code: int | None = process.exitcode
        return code

    return exitcode


def _raw_client(
    url: str,
    base: Keys,
    plan: PoolPlan,
    share: list[int],
    stop: Any,
    said: Connection,
    parent: int,
) -> None:
    """:func:`_serve_raw` until ``stop`` is set; a Redis error told the bench through
    ``said`` (a traceback of the child's said nothing more, and left the bench waiting).
    Gone with the bench, even after its kill -9 (it read on, an orphan)."""
    die_with_parent(parent)
    try:
        _serve_raw(url, base, plan, share, stop)
    except REDIS_ERRORS as e:
        fix = fix_for(e) if isinstance(e, redis.ResponseError) else None
        said.send(f"Redis: {e}; {fix}" if fix else f"Redis: {e}")
        raise SystemExit(1) from None


def _serve_raw(url: str, base: Keys, plan: PoolPlan, share: list[int], stop: Any) -> None:
    """Read the partitions of ``share`` together and publish each one's part through
    its fenced call, until ``stop`` is set."""
    client = connect(url, socket_timeout_s=30, client_name="bench-raw")
    ensure_library(client)
    parts = {k: base.partition(k, plan.partitions) for k in share}
    token = process_token("bench-raw")
    fences = {k: _fence(client, keys, token) for k, keys in parts.items()}
    names = {keys.input.encode(): k for k, keys in parts.items()}
    each = -(-plan.max_batch // len(share))
    inputs = [keys.input for keys in parts.values()]
    polled = cluster_of(client) is not None  # one read per partition's slot, not blocking
    reads = (
        [read_groups(base.group, "bench-raw", [name], each, None) for name in inputs]
        if polled
        else [read_groups(base.group, "bench-raw", inputs, each, BLOCK_MS)]
    )
    wires = Wires(client)
    shape = (ModelConfig().window, ModelConfig().horizon)
    while not stop.is_set():
        wires.send(reads)
        read = {name: e for reply in wires.receive() for name, e in read_streams(reply).items()}
        calls = [
            raw_call(MAXLEN, fences[names[name]], entries, raw_forecasts(entries, shape))
            for name, entries in read.items()
            if entries
        ]
        if calls:
            wires.send(calls)
            raise_first_error(wires.receive())
        elif polled:
            time.sleep(CLUSTER_POLL_S)
    wires.close()
    client.close()


def _fence(client: redis.Redis, keys: Keys, token: str) -> Fence:
    lease = Lease(
        client, key=keys.lease, fence_key=keys.fence, owner="", ttl_ms=600_000, token=token
    )
    holder, number = lease.acquire()
    assert holder == lease.token, f"{holder} holds the bench's lease on {keys.input}"
    return Fence(keys, lease.token, number, lease.ttl_ms)


def _timed(
    client: redis.Redis,
    base: Keys,
    plan: PoolPlan,
    processes: contextlib.AbstractContextManager[list[Child]],
) -> dict[str, Any]:
    """Start ``processes`` on empty partitions, write the entries once every partition
    is held, release them all at once and time the drain."""
    parts = [base.partition(k, plan.partitions) for k in range(plan.partitions)]
    for keys in parts:
        client.xgroup_create(keys.input, keys.group, id=PAST_EVERY_ENTRY, mkstream=True)
    # One pipeline for every poll: a cluster's, dropped 50 times a second, swallowed a
    # Ctrl-C that came in its __del__ ("Exception ignored"), and the bench waited on.
    pipe = client.pipeline(transaction=False)
    with processes as children:
        balanced = functools.partial(_balanced, pipe, parts, len(children))
        _wait(balanced, "every process to hold its share", children)
        _fill(client, parts, plan)
        started = time.perf_counter()
        for keys in parts:
            pipe.xgroup_setid(keys.input, keys.group, id="0", entries_read=0)
        pipe.execute()
        drained = functools.partial(_drained, pipe, parts)
        _wait(drained, "the drain", children, poll_s=0.02)
        seconds = time.perf_counter() - started
        rss = [proc_status_mb(child.pid, "VmRSS") for child in children]
    return {
        "entries": plan.entries,
        "seconds": round(seconds, 3),
        "entries_per_s": round(plan.entries / seconds, 1),
        "rss_mb": rss,
    }


def _balanced(pipe: redis.client.Pipeline, parts: list[Keys], n: int) -> bool:
    """Every partition held, and the holders' shares those of a balanced pool of ``n``."""
    for keys in parts:
        pipe.get(keys.lease)
    holders = cast(list[bytes | None], pipe.execute())
    if None in holders:
        return False
    base, extra = divmod(len(parts), n)
    fair = sorted([base + 1] * extra + [base] * (n - extra))
    return sorted(Counter(holders).values()) == fair


def _fill(client: redis.Redis, parts: list[Keys], plan: PoolPlan) -> None:
    """``plan.entries`` sine values over ``plan.series`` series, each to its partition."""
    values = sine_steps(plan.series, -(-plan.entries // plan.series)).ravel()
    streams = [partition_of(f"s{j}", plan.partitions) for j in range(plan.series)]
    for start in range(0, plan.entries, 10_000):
        pipe = client.pipeline(transaction=False)
        for k in range(start, min(start + 10_000, plan.entries)):
            j = k % plan.series
            pipe.xadd(parts[streams[j]].input, {"series": f"s{j}", "value": repr(float(values[k]))})
        pipe.execute()


def _drained(pipe: redis.client.Pipeline, parts: list[Keys]) -> bool:
    """Every group has read and acked every entry: one round trip, so that watching
    the drain takes little from the processes timed."""
    for keys in parts:
        pipe.xinfo_groups(keys.input)
    for groups in pipe.execute():
        (info,) = groups
        if info.get("lag") != 0 or int(info["pending"]) != 0:
            return False
    return True


def _wait(
    condition: Callable[[], bool],
    what: str,
    children: list[Child],
    *,
    poll_s: float = 0.05,
    timeout_s: float = 600,
) -> None:
    """Until ``condition()``; a ValueError once one of ``children`` has exited (a worker
    refused a right, killed: the bench waited out the timeout) or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        for child in children:
            if (code := child.exitcode()) is not None:
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                raise ValueError(
                    f"the bench's {child.name} (pid {child.pid}) stopped before {what} ({how})"
                )
        if time.monotonic() > deadline:
            raise ValueError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def _target(target: dict[str, Any]) -> str:
    """ "one server (Valkey 8.1.8, libc malloc)", or without the name where INFO gave none."""
    return f"{target['redis']} ({target['server']})" if target["server"] else target["redis"]


def format_pool_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if 'gpu' in m else ''}; "
        f"device {report['device']}. {report['entries']:,} entries over {report['series']:,} "
        f"series in {report['partitions']} partitions.",
        "",
        "| Redis | workers | pool entries/s | raw clients entries/s | pool / raw "
        "| pool / one worker | worker RSS, MB each |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        *(
            f"| {_target(t)} | {r['workers']} | {r['pool']['entries_per_s']:,.0f} "
            f"| {r['raw']['entries_per_s']:,.0f} | {r['pool_vs_raw']:.0%} "
            f"| {r['pool_vs_one']:.2f}x | {', '.join(f'{x:.0f}' for x in r['pool']['rss_mb'])} |"
            for t in report["targets"]
            for r in t["runs"]
        ),
    ]
    return "\n".join(lines)
