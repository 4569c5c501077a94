"""What a chaos scenario left in Redis, counted: every input against its forecast."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import redis

from tests.helpers import entries
from worker.keys import Keys


@dataclass(frozen=True)
class Outcome:
    scenario: str
    does: str
    inputs: int  # valid inputs that should each get one forecast
    forecasts: int  # forecast entries published for them
    duplicates: int  # forecasts beyond the first for one input
    lost: int  # inputs with neither a forecast nor a dead letter
    accounted: int  # inputs the worker reported lost (attnlstm_entries_lost_total)
    valid_dead: int  # valid inputs sent to the dead stream
    equal: str  # forecasts equal to an uninterrupted run's: yes, no, or n/a

    @property
    def passed(self) -> bool:
        return (
            self.duplicates == 0
            and self.valid_dead == 0
            and self.lost == self.accounted
            and self.equal != "no"
        )

    @staticmethod
    def table(outcomes: list[Outcome]) -> list[str]:
        head = "| scenario | what it does | inputs | forecasts | duplicates | lost (accounted) "
        head += "| valid dead-lettered | equal to an uninterrupted run | passed |"
        lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for o in outcomes:
            lines.append(
                f"| {o.scenario} | {o.does} | {o.inputs:,} | {o.forecasts:,} | {o.duplicates} "
                f"| {o.lost} ({o.accounted}) | {o.valid_dead} | {o.equal} "
                f"| {'yes' if o.passed else 'NO'} |"
            )
        return lines


def judge(
    client: redis.Redis,
    keys: Keys,
    want: dict[bytes, np.ndarray],
    *,
    scenario: str,
    does: str,
    compare: bool = True,
    atol: float = 1e-5,
) -> Outcome:
    """``want``: the forecast an uninterrupted run publishes for each valid input (by
    its id); ``compare`` False where the fault changes what the windows hold (input
    trimmed away), so only counts apply."""
    seen: dict[bytes, int] = {}
    equal = True
    for _, fields in entries(client, keys.output):
        src = fields[b"src"]
        seen[src] = seen.get(src, 0) + 1
        if compare and src in want:
            got = np.asarray(json.loads(fields[b"yhat"]))
            equal = equal and bool(np.allclose(got, want[src], rtol=0, atol=atol))
    dead, accounted = set(), 0
    for _, fields in entries(client, keys.dead):
        if b"lost" in fields:
            accounted += int(fields[b"lost"])
        else:
            dead.add(fields[b"src"])
    return Outcome(
        scenario=scenario,
        does=does,
        inputs=len(want),
        forecasts=sum(n for src, n in seen.items() if src in want),
        duplicates=sum(n - 1 for n in seen.values()),
        lost=sum(1 for src in want if src not in seen and src not in dead),
        accounted=accounted,
        valid_dead=len(dead & set(want)),
        equal=("yes" if equal else "no") if compare else "n/a",
    )
