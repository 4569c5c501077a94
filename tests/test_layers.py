"""The layers: the model library stands alone (no Redis, no settings, no worker, no
plotting), and the serving path needs none of the tools or the command line."""

from __future__ import annotations

import subprocess
import sys

import redis

from tests.conftest import ROOT


def imported_by(modules: str, *, among: tuple[str, ...]) -> list[str]:
    """The modules under the ``among`` prefixes that importing ``modules`` (a comma list)
    loads, in a fresh interpreter."""
    code = (
        f"import sys, {modules}\n"
        "print(','.join(m for m in sys.modules"
        f" if any(m == p or m.startswith(p + '.') for p in {among!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return [m for m in out.stdout.strip().split(",") if m]


def test_import_attnlstm_pulls_in_no_service_or_plotting_module() -> None:
    service = ("redis", "pydantic_settings", "worker", "matplotlib")
    assert imported_by("attnlstm, attnlstm.experiment, attnlstm.plots", among=service) == []


def test_library_source_never_names_the_service_layers() -> None:
    for path in (ROOT / "attnlstm").glob("*.py"):
        text = path.read_text()
        for forbidden in ("import redis", "from redis", "pydantic_settings", "from worker"):
            assert forbidden not in text, f"{path.name} uses {forbidden}"


def test_the_serving_path_imports_no_tool_and_no_command_line() -> None:
    loaded = imported_by("worker.app, worker.loop", among=("worker.tools", "worker.cli"))
    assert loaded == []
    assert "worker.loop" in imported_by("worker.app", among=("worker",))  # it can fail


def test_the_command_line_parses_its_arguments_without_torch() -> None:
    """--help and a usage error answer at once: torch (1-2 s to import) comes with the
    commands that need it, once the arguments have parsed."""
    assert imported_by("worker.cli, worker.cli.parser", among=("torch",)) == []
    assert imported_by("worker.cli.commands", among=("torch",)) == []
    assert "torch" in imported_by("worker.cli.live", among=("torch",))  # it can fail


def test_a_replay_writes_its_entries_without_loading_torch(
    redis_url: str, redis_client: redis.Redis, stream_prefix: str
) -> None:
    """``attnlstm replay`` needs no model: it starts writing at once, not 1-2 s later."""
    stream = f"{stream_prefix}in"
    flags = ["--redis-url", redis_url, "--stream", stream, "--points", "3", "--series", "5"]
    argv = ["replay", *flags, "--fast"]
    code = (
        "import sys\n"
        "from worker.cli import main\n"
        f"status = main({argv!r})\n"
        "print(status, 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "0 False"  # ran, and without torch
    assert redis_client.xlen(stream) == 3 * 5  # three values of each of the 5 sines
