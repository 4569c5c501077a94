"""Opening a file that the caller was given by name, without being held or harmed by
what it names: importable without torch, as :mod:`attnlstm.errors` is."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO


def open_file(path: str | Path) -> BinaryIO:
    """``path`` opened for reading in binary: a regular file, or a pipe (``<(...)``,
    ``/dev/stdin`` piped; one with no writer reads as empty, not waited for), or a link
    to either; an OSError otherwise, as open() raises them, without opening it (a device
    may act on an open). A checkpoint or a secret named as ``/dev/zero`` was read until
    memory ran out, and a named pipe held the command until something wrote to it."""
    seen = os.stat(path)
    if not stat.S_ISFIFO(seen.st_mode):
        check_regular(seen.st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (seen.st_dev, seen.st_ino):
            raise OSError(errno.EAGAIN, "it was replaced as it was opened")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(mode: int) -> None:
    """An OSError, as open() raises them, unless ``mode`` (``os.stat``'s) is a regular
    file's: for a file read more than once, or by another library (a CA file)."""
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "it is a folder")
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "it is no regular file (a device, pipe or socket)")
