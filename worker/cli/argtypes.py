"""Argument types for the command line: each refuses bad text with a one-line reason."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

from attnlstm.device import DEVICE_PATTERN, MAX_THREADS
from worker.usage import UsageError

MAX_SEED = 2**64 - 1  # torch.manual_seed takes up to this; numpy's generators, no sign


def refuse_given(args: argparse.Namespace, flags: tuple[tuple[str, str], ...], what: str) -> None:
    """A usage error naming each of ``flags`` (flag, argument) that was given: it would
    be ignored. Each such flag defaults to None (or to [])."""
    given = [flag for flag, name in flags if getattr(args, name) not in (None, [])]
    if given:
        raise UsageError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} {what}")


def whole(text: str, least: int = 0) -> int:
    """A whole number >= ``least``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def positive(text: str) -> int:
    return whole(text, 1)


def two_or_more(text: str) -> int:
    """A whole number >= 2: a series of points (one point is no sine)."""
    return whole(text, 2)


def at_most(most: int) -> Callable[[str], int]:
    """A type for a whole number from 1 to ``most``."""

    def parse(text: str) -> int:
        value = positive(text)
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:,}, got {value}")
        return value

    return parse


threads = at_most(MAX_THREADS)  # torch threads


def seed(text: str) -> int:
    """A whole number from 0 to :data:`MAX_SEED`."""
    value = whole(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SEED}, got {value}")
    return value


def device(text: str) -> str:
    """auto, cpu, cuda or cuda:N; whether this machine has it is asked once it runs."""
    if not re.match(DEVICE_PATTERN, text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def fraction(text: str) -> float:
    value = number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def share(text: str) -> float:
    """A number from 0 to 1, both included: how often something happens."""
    value = number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {value}")
    return value


def number(text: str) -> float:
    """A finite number: nan passes every range check and inf breaks every count, so
    neither is one."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_number(text: str) -> float:
    """A finite number > 0: a rate, a length of time."""
    value = number(text)
    if value <= 0.0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def learning_rate(text: str) -> float:
    """A number > 0 and at most 1: Adam's steps are about this size, on values scaled to
    about 1; far past it, training overflows float32 (1e300 did, in a traceback)."""
    value = positive_number(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"must be at most 1, got {text!r}")
    return value


def nonnegative_number(text: str) -> float:
    """A finite number >= 0: a spread, where 0 means none."""
    value = number(text)
    if value < 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def data_spec(text: str) -> str:
    """sine, sines or csv:PATH: the data an offline command reads (whether PATH can be
    read is asked once it runs)."""
    if text in ("sine", "sines") or (text.startswith("csv:") and len(text) > 4):
        return text
    raise argparse.ArgumentTypeError(f"expected sine, sines or csv:PATH, got {text!r}")


def switch(text: str) -> bool:
    """on or off (also true/false, yes/no, 1/0)."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def counts_to(most: int) -> Callable[[str], tuple[int, ...]]:
    """A type for whole numbers from 1 to ``most``, comma-separated: ``1,2,4``."""

    def parse(text: str) -> tuple[int, ...]:
        values = tuple(positive(part.strip()) for part in text.split(","))
        if max(values) > most:
            raise argparse.ArgumentTypeError(f"must be at most {most}, got {max(values)}")
        return values

    return parse


def names_of(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """A type for comma-separated names, each one of ``allowed``: ``drains,models``."""

    def parse(text: str) -> tuple[str, ...]:
        picked = tuple(dict.fromkeys(part.strip() for part in text.split(",")))
        unknown = [name for name in picked if name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"expected some of {','.join(allowed)}, got {','.join(unknown)!r}"
            )
        return picked

    return parse
