"""What the worker needs from a real Redis Cluster, shown with redis-py's RedisCluster: one
partition's keys (hash tag ``{k}``) in one slot, the function library on every primary,
FCALL routed by its first key, the stream commands, and raw commands (worker/streams.py
``Wire``) on the connection pool of the node that owns a key."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from tests.cluster import (
    LocalCluster,
    execute,
    keyslot,
    local_cluster,
    owner,
    primaries,
    transaction,
)
from tests.helpers import large_requests_logged
from worker import localcluster
from worker.embedded import tuning_args
from worker.keys import Keys
from worker.lease import LIBRARY, VERSION, Fence, ensure_library
from worker.streams import Wire, read_entries, read_group, xadd

PARTITION, PARTITIONS = 3, 8


@pytest.fixture
def client(redis_cluster: LocalCluster) -> Iterator[RedisCluster]:
    client = redis_cluster.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def prefix(client: RedisCluster) -> Iterator[str]:
    """A prefix for this test's keys; they are deleted after it, on every primary."""
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    yield prefix
    for node in primaries(client):
        node_client = node.redis_connection
        for key in node_client.scan_iter(match=f"{prefix}*", count=1000):
            node_client.delete(key)


@pytest.fixture
def keys(prefix: str) -> Keys:
    """Partition 3's keys: ``...sensors{3}``, ``...sensors{3}:windows:forecasters``, ..."""
    return Keys.prefixed(prefix).partition(PARTITION, PARTITIONS)


@pytest.fixture
def loaded(client: RedisCluster) -> None:
    """The project's function library on every primary."""
    client.function_load(LIBRARY, replace=True)


def _fcalls(node: ClusterNode) -> tuple[int, int]:
    """FCALLs this node ran, and those it refused (MOVED, CROSSSLOT), so far."""
    stats = node.redis_connection.info("commandstats").get("cmdstat_fcall", {})
    return int(stats.get("calls", 0)), int(stats.get("rejected_calls", 0))


def test_url_takes_db_0_only(redis_cluster: LocalCluster) -> None:
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        assert sorted(node.port for node in primaries(client)) == sorted(redis_cluster.ports)
    finally:
        client.close()
    with pytest.raises(redis.RedisClusterException, match="db"):
        RedisCluster.from_url(redis_cluster.url.removesuffix("/0") + "/1")


def test_a_partitions_keys_share_one_slot(client: RedisCluster, keys: Keys) -> None:
    names = [keys.input, keys.state, keys.output, keys.dead, keys.lease, keys.fence]
    assert keys.input.endswith("sensors{3}")
    assert keys.state.endswith("sensors{3}:windows:forecasters")
    assert keys.output.endswith("forecasts{3}")
    assert {keyslot(client, name) for name in names} == {keyslot(client, "{3}")}
    server_slots = {client.cluster_keyslot(name) for name in names}  # the server agrees
    assert server_slots == {keyslot(client, "{3}")}


def test_function_load_reaches_every_primary(
    client: RedisCluster, redis_cluster: LocalCluster
) -> None:
    nodes = primaries(client)
    assert len(nodes) == len(redis_cluster.ports)
    for node in nodes:
        node.redis_connection.function_flush()  # FUNCTION FLUSH on that node only
    # FUNCTION LOAD is sent to every primary; the reply is one per node, by node name.
    reply = cast(dict[str, Any], client.function_load(LIBRARY, replace=True))
    assert reply == {node.name: b"attnlstm" for node in nodes}
    for node in nodes:
        assert node.redis_connection.fcall("attnlstm_version", 0) == VERSION.encode()
    # The same by hand, node by node (what a loader without RedisCluster would do).
    for node in nodes:
        assert node.redis_connection.function_load(LIBRARY, replace=True) == b"attnlstm"


def test_the_library_is_checked_on_every_primary(client: RedisCluster) -> None:
    """A keyless FCALL goes to any one node: with the library on all primaries but one,
    the check used to pass whenever it went elsewhere, and every call on that primary's
    keys then failed ("Function not found"), retried for as long as the worker ran."""
    client.function_load(LIBRARY, replace=True)
    missing = primaries(client)[-1].redis_connection
    for _ in range(10):  # by chance, each time a third of the checks went to that node
        missing.function_flush()
        ensure_library(cast(redis.Redis, client))  # as the worker holds it
        assert missing.fcall("attnlstm_version", 0) == VERSION.encode()


