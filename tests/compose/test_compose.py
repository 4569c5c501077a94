"""The docker-compose deployment, run for real (`make compose-test`; not in `make test`).

Images are built on this host from Debian's packages (deploy/base-image.sh), with the
torch wheel pip has on disk where it has one; docker-compose.yml then runs as it is, on
those images (tests/compose/docker-compose.test.yml names them). The test talks to the
services only through the ports they publish on 127.0.0.1: as the `reader` user for what
was forecast, as the `producer` for input, and to each worker's /healthz and /metrics.
The scenarios run in file order on one deployment, then the TLS override on another;
each ends with `down -v` leaving nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
import redis

from tests.conftest import CLI, ROOT
from tests.deployment import compose_tool, make_secrets, wrong_acl_lines
from tests.helpers import entries, forecasts_by_src, free_port, wait_for
from worker.keys import Keys
from worker.lease import VERSION

pytestmark = pytest.mark.timeout(900)

HERE = Path(__file__).resolve().parent
PROJECT = "attnlstm-compose-test"
BASE = "attnlstm-base:bookworm"
WORKER_IMAGE = "attnlstm-test:cpu"
REDIS_IMAGE = "attnlstm-test:redis"
PARTITIONS = 12  # docker-compose.yml's default
TORCH = "torch-2.13.0+cpu-*.whl"  # the wheel the Dockerfile asks for, CPU build
COMPOSE = compose_tool()


def say(text: str) -> None:
    """A figure for the README, printed as the test goes (make compose-test shows it)."""
    print(f"compose-test: {text}", flush=True)


def sh(*cmd: str, timeout: float = 120, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def docker_ready() -> str:
    """Why the test cannot run here, or "" when it can."""
    if COMPOSE is None or shutil.which("docker") is None:
        return "needs docker and docker-compose (Debian: docker.io, docker-compose)"
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode:
        return "no Docker daemon answers (make compose-test starts one as root)"
    if shutil.which("debootstrap") is None:
        return "needs debootstrap for the base image (Debian: debootstrap)"
    return ""


if why := docker_ready():
    if os.environ.get("ATTNLSTM_COMPOSE_TEST_REQUIRED") == "1":  # CI: no skipping
        pytest.fail(why, pytrace=False)
    pytest.skip(why, allow_module_level=True)


# -- images -----------------------------------------------------------------------------


def _pip_setting(name: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", f"global.{name}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return os.environ.get(f"PIP_{name.upper().replace('-', '_')}") or done.stdout.strip()


def build_inputs() -> list[str]:
    """deploy/build-inputs/ filled as on a user's host, and the build arguments that go
    with it: the CPU wheel of torch where pip has one on disk (its find-links), then PyPI
    for torch's own requirements; the CA file where pip is told to trust one."""
    inputs = ROOT / "deploy" / "build-inputs"
    for old in [*inputs.glob("*.whl"), inputs / "ca.crt"]:
        old.unlink(missing_ok=True)
    args = []
    for folder in _pip_setting("find-links").split():
        for wheel in Path(folder).glob(TORCH):
            with contextlib.suppress(OSError):
                os.link(wheel, inputs / wheel.name)  # no copy where it can be a link
            if not (inputs / wheel.name).exists():
                shutil.copy(wheel, inputs / wheel.name)
            args = ["--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple"]
            break
    if (ca := _pip_setting("cert")) and Path(ca).is_file():
        shutil.copy(ca, inputs / "ca.crt")
    return args


def _build(*args: str) -> float:
    started = time.monotonic()
    # The build's network is the host's: pip reaches PyPI (and apt its mirror) as the
    # host's own do.
    sh("docker", "build", "--network", "host", *args, timeout=1200)
    return time.monotonic() - started


def _size_mb(image: str) -> float:
    return int(sh("docker", "image", "inspect", "-f", "{{.Size}}", image)) / 1e6


@pytest.fixture(scope="module")
def images() -> Iterator[None]:
    try:
        yield from _images()
    finally:  # not left for the next build, the GPU override's included (a CPU torch)
        for wheel in (ROOT / "deploy" / "build-inputs").glob("*.whl"):
            wheel.unlink()


