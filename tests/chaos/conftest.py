"""The chaos suite (``make chaos``): each scenario attacks a guarantee against a real
server and records what came out; the table of every scenario is printed at the end."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import redis

from tests.chaos.judge import Outcome, judge
from worker.keys import Keys

OUTCOMES: list[Outcome] = []


class Judged:
    """Judges a scenario (:func:`tests.chaos.judge.judge`), keeps its outcome for the
    table at the end of the run, and fails the scenario unless it passed."""

    def __call__(
        self, client: redis.Redis, keys: Keys, want: dict[bytes, np.ndarray], **how: Any
    ) -> Outcome:
        outcome = judge(client, keys, want, **how)
        OUTCOMES.append(outcome)
        assert outcome.passed, outcome
        return outcome


@pytest.fixture
def judged() -> Judged:
    return Judged()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not OUTCOMES:
        return
    terminalreporter.section("chaos: what each scenario did, and what came out")
    for line in Outcome.table(OUTCOMES):
        terminalreporter.write_line(line)