def test_a_publish_of_megabytes_leaves_every_nodes_log_of_large_requests_empty(
    client: RedisCluster, prefix: str
) -> None:
    """The nodes run as the embedded server does (worker/embedded.py QUIET_COMMAND_LOG)."""
    keys: dict[str, str] = {}  # a key on each primary, by node name
    for tag in range(100):
        keys.setdefault(owner(client, f"{prefix}{{{tag}}}").name, f"{prefix}{{{tag}}}")
    assert len(keys) == len(primaries(client))
    for key in keys.values():
        node = owner(client, key).redis_connection
        info = node.info("server")
        version = f"valkey {info['valkey_version']}" if "valkey_version" in info else "redis"
        # None: a server with no such log (Redis), where the nodes start without the option
        logged = large_requests_logged(node, key)
        assert logged == (0 if tuning_args(version) else None)


def test_fcall_goes_to_the_node_owning_its_first_key(
    client: RedisCluster, prefix: str, loaded: None
) -> None:
    by_owner: dict[str, Keys] = {}
    for k in range(PARTITIONS):  # partitions on at least two different nodes
        part = Keys.prefixed(prefix).partition(k, PARTITIONS)
        by_owner.setdefault(owner(client, part.lease).name, part)
    assert len(by_owner) >= 2
    for part in by_owner.values():
        home = owner(client, part.lease)
        before = {node.name: _fcalls(node) for node in primaries(client)}
        fence, holder = client.fcall(
            "attnlstm_lease", 2, part.lease, part.fence, VERSION, "me#1", 5000
        )
        assert (fence, holder) == (1, b"me#1")
        for node in primaries(client):
            calls, rejected = _fcalls(node)
            ran = 1 if node.name == home.name else 0
            assert (calls, rejected) == (before[node.name][0] + ran, before[node.name][1])
        assert home.redis_connection.get(part.lease) == b"me#1"


def test_fcall_on_several_keys_of_one_slot_and_crossslot(
    client: RedisCluster, keys: Keys, prefix: str, loaded: None
) -> None:
    fence, _ = client.fcall("attnlstm_lease", 2, keys.lease, keys.fence, VERSION, "me#1", 5000)
    command = Fence(keys, "me#1", int(fence), 5000).publish(
        forecasts=[(b"s1", b"1-0", b"1", b"0.5", b"[]", b"v1", b"", b"")],
        state={b"meta": b"{}"},
        maxlen=1000,
    )
    # redis-py finds the keys of FCALL itself (numkeys), and routes it by them.
    published = execute(client, *(part.decode() for part in command))
    assert published == 1
    assert client.xlen(keys.output) == 1
    assert client.hget(keys.state, "meta") == b"{}"

    other = Keys.prefixed(prefix).partition(PARTITION + 1, PARTITIONS)
    assert keyslot(client, other.fence) != keyslot(client, keys.lease)
    # Two slots: refused by redis-py before anything is sent ...
    with pytest.raises(redis.RedisClusterException, match="same key slot"):
        client.fcall("attnlstm_lease", 2, keys.lease, other.fence, VERSION, "me#1", 5000)
    # ... and by the server (CROSSSLOT, before it looks at who owns the slot).
    node = owner(client, keys.lease).redis_connection
    with pytest.raises(redis.exceptions.ClusterCrossSlotError, match="same slot"):
        node.fcall("attnlstm_lease", 2, keys.lease, other.fence, VERSION, "me#1", 5000)


def test_stream_commands_through_the_cluster_client(client: RedisCluster, keys: Keys) -> None:
    ids = [client.xadd(keys.input, {"series": "a", "value": str(v)}) for v in range(3)]
    assert client.xgroup_create(keys.input, keys.group, id="0") is True
    got: Any = client.xreadgroup(keys.group, "c1", {keys.input: ">"}, count=10)
    assert [entry_id for entry_id, _ in got[0][1]] == ids  # RESP2: [[stream, entries]]
    next_id, claimed, deleted = client.xautoclaim(keys.input, keys.group, "c2", 0, "0-0")
    assert [entry_id for entry_id, _ in claimed] == ids
    assert (next_id, deleted) == (b"0-0", [])
    info = client.xinfo_stream(keys.input)
    assert info["length"] == 3
    assert info["last-generated-id"] == ids[-1]
    (group,) = client.xinfo_groups(keys.input)
    assert group["name"] == keys.group.encode()
    assert group["pending"] == 3
    assert group["lag"] == 0
    assert client.xack(keys.input, keys.group, *ids) == 3


