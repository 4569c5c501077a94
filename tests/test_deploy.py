"""Deployment: the compose files validate, the shipped ACL gives each Redis user exactly
what it needs (a whole worker session on a real server, and the refusals), the worker
speaks TLS, and the README's metric names are the ones the worker exports."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from attnlstm.checkpoint import CheckpointError, dumps
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.synthetic import sine_steps
from tests.cluster import LocalCluster
from tests.conftest import CLI, ROOT
from tests.deployment import DEPLOY, USERS, compose_tool, make_secrets, wrong_acl_lines
from tests.helpers import (
    DEBIAN_REDIS,
    assert_forecasts,
    burst_cli,
    entries,
    expected,
    fill,
    free_port,
    large_requests_logged,
    server_binaries,
    wait_for,
    worker_cmd,
    worker_env,
)
from worker.cli import main
from worker.contract import UNSERVED_KINDS
from worker.embedded import (
    EmbeddedServer,
    EmbeddedServerError,
    pdeathsig_preexec,
    tuning_args,
)
from worker.keys import Keys
from worker.lease import LIBRARY, VERSION, Lease
from worker.localcluster import find_cluster_binaries
from worker.metrics import Metrics
from worker.online.store import ModelStore
from worker.streams import (
    PLAIN_TO_TLS_HINT,
    TLS_TO_PLAIN_HINT,
    TLS_VERIFY_FIX,
    URL_TLS_VERIFY_FIX,
)

KEYS = Keys()  # the ACL file is written for the default names
NO_RETRY = Retry(NoBackoff(), 0)  # a refusal is the answer, not a reason to try again

# -- docker-compose -----------------------------------------------------------------


COMPOSE = compose_tool()


def _services(config: str) -> set[str]:
    """The service names of a `docker-compose config` output."""
    block = config.split("\nservices:\n", 1)[1]
    return set(re.findall(r"^  ([\w-]+):$", re.split(r"\n\S", block, maxsplit=1)[0], re.MULTILINE))


@pytest.mark.skipif(COMPOSE is None, reason="no docker-compose: .ci/run installs Debian's")
@pytest.mark.parametrize(
    ("override", "wanted"),
    [
        (
            None,
            [
                "condition: service_healthy",
                "condition: service_completed_successfully",
                "load-functions.sh",
                "redis://worker@redis:6379/0",
                "ATTNLSTM_MODEL_KEY_FILE: /run/secrets/model_key",
                "valkey-cli",
            ],
        ),
        ("docker-compose.gpu.yml", ["driver: nvidia", "- gpu", "image: attnlstm:cuda"]),
        ("docker-compose.tls.yml", ["rediss://worker@redis:6379/0", "--tls-port", "--cacert"]),
    ],
)
def test_compose_accepts_the_file_and_each_override(
    override: str | None, wanted: list[str]
) -> None:
    assert COMPOSE is not None
    files = ["-f", "docker-compose.yml"] + (["-f", f"deploy/{override}"] if override else [])
    done = subprocess.run(
        [*COMPOSE, *files, "--profile", "replay", "--profile", "monitoring", "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert _services(done.stdout) == {"redis", "functions", "worker", "replay", "prometheus"}
    for text in wanted:
        assert text in done.stdout
    # Passwords come from secret files: no URL in the configuration holds one.
    assert not re.search(r"rediss?://[^@\s/]*:[^@\s/]*@", done.stdout)


def test_the_image_is_built_from_the_code_alone() -> None:
    """No .env, secret, checkpoint or local environment can reach the image; the build
    stage alone sees what deploy/build-inputs/ holds (tests/compose checks the image)."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*"  # everything out, then the few things the build needs
    assert {r for r in rules[1:] if r.startswith("!")} == {
        "!pyproject.toml",
        "!README.md",
        "!attnlstm/",
        "!worker/",
        "!deploy/build-inputs/",
    }


# -- the ACL file, on a real server -------------------------------------------------


