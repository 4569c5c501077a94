"""Helpers for the tests that run the worker against a real server."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import redis

from attnlstm.model import AttentionLSTM
from attnlstm.synthetic import SineSpec, make_sines
from attnlstm.train import predict
from tests.conftest import CLI, ROOT


def sine_values(n_series: int, n_points: int, seed: int = 0) -> np.ndarray:
    """(n_points, n_series) sines with their own frequency, phase, level and amplitude,
    laid out as they are written to the stream: one time step after another."""
    return make_sines(SineSpec(n_series=n_series, n_points=n_points), seed).values.T


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


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
    window = model.config.window
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


def worker_cmd(model: Path, url: str, prefix: str, *extra: str) -> list[str]:
    return [
        *CLI,
        "worker",
        "--redis-url",
        url,
        "--model",
        str(model),
        "--input-stream",
        f"{prefix}sensors",
        "--output-stream",
        f"{prefix}forecasts",
        "--dead-stream",
        f"{prefix}sensors:dead",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--metrics-port",
        "0",
        "--models-stream",
        f"{prefix}models",
        "--finetune-interval-s",
        "0",
        *extra,
    ]


def worker_env() -> dict[str, str]:
    """The environment for a worker child: no stray ATTNLSTM_* settings, no .env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNLSTM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class RunningWorker:
    """``attnlstm worker`` as a child process for the length of a ``with`` block, then
    stopped with SIGTERM; ``stderr`` and ``returncode`` are there after the block."""

    def __init__(self, cmd: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=worker_env(), stderr=subprocess.PIPE, text=True
        )
        self.stderr = ""
        self.returncode: int | None = None

    def __enter__(self) -> RunningWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            _, self.stderr = self.proc.communicate(timeout=30)
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


def run_worker(cmd: list[str], cwd: Path, timeout: float = 120) -> dict[str, float]:
    """Run a --burst worker to the end; its --json report."""
    done = subprocess.run(
        [*cmd, "--burst", "--json"],
        cwd=cwd,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return report