def test_raw_commands_on_the_owning_nodes_pool(client: RedisCluster, keys: Keys) -> None:
    node = owner(client, keys.input)
    pool = node.redis_connection.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command(
            conn.pack_commands(
                [
                    (*xadd(keys.input, maxlen=None), b"series", b"a", b"value", b"1"),
                    (b"XGROUP", b"CREATE", keys.input.encode(), keys.group.encode(), b"0"),
                ]
            ),
            check_health=False,
        )
        entry_id = conn.read_response()
        assert conn.read_response() == b"OK"
    finally:
        pool.release(conn)

    # The project's Wire takes the node's plain Redis client as it is.
    wire = Wire(node.redis_connection)
    try:
        wire.send([read_group(keys, "c1", 10, None), (b"XLEN", keys.input.encode())])
        read, length = wire.receive()
    finally:
        wire.close()
    assert [entry_id for entry_id, _ in read_entries(read)] == [entry_id]
    assert length == 1

    # On another node the key's commands come back MOVED, as an error reply in its place.
    stranger = next(n for n in primaries(client) if n.name != node.name)
    wire = Wire(stranger.redis_connection)
    try:
        wire.send([(b"XLEN", keys.input.encode())])
        (moved,) = wire.receive()
    finally:
        wire.close()
    assert isinstance(moved, redis.exceptions.MovedError)
    assert (moved.slot_id, moved.node_addr) == (keyslot(client, keys.input), (node.host, node.port))


def test_transactions_must_stay_in_one_slot(client: RedisCluster, keys: Keys, prefix: str) -> None:
    other = Keys.prefixed(prefix).partition(PARTITION + 1, PARTITIONS)
    with transaction(client) as pipe:
        pipe.set(keys.lease, b"x").incr(keys.fence)
        # A quirk of redis-py 8.1: replies in a cluster transaction skip the response
        # callbacks (SET gives b"OK", not True as in a plain pipeline).
        assert pipe.execute() == [b"OK", 1]
    with transaction(client) as pipe:
        pipe.set(keys.lease, b"y").incr(other.fence)
        with pytest.raises(redis.exceptions.CrossSlotTransactionError):
            pipe.execute()
    assert client.get(keys.lease) == b"x"
    assert client.exists(other.fence) == 0
    with transaction(client, atomic=False) as pipe:  # no transaction: split by node
        pipe.set(keys.lease, b"z").incr(other.fence)
        assert pipe.execute() == [True, 1]


@pytest.fixture
def a_taken_port() -> Iterator[int]:
    """A loopback port another process's socket listens on, for the test's length."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_node_whose_port_is_taken_starts_again_on_fresh_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, a_taken_port: int
) -> None:
    """A port taken between the probe that chose it and the server's bind (what another
    program may do at any time) costs a restart of that node, not the cluster."""
    chosen = localcluster._free_port
    handed = iter([a_taken_port])  # the first node's client port

    def taken_first(taken: set[int]) -> int:
        return next(handed, None) or chosen(taken)

    monkeypatch.setattr(localcluster, "_free_port", taken_first)
    with local_cluster(tmp_path) as cluster:
        assert a_taken_port not in cluster.ports
        node = cluster.node_client(cluster.ports[0])
        try:
            assert node.execute_command("CLUSTER INFO")["cluster_state"] == "ok"  # type: ignore[no-untyped-call]
        finally:
            node.close()


def test_a_node_that_cannot_start_is_one_error_naming_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, a_taken_port: int
) -> None:
    """Every port it is given taken: a LocalClusterError with the node's own words, which
    `attnlstm bench --workers` reports beside what it measured on one server."""
    monkeypatch.setattr(localcluster, "_free_port", lambda taken: a_taken_port)
    with (
        pytest.raises(localcluster.LocalClusterError, match=r"(?s)exited.*Address already"),
        local_cluster(tmp_path),
    ):
        pass  # (never reached)
