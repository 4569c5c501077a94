"""The chaos suite (``make chaos``): each scenario attacks a guarantee against a real
server and records what came out; the table of every scenario is printed at the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chaos.judge import Outcome

OUTCOMES: list[Outcome] = []


@pytest.fixture
def record() -> Iterator[list[Outcome]]:
    """Where a scenario puts its outcome: printed in the table at the end of the run."""
    mine: list[Outcome] = []
    yield mine
    OUTCOMES.extend(mine)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not OUTCOMES:
        return
    terminalreporter.section("chaos: what each scenario did, and what came out")
    for line in Outcome.table(OUTCOMES):
        terminalreporter.write_line(line)
