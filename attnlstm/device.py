"""Choosing where the model runs."""

from __future__ import annotations

import contextlib
from pathlib import Path

# The names resolve_device takes: auto (CUDA when present), cpu, cuda, cuda:N. The
# command line and the worker's settings check a name with it before torch is imported.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"
# The most CPU threads torch is given (the command line's and the worker's settings):
# torch.set_num_threads(100000) ended the process in a segfault, with no word.
MAX_THREADS = 1024


def resolve_device(name: str) -> str:
    """``auto`` means CUDA when present, else the CPU; ``cuda`` without CUDA is an error."""
    import torch  # here: DEVICE_PATTERN's users need not wait for it

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")
        index = name.partition(":")[2]
        count = torch.cuda.device_count()
        if index and not (index.isdigit() and int(index) < count):
            gpus = f"{count} CUDA GPU(s): cuda:0 to cuda:{count - 1}"
            raise ValueError(f"device {name!r} asked for, but this machine has {gpus}")
        return name
    raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda")


def cpu_info(field: str) -> str:
    """The first ``field`` of /proc/cpuinfo (``model name``, ``vendor_id``); empty where
    there is none (not Linux, or a CPU that does not give it)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == field:
                return value.strip()
    return ""
