"""The product on a Redis Cluster, run as a user runs it: ``replay``, ``worker``,
``plot --from-stream``, ``models`` and ``demo`` given a cluster node's URL, every key
tagged so that a partition's keys, and the models keys, each share one slot. (The pool
on a cluster: tests/test_pool.py; redis-py's cluster client itself:
tests/test_cluster_basics.py.)"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

from attnlstm.checkpoint import save
from attnlstm.model import AttentionLSTM
from tests.cluster import LocalCluster, keyslot, owner
from tests.conftest import CLI
from tests.helpers import (
    as_user,
    engine_for,
    entries,
    settings_for,
    user_without,
    worker_cmd,
    worker_env,
)
from worker.app import run_service
from worker.keys import Keys
from worker.loop import Worker
from worker.signals import StopRequest
from worker.streams import (
    ACL_FIX,
    Wires,
    cluster_of,
    connect,
    keys_on,
    multi_exec,
    primaries,
    xadd,
)
from worker.tools.demo import DEMO_KEYS
from worker.tools.replay import replay


@pytest.fixture
def client(redis_cluster: LocalCluster) -> redis.Redis:
    client = connect(redis_cluster.url, socket_timeout_s=10, client_name="test")
    assert cluster_of(client) is not None  # found out by asking the node (HELLO)
    return client


def _cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        args, capture_output=True, text=True, env=env or worker_env(), cwd=cwd, timeout=180,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def test_a_worker_that_took_a_cluster_node_for_one_server_exits_saying_so(
    redis_cluster: LocalCluster, trained_sines: AttentionLSTM, stream_prefix: str
) -> None:
    """Started while its cluster was down (HELLO unanswered: one server, as the default
    guesses), or with ATTNLSTM_CLUSTER=false: every call was MOVED or CROSSSLOT, retried
    every 5 s for ever, and not a forecast came out."""
    settings = settings_for(redis_cluster.url, Keys.prefixed(stream_prefix), block_ms=100)
    plain = redis.Redis.from_url(redis_cluster.url)  # as connect() makes one for one server
    worker = Worker(plain, engine=engine_for(trained_sines, settings), settings=settings)
    with pytest.raises(ValueError, match=r"node of a Redis Cluster, .*ATTNLSTM_CLUSTER=true$"):
        worker.run()


def test_a_password_a_cluster_refuses_is_an_error_not_a_wait(
    redis_cluster: LocalCluster, model_file: Path, stream_prefix: str
) -> None:
    """redis-py's cluster client says a refused password as a RedisClusterException, which
    was taken for no node answering: the worker (ATTNLSTM_CLUSTER=true) retried it for
    ever, and the commands said "cannot reach Redis"."""
    url = redis_cluster.url.replace("redis://", "redis://nobody:wrong@")
    with pytest.raises(redis.AuthenticationError, match="invalid username-password pair"):
        connect(url, socket_timeout_s=5, client_name="test", cluster=True)
    keys = Keys.prefixed(stream_prefix).clustered()
    settings = settings_for(url, keys, cluster=True, model=model_file, block_ms=100)
    with pytest.raises(redis.AuthenticationError):  # not waited for
        run_service(settings, burst=True, stop=StopRequest())


def test_replay_worker_plot_and_models_take_a_cluster_url(
    redis_cluster: LocalCluster, client: redis.Redis, stream_prefix: str, model_file: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    url, partitions, base = redis_cluster.url, 3, Keys.prefixed(stream_prefix).clustered()
    sines = ["--series", "12", "--points", "60", "--seed", "5"]
    replay = [*CLI, "replay", "--redis-url", url, "--stream", base.input, "--fast"]
    report = _cli([*replay, "--partitions", str(partitions), *sines, "--json"], tmp_path)
    assert report["entries"] == 12 * 60
    lanes = [base.partition(k, partitions) for k in range(partitions)]
    assert sum(client.xlen(lane.input) for lane in lanes) == 12 * 60
    assert not client.exists(base.input)  # only the tagged partitions were written

    worker = worker_cmd(model_file, url, base, "--partitions", str(partitions), "--burst")
    report = _cli([*worker, "--json"], tmp_path)
    assert report["forecasts"] == 12 * (60 - 20 + 1)
    nodes = redis_cluster.client()
    for lane in lanes:  # each partition's keys in one slot, its input's
        slots = {keyslot(nodes, key) for key in (lane.input, lane.output, lane.state, lane.lease)}
        assert len(slots) == 1
        assert client.xlen(lane.output) > 0

    env = worker_env() | {
        "ATTNLSTM_OUTPUT_STREAM": base.output,
        "ATTNLSTM_INPUT_STREAM": base.input,
    }
    plot = [*CLI, "plot", "--from-stream", "--redis-url", url, "--out", str(tmp_path)]
    report = _cli(
        [*plot, "--partitions", str(partitions), "--series", "sine-7", "--json"], tmp_path, env
    )
    assert report["forecasts"] == 60 - 20 + 1

    models = [*CLI, "models", "list", "--redis-url", url, "--models-stream", base.models]
    report = _cli([*models, "--json"], tmp_path)
    assert report["serving"] is not None  # the worker stored its model file and serves it
    assert base.serving.startswith("{")  # under the models' hash tag
    assert client.exists(base.serving)


def test_the_demo_runs_on_a_cluster_in_partitions(
    redis_cluster: LocalCluster, client: redis.Redis, trained_sines: AttentionLSTM, tmp_path: Path
) -> None:
    save(tmp_path / "model.safetensors", trained_sines, {"data": "sines"})
    env = worker_env() | {"ATTNLSTM_REDIS_URL": redis_cluster.url, "ATTNLSTM_PARTITIONS": "4"}
    cmd = [*CLI, "demo", "--seconds", "3", "--series", "10", "--rate", "500", "--json"]
    report = _cli([*cmd, "--out", str(tmp_path)], tmp_path, env)
    assert report["entries"] == 1500
    assert report["forecasts"] > 0
    assert report["mae"] < report["naive_mae"]
    keys = DEMO_KEYS.clustered()
    written = [client.xlen(keys.partition(k, 4).input) for k in range(4)]
    assert sum(written) == 1500
    assert all(written)  # every partition had some


def test_wires_send_each_command_to_its_node_and_keep_the_order(
    redis_cluster: LocalCluster, client: redis.Redis, stream_prefix: str
) -> None:
    """One send across every node, a transaction among it: the replies come back in the
    order of the commands."""
    base = Keys.prefixed(stream_prefix).clustered()
    lanes = [base.partition(k, 6) for k in range(6)]
    nodes = {owner(redis_cluster.client(), lane.input).name for lane in lanes}
    assert len(nodes) >= 2  # the partitions span nodes
    wires = Wires(client)
    try:
        commands = [
            (*xadd(lane.input, maxlen=None), b"k", b"%d" % k) for k, lane in enumerate(lanes)
        ]
        moved = multi_exec(
            [(b"SET", lanes[0].state.encode(), b"x"), (b"GET", lanes[0].state.encode())]
        )
        wires.send([*commands, *moved, (b"XLEN", lanes[5].input.encode())])
        replies = wires.receive()
    finally:
        wires.close()
    ids = replies[: len(lanes)]
    assert all(isinstance(i, bytes) and b"-" in i for i in ids)
    assert replies[len(lanes) : -1] == [b"OK", b"QUEUED", b"QUEUED", [b"OK", b"x"]]
    assert replies[-1] == 1
    for lane, entry_id in zip(lanes, ids, strict=True):
        assert entries(client, lane.input)[0][0] == entry_id


def test_wires_refresh_a_stale_slot_table_after_a_moved_reply(
    redis_cluster: LocalCluster, client: redis.Redis, stream_prefix: str
) -> None:
    """A slot the client believes on the wrong node (as after a resharding): the reply is
    a MOVED error, returned in its place, and the next send goes to the right node."""
    nodes = cluster_of(client)
    assert nodes is not None
    key = Keys.prefixed(stream_prefix).clustered().partition(0, 1).input
    slot = keyslot(redis_cluster.client(), key)
    right = nodes.nodes_manager.slots_cache[slot]
    wrong = next(n for n in primaries(nodes) if n.name != right[0].name)
    nodes.nodes_manager.slots_cache[slot] = [wrong]  # stale, as after a resharding
    wires = Wires(client)
    try:
        wires.send([(b"XADD", key.encode(), b"*", b"k", b"1")])
        (moved,) = wires.receive()
        assert isinstance(moved, redis.exceptions.MovedError)  # a ResponseError, as any
        assert nodes.nodes_manager.slots_cache[slot][0].name == right[0].name  # refreshed
        wires.send([(b"XADD", key.encode(), b"*", b"k", b"2"), (b"XLEN", key.encode())])
        assert wires.receive()[1] == 1  # the first XADD was refused, not applied
    finally:
        wires.close()


def test_replay_sends_what_a_moved_slot_refused_to_its_new_owner(
    redis_cluster: LocalCluster, client: redis.Redis, stream_prefix: str
) -> None:
    """A failover or a resharding moves a partition's slot under a running replay: the
    node asked answers MOVED and writes nothing. replay stopped there ("refused: 9842
    127.0.0.1:7601", without the word MOVED); it sends those entries to the new owner,
    each once and in order."""
    nodes = cluster_of(client)
    assert nodes is not None
    stream = f"{stream_prefix}in"
    keys = keys_on(client, Keys(input=stream))
    moved = keys.partition(0, 2).input
    slot = keyslot(redis_cluster.client(), moved)
    right = nodes.nodes_manager.slots_cache[slot]
    nodes.nodes_manager.slots_cache[slot] = [
        next(n for n in primaries(nodes) if n.name != right[0].name)  # as before the move
    ]
    sent = [(b"series", b"s%d" % (i % 10), b"value", b"%d" % i) for i in range(200)]
    report = replay(client, stream, iter(sent), rate=None, partitions=2)
    assert report["entries"] == 200
    written = [entries(client, keys.partition(k, 2).input) for k in range(2)]
    assert sum(map(len, written)) == 200
    assert written[0]  # the moved partition got its entries
    for partition in written:  # each once, in the order sent
        values = [int(fields[b"value"]) for _, fields in partition]
        assert values == sorted(set(values))


def test_a_user_who_may_not_ask_for_the_slots_is_told_so(redis_cluster: LocalCluster) -> None:
    """redis-py says "Cluster mode is not enabled on this node" of a user refused
    CLUSTER SLOTS too: the error named an ATTNLSTM_CLUSTER that nobody had set first."""
    nodes = [redis_cluster.node_client(port) for port in redis_cluster.ports]
    with user_without(nodes, "no-slots", "-cluster|slots") as password:
        url = as_user(redis_cluster.url, "no-slots", password)
        for cluster in (None, True):  # found out by HELLO, or told
            with pytest.raises(
                ValueError,
                match=re.escape(f"Redis refused the URL's user CLUSTER SLOTS; {ACL_FIX}"),
            ):
                connect(url, socket_timeout_s=10, client_name="test", cluster=cluster)
