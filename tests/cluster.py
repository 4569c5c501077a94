"""The tests' doors to a local Redis Cluster (:mod:`worker.localcluster`): one that
skips the test when no cluster can be built here, and typed wrappers of RedisCluster's
methods, which redis-py 8.1 leaves untyped (mypy --strict refuses to call them from
typed code)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.cluster import ClusterNode, ClusterPipeline, RedisCluster

from worker.localcluster import LocalCluster, NoClusterError
from worker.localcluster import local_cluster as _local_cluster
from worker.streams import primaries

__all__ = [
    "LocalCluster",
    "execute",
    "keyslot",
    "local_cluster",
    "owner",
    "primaries",
    "transaction",
]


@contextlib.contextmanager
def local_cluster(tmp_path: Path, *, masters: int = 3, replicas: int = 0) -> Iterator[LocalCluster]:
    """:func:`worker.localcluster.local_cluster`, or a skip when none can be built."""
    try:
        with _local_cluster(tmp_path, masters=masters, replicas=replicas) as cluster:
            yield cluster
    except NoClusterError as e:
        pytest.skip(str(e))


def owner(client: RedisCluster, key: str | bytes) -> ClusterNode:
    """The primary that owns ``key``'s slot (as the client's slot table has it)."""
    node: ClusterNode = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
    return node


def keyslot(client: RedisCluster, key: str | bytes) -> int:
    """``key``'s hash slot, computed by the client (hash tags included)."""
    slot: int = client.keyslot(key)  # type: ignore[no-untyped-call]
    return slot


def execute(client: RedisCluster, *args: Any) -> Any:
    """Any command, routed by its keys (by ``numkeys`` for FCALL)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def transaction(client: RedisCluster, *, atomic: bool = True) -> ClusterPipeline:
    """A pipeline; ``atomic``: MULTI/EXEC, whose keys must all be in one slot."""
    pipe: ClusterPipeline = client.pipeline(transaction=atomic)  # type: ignore[no-untyped-call]
    return pipe
