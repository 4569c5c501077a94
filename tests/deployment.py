"""What the deployment tests share: the secrets deploy/make-secrets.sh makes, and the
"Line by line" rights of deploy/README.md, tried against a server."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.conftest import ROOT
from worker.streams import ACL_FIX, fix_for, refused_for

DEPLOY = ROOT / "deploy"
USERS = ("worker", "producer", "loader", "reader")
ACL_LINE = re.compile(rf"- ({'|'.join(USERS)}) (can|cannot): `(.+)`")


def compose_tool() -> list[str] | None:
    """Debian's docker-compose (v1) or the v2 plugin; both run `config` with no engine."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if plugin.returncode == 0:
            return ["docker", "compose"]
    return None


def make_secrets(directory: Path) -> Path:
    """deploy/make-secrets.sh, as a user runs it: passwords, a CA, a server certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("deploy/make-secrets.sh needs openssl")
    secrets = directory / "secrets"
    subprocess.run(["sh", str(DEPLOY / "make-secrets.sh"), str(secrets)], check=True, timeout=60)
    return secrets


def acl_lines() -> list[tuple[str, bool, str]]:
    """deploy/README.md's "Line by line" list: (user, whether it can, the command)."""
    text = (DEPLOY / "README.md").read_text()
    section = text.split("### Line by line", 1)[1].split("\n## ", 1)[0]
    matches = (ACL_LINE.fullmatch(line) for line in section.splitlines())
    return [(m[1], m[2] == "can", m[3]) for m in matches if m]


def wrong_acl_lines(login: Callable[[str], redis.Redis]) -> list[str]:
    """Each line of the list run as its user, on a client from ``login(user)`` (which
    names no connection: that is a command of its own); the lines whose outcome is not
    the one they state. A "can" line may still fail for another reason (a missing key)."""
    lines = acl_lines()
    assert {user for user, _, _ in lines} == set(USERS)
    assert len(lines) > 100  # the whole list was found
    wrong = []
    for user, can, command in lines:
        with contextlib.closing(login(user)) as client:
            try:
                client.execute_command(*command.split())  # type: ignore[no-untyped-call]
                refused = False
            except redis.exceptions.NoPermissionError:
                refused = True
            except redis.ResponseError as e:
                if refused_for(e, "ATTNLSTM_VERSION"):  # it returned before it ran anything
                    wrong.append(f"{user}: {command} (another version: {e})")
                    continue
                # Refused inside a function ("ACL failure in script"), or let through by
                # the ACL, the command failing on its own.
                refused = fix_for(e) == ACL_FIX
        if refused == can:
            wrong.append(f"{user} {'can' if can else 'cannot'}: {command}")
    return wrong
