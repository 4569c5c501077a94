"""``attnlstm``: the one command line. This package only parses and wires.

Errors a user can cause (bad arguments, unreadable data, a bad checkpoint, a Redis that
refuses a command) end in one line on stderr and a non-zero exit, never a traceback.
With ``--json`` the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    # Ctrl-C at any moment, the imports below included (numpy's for the parser, redis's
    # and torch's for the command: 0.2-2 s), is one line and exit 130, not a traceback.
    args = None
    try:
        # Imported here, not above: an import of this package (the `attnlstm` script's)
        # is then over at once, and the rest of the start is inside this handler.
        from worker.cli.parser import build_parser

        args = build_parser().parse_args(argv)
        return _run(args)
    except KeyboardInterrupt:
        command = args.command if args is not None else _command_in(argv)
        print(f"attnlstm{' ' + command if command else ''}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    from worker.signals import caught

    # The commands only now: they import what the command needs, most of them torch (1-2
    # s), which --help and a usage error need not wait for.
    if args.command != "worker":
        from worker.cli.commands import run

        return run(args)
    with caught() as args.stop:  # from before that import: worker.signals says why
        from worker.cli.commands import run

        return run(args)


def _command_in(argv: Sequence[str] | None) -> str | None:
    """The command named on the command line, before it is parsed: its first word that
    is no option (the only options before a command are -h and --help)."""
    words = sys.argv[1:] if argv is None else argv
    return next((word for word in words if not word.startswith("-")), None)
