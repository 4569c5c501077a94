"""``attnlstm``: the one command line. This package only parses and wires.

Errors a user can cause (bad arguments, unreadable data, a bad checkpoint, a Redis that
refuses a command) end in one line on stderr and a non-zero exit, never a traceback.
With ``--json`` the last line on stdout is one JSON object.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker.cli.parser import build_parser
from worker.signals import caught


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The commands only now: they import what the command needs, most of them torch (1-2
    # s), which --help and a usage error need not wait for.
    if args.command != "worker":
        from worker.cli.commands import run

        return run(args)
    with caught() as args.stop:  # from before that import: worker.signals says why
        from worker.cli.commands import run

        return run(args)
