"""What ``attnlstm`` runs once its arguments have parsed: each command's function, and
how its result or a user's error is printed. Imported only then (it imports torch, 1-2
s), so that ``--help`` and a usage error answer at once."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from attnlstm.checkpoint import CheckpointError
from attnlstm.data import DataError
from worker.cli import live, offline
from worker.embedded import EmbeddedServerError
from worker.tools.bench import format_report
from worker.tools.poolbench import format_pool_report

EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130

Command = Callable[[argparse.Namespace], dict[str, Any]]
COMMANDS: dict[str, Command] = {
    "train": offline.train_command,
    "evaluate": offline.evaluate_command,
    "plot": lambda args: (live.live_plot_command if args.from_stream else offline.plot_command)(
        args
    ),
    "worker": live.worker_command,
    "replay": live.replay_command,
    "demo": live.demo_command,
    "models": live.models_command,
    "bench": live.bench_command,
}


def run(args: argparse.Namespace) -> int:
    """The parsed command run, its report printed; the exit status."""
    try:
        report = COMMANDS[args.command](args)
    except (DataError, CheckpointError, EmbeddedServerError, ValueError) as e:
        print(f"attnlstm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:  # writing a checkpoint or a plot
        where = f" {e.filename}" if e.filename else ""
        print(f"attnlstm {args.command}: error:{where} {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"attnlstm {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json:
        print(json.dumps(report))
    elif args.command == "bench":
        print((format_pool_report if args.workers else format_report)(report))
    else:
        _print_human(report)
    return 0


def _print_human(report: dict[str, Any]) -> None:
    for key, value in report.items():
        if isinstance(value, float):
            print(f"{key:>20}  {value:.6g}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{key:>20}")
            for row in value:
                print(" " * 22 + "  ".join(f"{k}={v}" for k, v in row.items()))
        elif isinstance(value, list):
            print(f"{key:>20}  {', '.join(map(str, value))}")
        elif isinstance(value, str) and "\n" in value:  # a table
            print(f"\n{value}")
        else:
            print(f"{key:>20}  {value}")