def _images() -> Iterator[None]:
    started = time.monotonic()
    sh(str(ROOT / "deploy" / "base-image.sh"), BASE, timeout=900)
    say(f"base image {BASE}: {time.monotonic() - started:.0f} s, {_size_mb(BASE):.0f} MB")
    dockerfile = ["-f", "deploy/Dockerfile", "--build-arg", f"BASE={BASE}"]
    worker = [*dockerfile, *build_inputs(), "-t", WORKER_IMAGE, "."]
    first = _build(*worker)
    again = _build(*worker)
    say(
        f"worker image {WORKER_IMAGE}: built in {first:.0f} s, again (cached) in {again:.1f} s, "
        f"{_size_mb(WORKER_IMAGE):.0f} MB"
    )
    redis_args = ["-f", str(HERE / "redis.Dockerfile"), "--build-arg", f"BASE={BASE}"]
    took = _build(*redis_args, "-t", REDIS_IMAGE, str(HERE))
    say(f"redis image {REDIS_IMAGE}: built in {took:.0f} s, {_size_mb(REDIS_IMAGE):.0f} MB")
    yield


def test_the_image_holds_the_environment_alone_and_runs_as_its_own_user(images: None) -> None:
    """What the build stage was given (a wheel, a CA file) stays there."""
    run = ["docker", "run", "--rm", "--entrypoint", "sh", WORKER_IMAGE, "-c"]
    assert sh(*run, "test ! -e /build-inputs && id -u && command -v attnlstm") == (
        "10001\n/opt/attnlstm/bin/attnlstm\n"
    )
    assert "usage: attnlstm" in sh("docker", "run", "--rm", WORKER_IMAGE, "--help")


