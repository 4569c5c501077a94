"""Argument types for the command line: each refuses bad text with a one-line reason."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


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


def nonnegative_number(text: str) -> float:
    """A finite number >= 0: a spread, where 0 means none."""
    value = number(text)
    if value < 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def switch(text: str) -> bool:
    """on or off (also true/false, yes/no, 1/0)."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def counts(text: str) -> tuple[int, ...]:
    """Whole numbers >= 1, comma-separated: ``1,2,4``."""
    return tuple(positive(part.strip()) for part in text.split(","))


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
