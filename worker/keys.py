"""Every Redis key and stream name the worker touches, derived from the settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    input: str = "sensors"  # producers XADD here; the worker never trims it
    output: str = "forecasts"  # one entry per forecast
    dead: str = "sensors:dead"  # bad input, with a reason
    group: str = "forecasters"  # the consumer group on `input`
    models: str = "models"  # model events; stored versions are keyed under this name

    @property
    def state(self) -> str:
        """Window state checkpoint and the last input id it reflects."""
        return f"{self.input}:state:{self.group}"

    @property
    def lease(self) -> str:
        """Held by the one worker that consumes `input` for `group`."""
        return f"{self.input}:lease:{self.group}"

    def model(self, version: str) -> str:
        """One stored model version's checkpoint bytes."""
        return f"{self.models}:v:{version}"

    @property
    def versions(self) -> str:
        """The stored versions, newest first (a list)."""
        return f"{self.models}:versions"

    @property
    def serving(self) -> str:
        """The version every worker should serve."""
        return f"{self.models}:serving"

    @property
    def finetune_lock(self) -> str:
        """Held by the one worker fine-tuning now."""
        return f"{self.models}:finetune-lock"
