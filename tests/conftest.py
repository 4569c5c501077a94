"""Shared fixtures. Torch gets one thread on purpose: tests never run in parallel,
and the CLI tests start torch in child processes beside this one."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from attnlstm.checkpoint import save
from attnlstm.data import load_dataset
from attnlstm.experiment import train_model
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.train import TrainConfig
from tests.cluster import LocalCluster, local_cluster
from worker.embedded import EmbeddedServer
from worker.keys import Keys

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
CLI = [sys.executable, "-m", "worker.cli"]


@pytest.fixture(scope="session")
def trained_sines() -> AttentionLSTM:
    """A model trained briefly on many sines: not the best, but a real forecaster."""
    dataset = load_dataset("sines", n_series=8, seed=3)
    model, _, metrics = train_model(
        dataset, ModelConfig(hidden_size=16, attention_size=16), TrainConfig(epochs=4, seed=3)
    )
    assert metrics["mase"] < 0.5, metrics  # it learned something, or the fixture is useless
    return model


@pytest.fixture(scope="session")
def model_file(trained_sines: AttentionLSTM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``trained_sines`` as a checkpoint file, for workers started as child processes."""
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save(path, trained_sines)
    return path


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """The URL of the Redis the tests run against, for the whole session.

    ``REDIS_URL`` set: that server, which must answer PING. Unset: one embedded server
    (:class:`worker.embedded.EmbeddedServer`) started for the session and stopped after it.
    The database is never flushed, since it may be someone's own: tests must put
    ``stream_prefix`` in front of every key they touch.
    """
    url = os.environ.get("REDIS_URL")
    if url:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        problem = ""
        try:
            client.ping()
        except (redis.RedisError, OSError) as error:
            problem = str(error) or type(error).__name__
        finally:
            client.close()
        if problem:
            pytest.fail(
                f"REDIS_URL={url} does not answer PING ({problem}). Start that server, fix "
                "the URL, or unset REDIS_URL to let the tests run an embedded server.",
                pytrace=False,
            )
        yield url
        return
    with EmbeddedServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A Redis Cluster of three primaries on loopback (:mod:`tests.cluster`), for the whole
    session; skips the test when no redis-server/redis-cli (or valkey) pair is found.

    Session scope: joining a cluster takes about 3 s (``--cluster create`` waits, then the
    gossip settles), more than most tests that use it, and nothing a test does to it
    (keys, the function library, which every test may load again) needs a fresh one.
    Fixtures start lazily, so sessions that never ask for it start no cluster. Tests
    must name their keys under a prefix of their own, as on the shared server.
    """
    with local_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """The session's Redis URL for one test. Nothing is flushed between tests (the server
    may be yours, via ``REDIS_URL``): always name keys with the ``stream_prefix`` fixture."""
    return redis_server_url


@pytest.fixture
def stream_prefix(redis_server_url: str) -> Iterator[str]:
    """A prefix unique to this test, like ``t-1a2b3c4d:``. Tests must start every stream
    and key name with it, so that tests never see each other's data on a shared server;
    every key under it is deleted after the test."""
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = redis.Redis.from_url(redis_server_url)
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def keys(stream_prefix: str) -> Keys:
    """The default key names under this test's ``stream_prefix``."""
    return Keys.prefixed(stream_prefix)


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's ATTNLSTM_* variables must not change what a test runs."""
    for name in [n for n in os.environ if n.startswith("ATTNLSTM_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client to ``redis_url`` returning bytes, closed after the test. Use
    ``stream_prefix`` for every key."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()
