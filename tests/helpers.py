"""Helpers for the tests that run the worker against a real server: in this process
(most of them), or as a child process where the process itself is the point (kill -9,
signals, the command line)."""

from __future__ import annotations

import contextlib
import copy
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest
import redis
import torch
from pydantic import SecretStr

from attnlstm.checkpoint import Checkpoint, version_of
from attnlstm.model import AttentionLSTM
from attnlstm.train import predict
from tests.conftest import CLI, ROOT
from worker.embedded import EmbeddedServerError, find_server_binary, pdeathsig_preexec
from worker.engine import Engine
from worker.keys import Keys
from worker.loop import Worker
from worker.metrics import Metrics
from worker.settings import Settings
from worker.streams import connect, group_info


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def as_user(url: str, user: str, password: str | None = None) -> str:
    """``url`` as ``user`` (with ``password`` where given), whoever it named before."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    login = user if password is None else f"{user}:{password}"
    return urlunsplit(parts._replace(netloc=f"{login}@{host}"))


@contextlib.contextmanager
def user_without(nodes: Sequence[redis.Redis], user: str, rule: str) -> Iterator[str]:
    """A throwaway ACL user with every right but what ``rule`` takes away (``-scan``,
    ``-cluster|slots``), made on each of ``nodes`` and deleted after; yields its password."""
    password = f"{user}-password"
    for node in nodes:
        rules = ["reset", "on", f">{password}", "~*", "&*", "+@all", rule]
        node.execute_command("ACL", "SETUSER", user, *rules)  # type: ignore[no-untyped-call]
    try:
        yield password
    finally:
        for node in nodes:
            node.acl_deluser(user)


def large_requests_logged(client: redis.Redis, key: str) -> int | None:
    """How many entries the server's log of large requests gained from one scripted
    call of 2 MB that writes ``key`` five times, as a worker's publish does (Valkey 8.1
    logs the call and each command it runs); None for a server with no such log."""
    client.function_load(
        "#!lua name=attnlstm_test_log\n"
        "redis.register_function('five_sets', function(keys, args)\n"
        "  for _ = 1, 5 do redis.call('SET', keys[1], 'x') end\n"
        "  return 1\n"
        "end)",
        replace=True,
    )
    command = ("COMMANDLOG", "LEN", "large-request")
    try:
        before = int(client.execute_command(*command))  # type: ignore[no-untyped-call]
    except redis.ResponseError:  # no COMMANDLOG: Redis, or Valkey before 8.1
        return None
    client.fcall("five_sets", 1, key, b"x" * 2_000_000)
    return int(client.execute_command(*command)) - before  # type: ignore[no-untyped-call]


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie that no init in this container reaped."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def wait_for(condition: Callable[[], object], *, timeout: float = 60, what: str = "") -> None:
    """Until ``condition()`` is true; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what or condition}")
        time.sleep(0.02)


def drained(client: redis.Redis, keys: Keys) -> bool:
    """The group has read every entry, and none is pending (False: no group yet)."""
    try:
        info = group_info(client, keys)
    except redis.ResponseError:
        return False
    return info.get("lag") == 0 and int(info["pending"]) == 0


def kill_named(client: redis.Redis, name: str) -> int:
    """Kill every connection named ``name`` once (a Redis blip): how many."""
    others = client.client_list()
    return sum(client.client_kill_filter(_id=o["id"]) for o in others if o.get("name") == name)


def kill_connections(client: redis.Redis, name: str, *, seconds: float, seed: int) -> int:
    """Kill every connection named ``name`` every 20-50 ms for ``seconds``: how many."""
    kills, rng = 0, random.Random(seed)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        kills += kill_named(client, name)
        time.sleep(rng.uniform(0.02, 0.05))  # the fault's pace, not a wait
    return kills


def other_model(model: AttentionLSTM, shift: float) -> AttentionLSTM:
    """``model`` with a planted head bias: every forecast moves by ``shift``."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.head.bias.add_(shift)
    return twin


def finetune_processes() -> list[multiprocessing.process.BaseProcess]:
    """The fine-tuning child processes of this process's workers, alive."""
    return [p for p in multiprocessing.active_children() if p.name == "attnlstm-finetune"]


def events(client: redis.Redis, key: str) -> list[dict[str, str]]:
    """A models stream's events, as text."""
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries(client, key)]


def fill(client: redis.Redis, stream: str, values: np.ndarray, *, chunk: int = 5000) -> list[bytes]:
    """XADD values (T, S) time step by time step, series ``s{j}``; the ids in order."""
    ids: list[bytes] = []
    pipe = client.pipeline(transaction=False)
    n_points, n_series = values.shape
    for t in range(n_points):
        for j in range(n_series):
            pipe.xadd(stream, {"series": f"s{j}", "value": repr(float(values[t, j]))})
        if len(pipe) >= chunk or t == n_points - 1:
            ids.extend(pipe.execute())
    return ids


