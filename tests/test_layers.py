"""The layers: the model library stands alone (no Redis, no settings, no worker, no
plotting), and the serving path needs none of the tools or the command line."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_import_attnlstm_pulls_in_no_service_or_plotting_module() -> None:
    code = (
        "import sys, attnlstm, attnlstm.experiment, attnlstm.plots\n"
        "bad = [m for m in ('redis', 'pydantic_settings', 'worker', 'matplotlib')"
        " if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_library_source_never_names_the_service_layers() -> None:
    for path in (ROOT / "attnlstm").glob("*.py"):
        text = path.read_text()
        for forbidden in ("import redis", "from redis", "pydantic_settings", "from worker"):
            assert forbidden not in text, f"{path.name} uses {forbidden}"


def test_the_serving_path_imports_no_tool_and_no_command_line() -> None:
    code = (
        "import sys, worker.app, worker.loop\n"
        "bad = [m for m in sys.modules if m.startswith(('worker.tools', 'worker.cli'))]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
