"""What a chaos scenario left in Redis, counted: every input against its forecast."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import redis

from tests.helpers import entries
from worker.keys import Keys
from worker.streams import id_key


@dataclass(frozen=True)
class Outcome:
    scenario: str
    does: str
    inputs: int  # valid inputs that should each get one forecast
    forecasts: int  # forecast entries published for them
    duplicates: int  # forecasts beyond the first for one input
    strays: int  # forecasts of entries that should have none (from the first wanted on)
    lost: int  # inputs with neither a forecast nor a dead letter
    accounted: int  # inputs the worker reported lost (attnlstm_entries_lost_total)
    may_lose: bool  # the fault destroys input (a trim): losses pass if all reported
    valid_dead: int  # valid inputs sent to the dead stream
    equal: str  # forecasts equal to an uninterrupted run's: yes, no, or n/a

    @property
    def passed(self) -> bool:
        # Reported losses are no excuse where the fault destroys no input: a worker that
        # acked entries unhandled and reported them lost would pass a count alone.
        return (
            self.duplicates == 0
            and self.strays == 0
            and self.valid_dead == 0
            and self.lost == self.accounted
            and (self.may_lose or self.lost == 0)
            and self.equal != "no"
        )

    @staticmethod
    def table(outcomes: list[Outcome]) -> list[str]:
        head = "| scenario | what it does | inputs | forecasts | duplicates | strays | lost "
        head += "(accounted) | valid dead-lettered | equal to an uninterrupted run | passed |"
        lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for o in outcomes:
            lines.append(
                f"| {o.scenario} | {o.does} | {o.inputs:,} | {o.forecasts:,} | {o.duplicates} "
                f"| {o.strays} | {o.lost} ({o.accounted}) | {o.valid_dead} | {o.equal} "
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
    may_lose: bool = False,
    atol: float = 1e-5,
) -> Outcome:
    """``want``: the forecast an uninterrupted run publishes for each valid input (by
    its id); ``compare`` False where the fault changes what the windows hold (input
    trimmed away), so only counts apply; ``may_lose`` where it destroys input, whose
    loss must then be reported. Forecasts of entries before the first wanted one (the
    windows' warm-up) are not judged."""
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
    first = min(map(id_key, want), default=(0, 0))
    return Outcome(
        scenario=scenario,
        does=does,
        inputs=len(want),
        forecasts=sum(n for src, n in seen.items() if src in want),
        duplicates=sum(n - 1 for n in seen.values()),
        strays=sum(n for src, n in seen.items() if src not in want and id_key(src) >= first),
        lost=sum(1 for src in want if src not in seen and src not in dead),
        accounted=accounted,
        may_lose=may_lose,
        valid_dead=len(dead & set(want)),
        equal=("yes" if equal else "no") if compare else "n/a",
    )