@dataclass
class AclServer:
    """A server running with the shipped redis.conf and the rendered ACL file."""

    binary: Path
    directory: Path
    acl_file: Path
    secrets: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    def password_file(self, user: str) -> Path:
        return self.secrets / f"redis-{user}-password"

    def url(self, user: str) -> str:
        return f"redis://{user}@127.0.0.1:{self.port}/0"

    def client(self, user: str) -> redis.Redis:
        password = "admin" if user == "admin" else self.password_file(user).read_text().strip()
        return redis.Redis(port=self.port, username=user, password=password, client_name=user)

    def start(self) -> None:
        """The server as the container starts it: through deploy/redis-entrypoint.sh,
        under the name the Valkey image gives it (valkey-server), with the shipped
        redis.conf. The entrypoint renders its ACL file aside: the server reads the one
        the fixture rendered, with the tests' admin in it."""
        self.port = free_port()
        server = self.directory / "valkey-server"
        if not server.exists():
            server.symlink_to(self.binary)
        env = _entrypoint_env(self.directory / "entrypoint-users.acl", self.secrets)
        self.process = subprocess.Popen(
            [
                "sh", str(DEPLOY / "redis-entrypoint.sh"), "env", str(server),
                "--include", str(DEPLOY / "redis.conf"),
                "--aclfile", str(self.acl_file),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--logfile", str(self.directory / "server.log"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        with contextlib.closing(self.client("admin")) as admin:
            while True:
                try:
                    admin.ping()
                    return
                except redis.ConnectionError:  # not listening yet, or loading its AOF
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        log = (self.directory / "server.log").read_text(errors="replace")
                        pytest.fail(f"{self.binary} did not start:\n{log[-2000:]}")
                    time.sleep(0.02)

    def load_functions(self) -> None:
        _load_functions(self.binary.parent, self.port, self.password_file("loader"))

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # SIGTERM: a clean shutdown, the AOF written out
            self.process.wait(timeout=10)
            self.process = None


def _load_functions(cli_directory: Path, port: int, password_file: Path) -> None:
    """What the `functions` service does once Redis is up: deploy/load-functions.sh,
    as the `loader` user, with the CLI found in ``cli_directory``."""
    done = _run_load_functions(
        {
            "PATH": f"{cli_directory}{os.pathsep}{os.environ['PATH']}",
            "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": str(port),
            "LOADER_PASSWORD_FILE": str(password_file),
            "FUNCTIONS_FILE": str(ROOT / "worker" / "functions.lua"),
        }
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "loaded the attnlstm functions" in done.stdout


def _run_load_functions(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """deploy/load-functions.sh in ``env`` alone."""
    return subprocess.run(
        ["/bin/sh", str(DEPLOY / "load-functions.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_make_secrets_writes_where_the_compose_files_read(tmp_path: Path) -> None:
    """With SECRETS_DIR set and no folder given, it wrote ./secrets while docker-compose
    read SECRETS_DIR's: every secret missing."""
    if shutil.which("openssl") is None:
        pytest.skip("deploy/make-secrets.sh needs openssl")
    subprocess.run(
        ["sh", str(DEPLOY / "make-secrets.sh")],
        cwd=tmp_path,
        env=os.environ | {"SECRETS_DIR": "elsewhere"},
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert not (tmp_path / "secrets").exists()
    compose = (DEPLOY.parent / "docker-compose.yml").read_text()
    read = re.findall(r"\$\{SECRETS_DIR:-\./secrets\}/([\w.-]+)", compose)
    assert len(read) == 5
    assert all((tmp_path / "elsewhere" / name).stat().st_size > 0 for name in read)


def test_the_servers_certificate_serves_a_cluster_bus_too(tmp_path: Path) -> None:
    """With TLS on a Redis Cluster's bus (--tls-cluster yes) each node presents its
    certificate to the others as a client: one for servers only (as make-secrets.sh
    made it) left `redis-cli --cluster create` waiting for the nodes to join for ever."""
    secrets = make_secrets(tmp_path)
    for purpose in ("sslserver", "sslclient"):
        done = subprocess.run(
            ["openssl", "verify", "-purpose", purpose, "-CAfile", str(secrets / "redis-ca.crt"),
             str(secrets / "redis.crt")],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (purpose, done.stdout, done.stderr)


@pytest.mark.parametrize("missing", ["cli", "password", "library"])
def test_load_functions_says_in_one_line_what_it_lacks(missing: str, tmp_path: Path) -> None:
    """Run from a checkout on a cluster node, as deploy/README.md says, it printed `cat:
    /run/secrets/...: No such file`; with no CLI on PATH it exited 1 with no word."""
    bin_dir = tmp_path / "bin"  # the PATH: cat, and a CLI that says it loaded them
    bin_dir.mkdir()
    (bin_dir / "cat").symlink_to(shutil.which("cat") or "/bin/cat")
    if missing != "cli":
        (bin_dir / "valkey-cli").write_text("#!/bin/sh\necho attnlstm\n")
        (bin_dir / "valkey-cli").chmod(0o755)
    (tmp_path / "password").write_text("secret\n")
    absent = tmp_path / "absent"
    done = _run_load_functions(
        {
            "PATH": str(bin_dir),
            "LOADER_PASSWORD_FILE": str(absent if missing == "password" else tmp_path / "password"),
            "FUNCTIONS_FILE": str(
                absent if missing == "library" else ROOT / "worker/functions.lua"
            ),
        }
    )
    said = {
        "cli": "no valkey-cli or redis-cli on PATH",
        "password": f"cannot read {absent} (LOADER_PASSWORD_FILE)",
        "library": f"cannot read {absent} (FUNCTIONS_FILE)",
    }[missing]
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"load-functions: {said}\n")


def _entrypoint_env(acl_file: Path, secrets: Path) -> dict[str, str]:
    """The environment deploy/redis-entrypoint.sh renders ``acl_file`` in, from the
    shipped template and the secrets."""
    return {
        "PATH": os.environ["PATH"],
        "ACL_TEMPLATE": str(DEPLOY / "users.acl.template"),
        "ACL_FILE": str(acl_file),
        "WORKER_PASSWORD_FILE": str(secrets / "redis-worker-password"),
        "PRODUCER_PASSWORD_FILE": str(secrets / "redis-producer-password"),
        "LOADER_PASSWORD_FILE": str(secrets / "redis-loader-password"),
        "READER_PASSWORD_FILE": str(secrets / "redis-reader-password"),
    }


def _render_acl(directory: Path, secrets: Path) -> Path:
    """The ACL file the container's entrypoint script renders from the shipped template
    and the secrets."""
    acl_file = directory / "users.acl"
    env = _entrypoint_env(acl_file, secrets)
    # The entrypoint renders, then runs its arguments: the server in the container.
    subprocess.run(["sh", str(DEPLOY / "redis-entrypoint.sh"), "true"], env=env, check=True)
    return acl_file


def test_a_password_file_with_windows_line_ends_is_refused_by_the_server_s_entrypoint(
    tmp_path: Path,
) -> None:
    """As the worker refuses it: the entrypoint hashed the carriage return into the
    password, the worker did not send it, and Redis refused the worker."""
    secrets = make_secrets(tmp_path)
    (secrets / "redis-worker-password").write_bytes(b"secret\r\n")
    env = _entrypoint_env(tmp_path / "users.acl", secrets)
    done = subprocess.run(
        ["sh", str(DEPLOY / "redis-entrypoint.sh"), "true"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "holds a carriage return or a line break within its password" in done.stderr
    assert not (tmp_path / "users.acl").exists()


@pytest.fixture(params=server_binaries())
def acl_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AclServer]:
    """The ACL file rendered by the container's entrypoint script from the shipped
    template and secrets made by make-secrets.sh, plus an `admin` user (tests only) to
    look at what the others did."""
    secrets = make_secrets(tmp_path)
    acl_file = _render_acl(tmp_path, secrets)
    with acl_file.open("a") as f:
        f.write("user admin on >admin ~* &* +@all\n")
    data = tmp_path / "data"
    data.mkdir()
    server = AclServer(request.param, data, acl_file, secrets)
    server.start()
    try:
        server.load_functions()
        yield server
    finally:
        server.stop()


def _denials(admin: redis.Redis) -> set[tuple[str, str]]:
    """(user, what) for every refusal in the ACL log."""
    return {(str(e["username"]), str(e["object"])) for e in admin.acl_log()}


# redis-py sends CLIENT SETINFO on connect and ignores its refusal (users.acl.template).
SETINFO = "client|setinfo"


def test_the_worker_user_runs_a_whole_session(
    acl_server: AclServer, model_file: Path, trained_sines: AttentionLSTM, tmp_path: Path
) -> None:
    values = sine_steps(3, 30)
    with contextlib.closing(acl_server.client("producer")) as producer:
        ids = fill(producer, KEYS.input, values)
    cmd = worker_cmd(model_file, acl_server.url("worker"), KEYS)
    pw = ["--redis-password-file", str(acl_server.password_file("worker"))]
    report = burst_cli([*cmd, *pw], tmp_path, timeout=60)
    assert report["forecasts"] == 3 * (30 - trained_sines.config.window + 1)

    # What consumes the forecasts reads them as the reader.
    with contextlib.closing(acl_server.client("reader")) as reader:
        assert_forecasts(reader, KEYS.output, expected(trained_sines, values, ids))
    with contextlib.closing(acl_server.client("admin")) as admin:
        assert _denials(admin) <= {(user, SETINFO) for user in ("worker", "producer", "reader")}
        published, state = entries(admin, KEYS.output), admin.hgetall(KEYS.state)
        assert state
    # The AOF is replayed as the default user, which the ACL disables but leaves its
    # rights: every MULTI/EXEC (each batch with its acks) survives a restart.
    acl_server.stop()
    acl_server.start()
    with contextlib.closing(acl_server.client("admin")) as admin:
        assert entries(admin, KEYS.output) == published
        assert admin.hgetall(KEYS.state) == state
        assert admin.xpending(KEYS.input, KEYS.group)["pending"] == 0


def _burst_as_worker(
    acl_server: AclServer, model_file: Path, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """``attnlstm worker --burst`` as the worker user, with its password file."""
    cmd = worker_cmd(model_file, acl_server.url("worker"), KEYS)
    pw = ["--redis-password-file", str(acl_server.password_file("worker"))]
    return _cli([*cmd, *pw, "--burst"], tmp_path)


def _cli(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``argv`` (an ``attnlstm`` command) run to its end, as a user runs it, with ``env``
    beside the tests' environment."""
    return subprocess.run(
        argv,
        cwd=cwd,
        env=worker_env() | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _take_away(acl_server: AclServer, user: str, right: str) -> None:
    """``user``'s rules in the rendered ACL file, less ``+right`` wherever it is (a
    selector's rights are its own: ``-right`` after them takes away none)."""
    line = next(
        x for x in acl_server.acl_file.read_text().splitlines() if x.startswith(f"user {user} ")
    )
    rules = re.findall(r"\([^)]*\)|\S+", line.removeprefix(f"user {user} "))
    kept = [re.sub(rf"\s\+{right}(?=[\s)])", "", rule) for rule in rules if rule != f"+{right}"]
    assert kept != rules, f"{user} has no +{right}"
    with contextlib.closing(acl_server.client("admin")) as admin:
        admin.execute_command("ACL", "SETUSER", user, "reset", *kept)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    ("right", "entries"),
    [("multi", 30), ("hset", 30), ("hset", 0)],
    ids=["a-command", "one-the-functions-run", "one-the-stop-s-save-runs"],
)
def test_a_worker_user_missing_a_right_is_a_one_line_error_not_a_hang(
    acl_server: AclServer, model_file: Path, tmp_path: Path, right: str, entries: int
) -> None:
    """A right the worker's commands need, or one the attnlstm functions use (an ACL
    file older than the functions: Redis's refusal inside a function is no NOPERM, and
    was retried for ever), or one only the stop's save of the windows uses (a burst on
    an empty stream exited 0, with a warning)."""
    _take_away(acl_server, "worker", right)
    if entries:
        with contextlib.closing(acl_server.client("producer")) as producer:
            fill(producer, KEYS.input, sine_steps(3, entries))
    done = _burst_as_worker(acl_server, model_file, tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "refused this worker's user a command" in last, last
    assert "deploy/users.acl.template lists what each command needs" in last, last
    assert right in last or "The user executing the script can't run" in last, last  # 7.0
    assert "Traceback" not in done.stderr


def test_each_user_can_do_each_thing_deploy_readme_says_and_nothing_it_says_it_cannot(
    acl_server: AclServer,
) -> None:
    def login(user: str) -> redis.Redis:
        password = acl_server.password_file(user).read_text().strip()
        return redis.Redis(port=acl_server.port, username=user, password=password)

    assert wrong_acl_lines(login) == []


def test_the_container_s_server_keeps_no_log_of_large_requests(acl_server: AclServer) -> None:
    """A worker's publish of megabytes would have Valkey 8.1 log it and every command it
    runs as a large request; the entrypoint tells a Valkey that has such a log to keep
    none, and leaves a Redis, which has none, as it is (or it would not start)."""
    with contextlib.closing(acl_server.client("admin")) as admin:
        logged = large_requests_logged(admin, "t:log")
        valkey = admin.info("server").get("valkey_version")
        if valkey is not None and tuning_args(f"valkey {valkey}"):  # it had a log to keep
            assert logged == 0
            assert admin.config_get("commandlog-request-larger-than") == {
                "commandlog-request-larger-than": "-1"
            }
        else:  # no log to keep: the server started without the option it would refuse
            assert logged is None


def test_the_worker_user_runs_the_model_store(acl_server: AclServer) -> None:
    """Stored versions, signed with make-secrets.sh's model key, and their pruning, the
    serving one and its events, the fine-tune lock: what a fine-tune or a rollback does."""
    blobs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        blobs.append(dumps(AttentionLSTM(ModelConfig(hidden_size=4, attention_size=4))))
    (first, v1), (second, v2) = blobs
    with contextlib.closing(acl_server.client("worker")) as worker:
        key = (acl_server.secrets / "model-key").read_bytes().strip()
        assert len(key) == 64
        store = ModelStore(worker, KEYS, keep=1, source="test", key=key)
        store.put(first, v1)
        store.set_serving(v1, "promoted")
        store.put(second, v2)  # keep=1: v1 stays, as it serves
        store.set_serving(v2, "promoted")
        store.put(second, v2)  # v1 no longer serves: deleted
        assert store.versions() == [v2]
        with pytest.raises(CheckpointError, match="not in the store"):
            store.get(v1)
        assert store.get(v2).version == v2
        assert [f[b"event"] for _, f in store.events() if f] == [b"promoted", b"promoted"]
        lock = Lease(
            worker,
            key=KEYS.finetune_lock,
            fence_key=KEYS.finetune_fence,
            owner="test",
            ttl_ms=5000,
        )
        assert lock.acquire() == (lock.token, 1)
        lock.release()
        with contextlib.closing(acl_server.client("admin")) as admin:
            assert _denials(admin) <= {("worker", SETINFO)}


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    report: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return report


def test_the_cli_logs_in_with_a_password_file(
    acl_server: AclServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """`attnlstm replay` as the producer, `attnlstm models` as the worker, each with
    ATTNLSTM_REDIS_PASSWORD_FILE as docker-compose.yml sets it."""
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("ATTNLSTM_REDIS_PASSWORD_FILE", str(acl_server.password_file("producer")))
    url = acl_server.url("producer")
    fast = ("--fast", "--series", "2", "--points", "5", "--maxlen", "1000")
    assert _main(capsys, "replay", "--redis-url", url, *fast)["entries"] == 10
    monkeypatch.setenv("ATTNLSTM_REDIS_PASSWORD_FILE", str(acl_server.password_file("worker")))
    assert _main(capsys, "models", "list", "--redis-url", acl_server.url("worker")) == {
        "serving": None,
        "versions": [],
        "events": [],
    }
    with contextlib.closing(acl_server.client("admin")) as admin:
        assert admin.xlen(KEYS.input) == 10
        assert _denials(admin) <= {("worker", SETINFO), ("producer", SETINFO)}


def test_a_worker_whose_server_lacks_the_functions_says_who_must_load_them(
    acl_server: AclServer, model_file: Path, tmp_path: Path
) -> None:
    """A Redis restarted without its data, say: the worker may not load them itself."""
    with contextlib.closing(acl_server.client("admin")) as admin:
        admin.function_delete("attnlstm")
    done = _burst_as_worker(acl_server, model_file, tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"attnlstm worker: error: Redis lacks version {VERSION} of the attnlstm functions, "
        "and this user may not load them: load worker/functions.lua as a user that may (the "
        "`loader` of deploy/users.acl.template) (deploy/load-functions.sh, or redis-cli -x "
        "FUNCTION LOAD REPLACE < worker/functions.lua; in the docker-compose deployment, "
        "`docker compose up functions`)"
    )
    acl_server.load_functions()  # what the deployment does: deploy/load-functions.sh
    assert _burst_as_worker(acl_server, model_file, tmp_path).returncode == 0


def test_nobody_gets_in_without_a_password(acl_server: AclServer) -> None:
    """The default user is off: no command before AUTH, and no AUTH as it."""
    for username, password in ((None, None), (None, "admin"), ("worker", "not-it")):
        client = redis.Redis(
            port=acl_server.port, username=username, password=password, retry=NO_RETRY
        )
        with contextlib.closing(client), pytest.raises(redis.AuthenticationError):
            client.ping()


# -- TLS ------------------------------------------------------------------------------


def test_the_worker_connects_over_tls_only_with_the_ca(
    tmp_path: Path, model_file: Path, trained_sines: AttentionLSTM
) -> None:
    if not DEBIAN_REDIS.exists():
        pytest.skip(
            f"needs {DEBIAN_REDIS}, built with TLS (Debian's redis-server package: .ci/run "
            "installs it); the embedded valkey-server has no TLS"
        )
    secrets = make_secrets(tmp_path)
    port = free_port()
    tls = (
        "--tls-port", str(port),
        "--tls-cert-file", str(secrets / "redis.crt"),
        "--tls-key-file", str(secrets / "redis.key"),
        "--tls-ca-cert-file", str(secrets / "redis-ca.crt"),
        "--tls-auth-clients", "no",
    )  # fmt: skip
    server = EmbeddedServer(binary=DEBIAN_REDIS, extra_args=tls)  # TCP: TLS only
    try:
        server.start()
    except EmbeddedServerError as e:
        if "tls" in str(e).lower():
            pytest.skip(f"{DEBIAN_REDIS} was built without TLS: {e}")
        raise
    url = f"rediss://127.0.0.1:{port}/0"
    ca = secrets / "redis-ca.crt"
    try:
        values = sine_steps(2, 25)
        with contextlib.closing(redis.Redis.from_url(url, ssl_ca_certs=str(ca))) as producer:
            ids = fill(producer, KEYS.input, values)
        cmd = worker_cmd(model_file, url, KEYS, "--redis-ca-file", str(ca))
        report = burst_cli(cmd, tmp_path)
        assert report["forecasts"] == 2 * (25 - trained_sines.config.window + 1)
        with contextlib.closing(redis.Redis.from_url(server.url)) as local:
            assert_forecasts(local, KEYS.output, expected(trained_sines, values, ids))

        plain = redis.Redis(port=port, socket_timeout=2, retry=NO_RETRY)
        with contextlib.closing(plain), pytest.raises(redis.ConnectionError):
            plain.ping()
        # A redis:// URL for the TLS port: the server resets the connection, which the
        # commands and the worker's retries took for a server away, naming no scheme.
        wrong = f"redis://127.0.0.1:{port}/0"
        done = _cli([*CLI, "models", "list", "--redis-url", wrong], tmp_path)
        assert done.returncode == 1, done.stderr[-2000:]
        assert "Connection reset by peer" in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().endswith(PLAIN_TO_TLS_HINT), done.stderr[-2000:]
        _warns(worker_cmd(model_file, wrong, KEYS), tmp_path, f"; {PLAIN_TO_TLS_HINT}; retrying")

        unverified = redis.Redis.from_url(url, socket_timeout=2, retry=NO_RETRY)
        with (
            contextlib.closing(unverified),
            pytest.raises(redis.ConnectionError, match="certificate verify failed"),
        ):
            unverified.ping()

        # Without the CA the worker exits, saying what to fix: no retry mends it (it
        # retried for ever, as it does a server away); the commands say the same.
        # So does the cluster client's start (ATTNLSTM_CLUSTER=true), which went round a
        # loop of errors for ever, at full CPU, saying nothing.
        models = [*CLI, "models", "list", "--redis-url", url]
        for argv in (worker_cmd(model_file, url, KEYS, "--burst"), models):
            for cluster in ({}, {"ATTNLSTM_CLUSTER": "true"}):
                done = _cli(argv, tmp_path, **cluster)
                assert done.returncode == 1, done.stderr[-2000:]
                last = done.stderr.strip().splitlines()[-1]
                assert "CERTIFICATE_VERIFY_FAILED" in last, last
                assert last.endswith(TLS_VERIFY_FIX), last
        # `bench` reads no ATTNLSTM_* variable: it named ATTNLSTM_REDIS_CA_FILE, to no avail.
        done = _cli([*CLI, "bench", "--redis-url", url, "--runs", "drains"], tmp_path)
        assert done.returncode == 1, done.stderr[-2000:]
        assert done.stderr.strip().endswith(URL_TLS_VERIFY_FIX), done.stderr[-2000:]
        assert "ssl_ca_certs=CA_FILE" in URL_TLS_VERIFY_FIX

        # A server that asks for a client certificate: a client that writes first (its
        # name, here) reads no alert but an EOF, which the commands said no more of.
        with contextlib.closing(redis.Redis.from_url(server.url)) as local:
            local.config_set("tls-auth-clients", "yes")
        done = _cli(models, tmp_path, ATTNLSTM_REDIS_CA_FILE=str(ca))
        assert done.returncode == 1, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert "?ssl_certfile=CERT&ssl_keyfile=KEY)" in last, last
    finally:
        server.stop()


def test_a_rediss_url_for_a_port_without_tls_hints_at_redis(
    tmp_path: Path, model_file: Path
) -> None:
    """A server without TLS never answers a TLS handshake (it reads the client's hello as
    a command not yet ended; so does this listener): the handshake times out, and the
    commands and the worker, which waits for it, say which scheme the port may want."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"rediss://127.0.0.1:{listener.getsockname()[1]}/0"
        quick = {"ATTNLSTM_SOCKET_TIMEOUT_S": "1", "ATTNLSTM_BLOCK_MS": "200"}
        done = _cli([*CLI, "models", "list", "--redis-url", url], tmp_path, **quick)
        assert done.returncode == 1, done.stderr[-2000:]
        assert done.stderr.strip().endswith(TLS_TO_PLAIN_HINT), done.stderr[-2000:]
        warning = f"Timeout connecting to server; {TLS_TO_PLAIN_HINT}; retrying"
        _warns(worker_cmd(model_file, url, KEYS), tmp_path, warning, **quick)


def _warns(cmd: list[str], cwd: Path, warning: str, **env: str) -> None:
    """The worker ``cmd`` (with ``env`` beside the tests' environment) logs ``warning``
    within 60 s; then it is stopped with SIGTERM."""
    log = cwd / "worker.log"
    with log.open("w") as err:
        worker = subprocess.Popen(
            cmd, cwd=cwd, env=worker_env() | env, stderr=err, preexec_fn=pdeathsig_preexec()
        )

    def warned() -> bool:
        assert worker.poll() is None, log.read_text()[-2000:]  # it exited
        return warning in log.read_text()

    try:
        wait_for(warned, what=f"{warning!r} in the worker's log")
    finally:
        worker.terminate()
        worker.wait(timeout=30)


# -- metrics --------------------------------------------------------------------------


def test_the_readme_names_every_metric_the_worker_exports() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Metrics and health\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`((?:attnlstm|process)_\w+)", section))
    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in Metrics().registry.collect()
    }
    assert documented == exported


def test_the_users_run_a_pool_on_a_redis_cluster(
    redis_cluster: LocalCluster, model_file: Path, trained_sines: AttentionLSTM, tmp_path: Path
) -> None:
    """The same users on every node of a 3-master cluster, and the functions loaded on
    every primary by load-functions.sh as `loader`: the producer's replay and the
    worker's drain of 4 partitions go through, refused nothing but CLIENT SETINFO."""
    nodes = [redis_cluster.node_client(port) for port in redis_cluster.ports]
    try:
        _a_pool_as_the_users(redis_cluster, nodes, model_file, trained_sines, tmp_path)
    finally:  # the cluster is the session's: the default names and the users go again
        for node in nodes:
            for pattern in ("sensors*", "forecasts*", "anomalies*", "models*"):
                for key in node.scan_iter(match=pattern):
                    node.delete(key)
            for user in USERS:
                node.acl_deluser(user)
            node.close()


def _a_pool_as_the_users(
    redis_cluster: LocalCluster,
    nodes: list[redis.Redis],
    model_file: Path,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    secrets = make_secrets(tmp_path)
    users = [line.split() for line in _render_acl(tmp_path, secrets).read_text().splitlines()]
    for node in nodes:
        node.acl_log_reset()
        for _, name, *rules in (user for user in users if user[1] != "default"):
            node.execute_command("ACL", "SETUSER", name, "reset", *rules)  # type: ignore[no-untyped-call]
    binaries = find_cluster_binaries()
    assert binaries is not None  # the fixture found them
    url = f"redis://{{}}@127.0.0.1:{redis_cluster.ports[1]}/0"  # any node will do
    # One primary without the functions: the worker may not load them, and says where
    # they go (it gave the one-server line, which loads one node).
    for node in nodes[:2]:
        node.function_load(LIBRARY, replace=True)
    with contextlib.suppress(redis.ResponseError):  # loaded by an earlier test, or not
        nodes[2].function_delete("attnlstm")
    done = subprocess.run(
        [*worker_cmd(model_file, url.format("worker"), KEYS, "--partitions", "4", "--burst"),
         "--redis-password-file", str(secrets / "redis-worker-password")],
        env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.endswith(
        "load worker/functions.lua as a user that may (the `loader` of "
        "deploy/users.acl.template) on every primary of the cluster "
        "(deploy/load-functions.sh, with each one's REDIS_HOST and REDIS_PORT)"
    ), last
    # ... and which primary lacks them (all were named alike).
    lacking = f"of the attnlstm functions (127.0.0.1:{redis_cluster.ports[2]} has none)"
    assert lacking in last, last
    for node in nodes:  # its FUNCTION LOAD, refused: the one denial expected of it
        node.acl_log_reset()
    for port in redis_cluster.ports:  # load-functions.sh once per primary
        _load_functions(binaries.cli.parent, port, secrets / "redis-loader-password")

    env = worker_env() | {"ATTNLSTM_REDIS_PASSWORD_FILE": str(secrets / "redis-producer-password")}
    sines = ("--fast", "--series", "12", "--points", "40", "--partitions", "4", "--json")
    done = subprocess.run(
        [*CLI, "replay", "--redis-url", url.format("producer"), *sines],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["entries"] == 12 * 40
    worker = worker_cmd(model_file, url.format("worker"), KEYS, "--partitions", "4")
    password = ("--redis-password-file", str(secrets / "redis-worker-password"))
    report = burst_cli([*worker, *password], tmp_path)
    assert report["forecasts"] == 12 * (40 - trained_sines.config.window + 1)
    # An entry in the unpartitioned stream (a producer that ignores P): the next start
    # looks at it, and at whether the partitions were served, with the worker's rights.
    redis_cluster.client().xadd(KEYS.input, {"series": "s0", "value": "1"})
    assert burst_cli([*worker, *password], tmp_path)["forecasts"] == 0
    for node in nodes:
        assert _denials(node) <= {("worker", SETINFO), ("producer", SETINFO)}


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="no promtool: .ci/run installs Debian's prometheus")
def test_the_alerts_load_and_fire_on_the_series_they_are_for() -> None:
    """`promtool check config` reads prometheus.yml and the rules it loads;
    tests/alerts_test.yml feeds each alert the series a worker exports, and a standby's,
    which must fire none."""
    assert PROMTOOL is not None
    for args in (
        ["check", "config", str(ROOT / "deploy" / "prometheus.yml")],
        ["test", "rules", str(ROOT / "tests" / "alerts_test.yml")],
    ):
        proc = subprocess.run(
            [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "SUCCESS" in proc.stdout


def test_the_alerts_tell_valid_entries_not_served_from_bad_input() -> None:
    """By the worker's own reasons, listed again in the alerts: a new one left out
    would page as a producer's bad input."""
    text = (DEPLOY / "alerts.yml").read_text()
    listed = {frozenset(m.split("|")) for m in re.findall(r'reason[=!]~"([^"]+)"', text)}
    assert listed == {frozenset(UNSERVED_KINDS)}


def test_the_alerts_name_only_metrics_a_worker_exports() -> None:
    """An alert on a name no worker exports never fires, and says nothing of it."""
    families = list(Metrics().registry.collect())
    exported = {f.name for f in families} | {s.name for f in families for s in f.samples}
    named = set(re.findall(r"\battnlstm_\w+", (DEPLOY / "alerts.yml").read_text()))
    assert named, "no attnlstm metric in the alerts"
    assert named <= exported, sorted(named - exported)
