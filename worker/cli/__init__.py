"""``attnlstm``: the one command line. This package only parses and wires.

Errors a user can cause (bad arguments, unreadable data, a bad checkpoint, a Redis that
refuses a command) end in one line on stderr and a non-zero exit, never a traceback.
With ``--json`` the last line on stdout is one JSON object.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator, Sequence

from worker.signals import StopRequest, caught, handled

EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    # Ctrl-C at any moment, the imports below included (numpy's for the parser, redis's
    # and torch's for the command: 0.2-2 s), is one line and exit 130, not a traceback.
    args = None
    command = _command_in(argv)
    try:
        with _stop_signals(command) as stop:
            # Imported here, not above: an import of this package (the `attnlstm`
            # script's) is then over at once, and the rest of the start is inside this
            # handler. The commands only after the parser: they import what the command
            # needs, most of them torch (1-2 s), which --help and a usage error need not
            # wait for.
            from worker.cli.parser import build_parser

            args = build_parser().parse_args(argv)
            args.stop = stop
            from worker.cli.commands import run

            return run(args)
    except KeyboardInterrupt:
        command = args.command if args is not None else command
        print(f"attnlstm{' ' + command if command else ''}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


@contextlib.contextmanager
def _stop_signals(command: str | None) -> Iterator[StopRequest | None]:
    """SIGTERM and SIGHUP (a timeout, systemd, docker stop, a terminal closed) caught
    from the process's first moment, before the parser's import (0.1 s): one that came
    before was lost where the process is a container's PID 1, for which the kernel has no
    default action. The worker's stop it as worker.signals says (and so does Ctrl-C:
    the request, for its ``args.stop``); any other command takes them as Ctrl-C, with its
    report so far where it has one (``replay``, ``demo``, ``bench``): by default they
    killed it, exit 143, with no report and its children and servers left behind."""
    if command == "worker":
        with caught() as request:
            yield request
        return
    with handled((signal.SIGTERM, signal.SIGHUP), signal.default_int_handler):
        yield None


def _command_in(argv: Sequence[str] | None) -> str | None:
    """The command named on the command line, before it is parsed: its first word that
    is no option (the only options before a command are -h and --help)."""
    words = sys.argv[1:] if argv is None else argv
    return next((word for word in words if not word.startswith("-")), None)
