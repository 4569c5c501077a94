"""Choosing where the model runs."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> str:
    """``auto`` means CUDA when present, else the CPU; ``cuda`` without CUDA is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")
        return name
    raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda")