def test_the_gpu_override_builds_no_image_on_a_cpu_torch(images: None) -> None:
    """pip ranks a CPU wheel in build-inputs/ (2.13.0+cpu) above PyPI's CUDA torch
    (2.13.0): the GPU override's build took this host's, and its worker, on
    ATTNLSTM_DEVICE=cuda, stopped at start. The build arguments the override gives now
    stop the build, naming the wheel's folder."""
    if not list((ROOT / "deploy" / "build-inputs").glob(TORCH)):
        pytest.skip("pip has no CPU wheel of torch on disk here to put in build-inputs/")
    override = (ROOT / "deploy" / "docker-compose.gpu.yml").read_text()
    given = re.findall(r"^ +(TORCH_\w+): \"?([^\s\"]+)", override, re.MULTILINE)
    assert dict(given) == {"TORCH_INDEX_URL": "https://pypi.org/simple", "TORCH_CUDA": "1"}
    args = [arg for name, value in given for arg in ("--build-arg", f"{name}={value}")]
    build = ["docker", "build", "--network", "host", "-f", "deploy/Dockerfile", "--target"]
    done = subprocess.run(
        [*build, "build", "--build-arg", f"BASE={BASE}", *args, "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode != 0
    assert (
        "torch 2.13.0+cpu has no CUDA, for a GPU image: a CPU wheel in deploy/build-inputs/ "
        "was taken before the index"
    ) in done.stdout + done.stderr


# -- a deployment -----------------------------------------------------------------------


@dataclass
class Deployment:
    """docker-compose.yml (and the TLS override) up under its own project name, with the
    secrets make-secrets.sh made and Redis published on a free loopback port."""

    secrets: Path
    tls: bool = False
    port: int = field(default_factory=free_port)

    def compose(self, *args: str, timeout: float = 300) -> str:
        files = ["-f", "docker-compose.yml", "-f", str(HERE / "docker-compose.test.yml")]
        if self.tls:
            files += ["-f", "deploy/docker-compose.tls.yml"]
        env = os.environ | {"SECRETS_DIR": str(self.secrets), "REDIS_HOST_PORT": str(self.port)}
        assert COMPOSE is not None
        return sh(*COMPOSE, "-p", PROJECT, *files, *args, timeout=timeout, env=env)

    def url(self, user: str) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{user}@127.0.0.1:{self.port}/0"

    def password_file(self, user: str) -> Path:
        return self.secrets / f"redis-{user}-password"

    def login(self, user: str) -> dict[str, str]:
        """The environment of an attnlstm command run as ``user`` from the host."""
        env = os.environ | {"ATTNLSTM_REDIS_PASSWORD_FILE": str(self.password_file(user))}
        if self.tls:
            env["ATTNLSTM_REDIS_CA_FILE"] = str(self.secrets / "redis-ca.crt")
        return env

    def client(self, user: str) -> redis.Redis:
        password = self.password_file(user).read_text().strip()
        tls = {"ssl": True, "ssl_ca_certs": str(self.secrets / "redis-ca.crt")} if self.tls else {}
        return redis.Redis(port=self.port, username=user, password=password, **tls)  # type: ignore[arg-type]

    def containers(self, service: str) -> list[str]:
        project = f"label=com.docker.compose.project={PROJECT}"
        named = f"label=com.docker.compose.service={service}"
        return sh("docker", "ps", "-aq", "--filter", project, "--filter", named).split()

    def state(self, container: str, what: str) -> str:
        return sh("docker", "inspect", "-f", f"{{{{{what}}}}}", container).strip()

    def endpoint(self, container: str, path: str) -> str:
        """GET of the worker's metrics port, as published on the host's loopback."""
        host_port = sh("docker", "port", container, "9108/tcp").split()[0]
        assert host_port.startswith("127.0.0.1:"), host_port  # the loopback only
        with urllib.request.urlopen(f"http://{host_port}{path}", timeout=5) as reply:
            return str(reply.read().decode())

    def metric(self, container: str, name: str) -> float:
        """One unlabelled sample of the worker's /metrics."""
        found = re.search(rf"^{name} (\S+)$", self.endpoint(container, "/metrics"), re.MULTILINE)
        assert found, name
        return float(found[1])

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans")
        left = [
            sh(
                "docker",
                kind,
                "ls",
                "-q",
                "--filter",
                f"label=com.docker.compose.project={PROJECT}",
            )
            for kind in ("container", "network", "volume")
        ]
        assert sh("docker", "ps", "-aq", "--filter", f"name={PROJECT}") == ""
        assert left == ["", "", ""]


# The keys of each partition, as docker-compose.yml's worker names them (default names).
PARTS = [Keys().partition(k, PARTITIONS) for k in range(PARTITIONS)]


def _order(entry_id: bytes) -> tuple[int, int]:
    ms, seq = entry_id.split(b"-")
    return int(ms), int(seq)


def once_each(reader: redis.Redis) -> int:
    """The forecasts, as a consumer reads them, against the input: in every partition,
    no input forecast twice, and every input from the first forecast on forecast once
    (before it the worker was training its first model: a cold start). Returns how many."""
    total = 0
    for keys in PARTS:
        inputs = [i for i, _ in entries(reader, keys.input)]
        srcs = forecasts_by_src(reader, keys.output)  # fails on a second forecast
        first = inputs.index(min(srcs, key=_order))
        assert set(srcs) == set(inputs[first:]), f"{keys.input}: an input lost"
        assert reader.xlen(keys.dead) == 0
        total += len(srcs)
    return total


def _newest(reader: redis.Redis, stream: str, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return cast(list[tuple[bytes, dict[bytes, bytes]]], reader.xrevrange(stream, count=count))


def drained(reader: redis.Redis) -> bool:
    """Every partition's newest input has its forecast."""
    for keys in PARTS:
        newest = _newest(reader, keys.input, 1)
        recent = {f[b"src"] for _, f in _newest(reader, keys.output, 200)}
        if newest and newest[0][0] not in recent:
            return False
    return True


def forecasts(reader: redis.Redis) -> int:
    return sum(int(reader.xlen(keys.output)) for keys in PARTS)


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_secrets(tmp_path_factory.mktemp("compose"))


@pytest.fixture(scope="module")
def plain(images: None, secrets: Path) -> Iterator[Deployment]:
    deployment = Deployment(secrets)
    deployment.compose("down", "-v", "--remove-orphans")  # what an earlier run left
    try:
        yield deployment
    finally:
        deployment.compose("down", "-v", "--remove-orphans")


def test_each_user_can_do_what_deploy_readme_says_and_nothing_else(plain: Deployment) -> None:
    plain.compose("up", "-d", "redis", "functions")
    wait_for(lambda: plain.state(plain.containers("functions")[0], ".State.Status") == "exited")
    assert plain.state(plain.containers("functions")[0], ".State.ExitCode") == "0"
    assert wrong_acl_lines(plain.client) == []
    plain.down()  # what the lines wrote goes with the volume


def test_up_serves_forecasts_from_a_non_root_worker_its_checks_call_healthy(
    plain: Deployment, tmp_path: Path, model_file: Path
) -> None:
    started = time.monotonic()
    plain.compose("up", "-d")
    up = time.monotonic() - started
    plain.compose("--profile", "replay", "up", "-d", "replay")
    with contextlib.closing(plain.client("reader")) as reader:
        wait_for(lambda: forecasts(reader) > 0, timeout=120, what="a first forecast")
    say(f"`up -d` returned in {up:.0f} s; first forecast {time.monotonic() - started:.0f} s after")

    (worker,) = plain.containers("worker")
    (server,) = plain.containers("redis")
    for container in (server, worker):
        wait_for(
            lambda c=container: plain.state(c, ".State.Health.Status") == "healthy",  # type: ignore[misc]
            timeout=120,
            what="the container's health check",
        )
    health = json.loads(plain.endpoint(worker, "/healthz"))
    assert health["ok"] is True, health
    assert health["role"] == "active", health
    assert plain.metric(worker, "attnlstm_partitions_served") == PARTITIONS
    # Not root, in either container: the worker's own uid, the server's after its
    # entrypoint dropped root.
    server_uid = sh("docker", "exec", server, "id", "-u", "redis").strip()
    assert server_uid != "0"
    for container, uid in ((worker, "10001"), (server, server_uid)):
        status = sh("docker", "exec", container, "cat", "/proc/1/status")
        assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s", status, re.MULTILINE), status

    # A consumer's view: plot --from-stream, as the reader.
    plot = sh(
        *CLI, "plot", "--from-stream", "--series", "sine-7", "--json",
        "--redis-url", plain.url("reader"), "--partitions", str(PARTITIONS),
        "--out", str(tmp_path / "plot"),
        env=plain.login("reader"),
    )  # fmt: skip
    assert json.loads(plot.strip().splitlines()[-1])["written"]

    # The model store as deploy/README.md says to handle it: `attnlstm models` in the
    # worker's container, which has the URL, the password and the model key.
    sh("docker", "cp", str(model_file), f"{worker}:/models/model.safetensors")
    models = ("exec", "-T", "worker", "attnlstm", "models")
    promote = plain.compose(*models, "promote", "/models/model.safetensors", "--json")
    version = json.loads(promote.strip().splitlines()[-1])["serving"]
    assert re.search(rf"^ *serving +{version}$", plain.compose(*models, "list"), re.MULTILINE)
    wait_for(
        lambda: json.loads(plain.endpoint(worker, "/healthz"))["model"] == version,
        timeout=60,
        what="the promoted model served",
    )
    # ... and the functions' version, as the upgrade's paragraph asks for it.
    fcall = "valkey-cli --user worker FCALL attnlstm_version 0"
    auth = 'REDISCLI_AUTH="$(cat /run/secrets/redis_worker_password)"'
    assert plain.compose("exec", "-T", "redis", "sh", "-c", f"{auth} {fcall}").strip() == VERSION


def test_a_killed_worker_loses_and_repeats_nothing(plain: Deployment) -> None:
    """`docker kill` mid-drain, then `up -d` as an operator would (Docker counts a kill
    as a stop and does not restart it); then the worker's process SIGKILLed from the
    host mid-drain, as the kernel's OOM killer would, and Docker's restart policy
    brings it back. Every input is forecast exactly once."""
    plain.compose("rm", "-s", "-f", "replay")
    with contextlib.closing(plain.client("reader")) as reader:
        wait_for(lambda: drained(reader), timeout=120, what="the replay's input drained")
        before = once_each(reader)
        replay = subprocess.Popen(
            [
                *CLI, "replay", "--fast", "--series", "50", "--points", "2000", "--seed", "1",
                "--redis-url", plain.url("producer"), "--partitions", str(PARTITIONS),
            ],
            env=plain.login("producer"),
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            at_kill, at_crash = _kill_twice_mid_drain(plain, reader, replay, before)
        finally:  # a failure above leaves no replay writing into the next test
            replay.kill()
            replay.wait()
        total = before + 50 * 2000
        wait_for(lambda: drained(reader), timeout=300, what="the drain after the restarts")
        assert at_kill < at_crash < total  # both came mid-drain
        assert once_each(reader) == total
    say(f"docker kill at {at_kill - before:,} and SIGKILL at {at_crash - before:,} of 100,000")


def _kill_twice_mid_drain(
    plain: Deployment, reader: redis.Redis, replay: subprocess.Popen[bytes], before: int
) -> tuple[int, int]:
    """`docker kill`, `up -d`, then a SIGKILL of the worker's process from the host,
    each mid-drain; the forecasts out at each, once the replay has written everything."""
    (worker,) = plain.containers("worker")
    wait_for(lambda: forecasts(reader) >= before + 15_000, timeout=120, what="a drain")
    sh("docker", "kill", worker)
    at_kill = forecasts(reader)
    assert plain.state(worker, ".State.Status") == "exited"
    plain.compose("up", "-d")
    assert plain.containers("worker") == [worker]  # the same container, started again
    wait_for(lambda: forecasts(reader) >= at_kill + 15_000, timeout=120, what="the drain")
    os.kill(int(plain.state(worker, ".State.Pid")), signal.SIGKILL)
    at_crash = forecasts(reader)
    wait_for(
        lambda: (
            plain.state(worker, ".RestartCount") == "1"
            and plain.state(worker, ".State.Running") == "true"
        ),
        timeout=60,
        what="Docker's restart of the worker",
    )
    assert replay.wait(timeout=300) == 0
    return at_kill, at_crash


def test_scale_worker_3_shares_the_partitions(plain: Deployment) -> None:
    plain.compose("up", "-d", "--scale", "worker=3")
    plain.compose("--profile", "replay", "up", "-d", "replay")
    workers = plain.containers("worker")
    assert len(workers) == 3

    def each(name: str) -> list[float]:
        try:
            return [plain.metric(w, name) for w in workers]
        except OSError:  # a worker still starting: its port published, nothing listening
            return []

    wait_for(
        lambda: each("attnlstm_partitions_served") == [4, 4, 4],
        timeout=120,
        what="4 partitions each",
    )
    published = each("attnlstm_forecasts_published_total")

    def all_publish() -> bool:
        now = each("attnlstm_forecasts_published_total")
        return len(now) == len(published) and all(
            n > p for n, p in zip(now, published, strict=True)
        )

    wait_for(all_publish, timeout=60, what="forecasts from each of the three")
    plain.compose("rm", "-s", "-f", "replay")
    with contextlib.closing(plain.client("reader")) as reader:
        wait_for(lambda: drained(reader), timeout=120, what="the drain")
        once_each(reader)
    say("--scale worker=3: 4 partitions each, forecasts from all three")


def test_down_leaves_nothing_behind(plain: Deployment) -> None:
    plain.down()


def test_the_tls_override_serves_forecasts_over_tls_only(images: None, secrets: Path) -> None:
    tls = Deployment(secrets, tls=True)
    try:
        tls.compose("up", "-d")
        tls.compose("--profile", "replay", "up", "-d", "replay")
        with contextlib.closing(tls.client("reader")) as reader:
            wait_for(lambda: forecasts(reader) > 0, timeout=120, what="a forecast over TLS")
        plain_text = redis.Redis(port=tls.port, socket_timeout=5)
        with contextlib.closing(plain_text), pytest.raises(redis.ConnectionError):
            plain_text.ping()
        tls.compose("rm", "-s", "-f", "replay")
        with contextlib.closing(tls.client("reader")) as reader:
            wait_for(lambda: drained(reader), timeout=120, what="the drain")
            once_each(reader)
    finally:
        tls.down()
