"""Every Redis key and stream name the worker touches, derived from the settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    input: str = "sensors"  # producers XADD here; the worker never trims it
    output: str = "forecasts"  # one entry per forecast
    dead: str = "sensors:dead"  # bad input, with a reason
    group: str = "forecasters"  # the consumer group on `input`

    @property
    def state(self) -> str:
        """Window state checkpoint and the last input id it reflects."""
        return f"{self.input}:state:{self.group}"

    @property
    def lease(self) -> str:
        """Held by the one worker that consumes `input` for `group`."""
        return f"{self.input}:lease:{self.group}"