def entries(client: redis.Redis, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of a stream, typed (redis-py's own annotations are loose)."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream))


def spiked(values: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``values`` (points, series) with ``count`` spikes of +-20 after the 40th point:
    each an anomaly event."""
    rng = np.random.default_rng(seed)
    spikes = rng.choice(np.arange(40 * values.shape[1], values.size), size=count, replace=False)
    values.flat[spikes] += rng.choice([-1.0, 1.0], size=count) * 20.0
    return values


def stood_in(
    client: redis.Redis, keys: Keys, values: np.ndarray, ids: Sequence[bytes]
) -> np.ndarray:
    """``values`` (points, series; ``ids`` their input ids, row by row) as the windows of
    the worker that published ``keys.anomalies`` hold them: each event's value replaced by
    the forecast it broke, unless the value before it in its series was. Exact where that
    forecast lies within reach of the value before it (worker.online.scoring.STAND_IN_REACH
    of the series' usual changes), as on smooth sines; elsewhere the worker holds it nearer."""
    out = values.copy()
    at = {entry_id: k for k, entry_id in enumerate(ids)}
    events = sorted(
        (divmod(at[fields[b"src"]], values.shape[1]), float(fields[b"yhat"]))
        for _, fields in entries(client, keys.anomalies)
    )
    stood: set[tuple[int, int]] = set()
    for (t, j), yhat in events:
        if (t - 1, j) not in stood:
            out[t, j] = yhat
            stood.add((t, j))
    return out


def same_output(
    client: redis.Redis, got: Keys, want: Keys, to_ref: dict[bytes, bytes]
) -> tuple[int, int]:
    """``got``'s forecasts are ``want``'s, value for value, to the bit (``to_ref``: each
    of ``got``'s input ids to ``want``'s), and so are its anomaly events, each once: how
    many forecasts, and events."""
    forecasts = forecasts_by_src(client, got.output)  # fails on a duplicate
    reference = forecasts_by_src(client, want.output)
    assert len(forecasts) == len(reference)
    for src, fields in forecasts.items():
        for name in (b"yhat", b"attn", b"lo", b"hi"):
            assert fields[name] == reference[to_ref[src]][name], (src, name)
    same = (b"series", b"value", b"yhat", b"lo", b"hi", b"score")
    events = forecasts_by_src(client, got.anomalies)
    assert {to_ref[src]: [e[k] for k in same] for src, e in events.items()} == {
        src: [e[k] for k in same] for src, e in forecasts_by_src(client, want.anomalies).items()
    }
    return len(forecasts), len(events)


def by_src(client: redis.Redis, stream: str) -> dict[bytes, dict[bytes, bytes]]:
    """A dead stream's entries, keyed by the input entry they came from."""
    return {fields[b"src"]: fields for _, fields in entries(client, stream)}


def forecasts_by_src(client: redis.Redis, stream: str) -> dict[bytes, dict[bytes, bytes]]:
    """Every forecast entry, keyed by its ``src``; fails on a duplicate."""
    out: dict[bytes, dict[bytes, bytes]] = {}
    for _, fields in entries(client, stream):
        assert fields[b"src"] not in out, f"two forecasts for {fields[b'src']!r}"
        out[fields[b"src"]] = fields
    return out


def expected(
    model: AttentionLSTM, values: np.ndarray, ids: Sequence[bytes], device: str = "cpu"
) -> dict[bytes, np.ndarray]:
    """The offline model's forecast (on ``device``) for every input whose window is full,
    by input id."""
    window = model.config.context
    n_points, n_series = values.shape
    windows = np.lib.stride_tricks.sliding_window_view(values, window, axis=0)  # (T-W+1, S, W)
    on_device = copy.deepcopy(model).to(device)
    yhat, _ = predict(on_device, np.ascontiguousarray(windows.reshape(-1, window)), device=device)
    yhat = yhat.reshape(n_points - window + 1, n_series, -1)
    id_grid = np.asarray(ids, dtype=object).reshape(n_points, n_series)[window - 1 :]
    return {i: y for i, y in zip(id_grid.ravel(), yhat.reshape(-1, yhat.shape[-1]), strict=True)}


def assert_forecasts(
    client: redis.Redis, stream: str, want: dict[bytes, np.ndarray], atol: float = 1e-5
) -> dict[bytes, dict[bytes, bytes]]:
    """The stream holds exactly one forecast per input in ``want`` (by ``src``), each
    equal to it within ``atol``; returns the forecasts."""
    got = forecasts_by_src(client, stream)  # fails on a duplicate
    assert set(got) == set(want)
    for src, fields in got.items():
        np.testing.assert_allclose(json.loads(fields[b"yhat"]), want[src], rtol=0, atol=atol)
    return got


# -- the worker in this process -----------------------------------------------------


def settings_for(url: str, keys: Keys, **overrides: Any) -> Settings:
    """Worker settings for a test: ``keys`` on the server at ``url``, the CPU, consumer
    ``w``, no metrics port, no fine-tuning; ``overrides`` on top. No .env is read."""
    values: dict[str, Any] = {
        "redis_url": SecretStr(url),
        "consumer": "w",
        "device": "cpu",
        "metrics_port": 0,
        "finetune_interval_s": 0.0,
    }
    settings = Settings(_env_file=None, **(values | overrides))  # type: ignore[call-arg]
    return settings.with_keys(keys)


def engine_for(model: AttentionLSTM, settings: Settings) -> Engine:
    checkpoint = Checkpoint(model=model, version=version_of(model))
    return Engine(checkpoint, device=settings.device, max_batch=settings.max_batch)


def new_worker(
    settings: Settings,
    model: AttentionLSTM | None,
    *,
    burst: bool = False,
    metrics: Metrics | None = None,
    finetune_clock: Callable[[], float] = time.monotonic,
) -> Worker:
    """A worker on a connection of its own, as ``attnlstm worker`` makes one."""
    url = settings.url()
    assert url is not None
    client = connect(url, socket_timeout_s=settings.socket_timeout_s, client_name="test-worker")
    engine = engine_for(model, settings) if model is not None else None
    return Worker(
        client,
        engine=engine,
        settings=settings,
        metrics=metrics,
        burst=burst,
        finetune_clock=finetune_clock,
    )


def drain(settings: Settings, model: AttentionLSTM | None) -> dict[str, float]:
    """A worker run in this process until the stream is drained (``--burst``); its report."""
    return new_worker(settings, model, burst=True).run()


class WorkerThread:
    """A worker running in a thread of this process for the length of a ``with`` block,
    then stopped as SIGTERM stops it. ``report`` holds its report after the block; an
    error it raised fails the test."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.report: dict[str, float] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)

    def _run(self) -> None:
        try:
            self.report = self.worker.run()
        except BaseException as e:  # surfaced in the test's thread
            self.error = e

    def start(self) -> WorkerThread:
        self._thread.start()
        return self

    def __enter__(self) -> WorkerThread:
        return self if self._thread.ident is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.worker.stop()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the worker did not stop within 60 s"
        if self.error is not None:
            raise self.error

    def wait_for(self, condition: Callable[[], object], timeout: float = 60) -> None:
        """Until ``condition()`` is true; fails if the worker stops or time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            if not self._thread.is_alive():
                pytest.fail(f"the worker stopped: {self.error!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:g} s waiting for the worker")
            time.sleep(0.02)


# -- the worker as a child process ----------------------------------------------------


def worker_cmd(model: Path, url: str, keys: Keys, *extra: str) -> list[str]:
    """``attnlstm worker`` on ``keys``, as a user runs it."""
    return [
        *CLI,
        "worker",
        "--redis-url", url,
        "--model", str(model),
        "--input-stream", keys.input,
        "--output-stream", keys.output,
        "--dead-stream", keys.dead,
        "--anomalies-stream", keys.anomalies,
        "--models-stream", keys.models,
        "--device", "cpu",
        "--threads", "1",
        "--metrics-port", "0",
        "--finetune-interval-s", "0",
        *extra,
    ]  # fmt: skip


def worker_env() -> dict[str, str]:
    """The environment for a worker child: no stray ATTNLSTM_* settings, no .env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNLSTM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class WorkerProcess:
    """``attnlstm worker`` as a child process for the length of a ``with`` block, then
    stopped with SIGTERM; ``stderr`` and ``returncode`` are there after the block."""

    def __init__(self, cmd: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=worker_env(),
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=pdeathsig_preexec(),  # gone with a test run killed -9
        )
        self.stderr = ""
        self.returncode: int | None = None

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM (after a SIGCONT, should a test have frozen it), and its exit; one that
        does not exit within 30 s is killed, and the test fails."""
        if self.returncode is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                _, self.stderr = self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                _, self.stderr = self.proc.communicate()
                self.returncode = self.proc.returncode
                pytest.fail(f"no exit within 30 s of SIGTERM: {self.stderr[-3000:]}")
            self.returncode = self.proc.returncode

    def wait_for(self, condition: Callable[[], object], timeout: float = 60) -> None:
        """Until ``condition()`` is true; fails if the worker exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the worker exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                pytest.fail("timed out waiting for the worker")
            time.sleep(0.02)


def burst_cli(cmd: list[str], cwd: Path, timeout: float = 120) -> dict[str, float]:
    """Run ``attnlstm worker --burst --json`` to the end in a child process; its report."""
    done = subprocess.run(
        [*cmd, "--burst", "--json"],
        cwd=cwd,
        env=worker_env(),
        preexec_fn=pdeathsig_preexec(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


DEBIAN_REDIS = Path("/usr/bin/redis-server")  # Debian's: Redis 7.0, built with TLS


def server_binaries() -> list[Any]:
    """The embedded server's binary and Debian's redis-server, where present."""
    found: dict[Path, Path] = {}
    with contextlib.suppress(EmbeddedServerError):
        binary = find_server_binary()
        found[binary.resolve()] = binary
    if DEBIAN_REDIS.exists():
        found.setdefault(DEBIAN_REDIS.resolve(), DEBIAN_REDIS)
    if not found:
        return [pytest.param(None, marks=pytest.mark.skip(reason="no Redis server binary"))]
    return [pytest.param(b, id=b.name) for b in found.values()]
