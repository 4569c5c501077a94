"""What ``attnlstm`` runs once its arguments have parsed: each command's function, and
how its result or a user's error is printed. A command's module is imported when it
runs: most import torch (1-2 s), which ``replay`` (and ``--help``, before this module)
need not wait for."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any, cast

import redis
from redis.exceptions import RedisClusterException

from attnlstm.data import DataError
from attnlstm.errors import CheckpointError
from worker.cli import EXIT_INTERRUPTED
from worker.cli.parser import EXIT_USAGE
from worker.embedded import EmbeddedServerError
from worker.streams import (
    ACL_FIX,
    NOT_REDIS_HINT,
    TLS_VERIFY_FIX,
    URL_CREDENTIALS,
    URL_TLS_VERIFY_FIX,
    credentials_fix,
    fix_for,
    unreachable,
)
from worker.usage import UsageError

EXIT_FAILURE = 1

Command = Callable[[argparse.Namespace], dict[str, Any]]
# Each command's module and function.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("worker.cli.offline", "train_command"),
    "evaluate": ("worker.cli.offline", "evaluate_command"),
    "plot": ("worker.cli.offline", "plot_command"),
    "worker": ("worker.cli.live", "worker_command"),
    "replay": ("worker.cli.replay", "replay_command"),
    "demo": ("worker.cli.live", "demo_command"),
    "models": ("worker.cli.live", "models_command"),
    "bench": ("worker.cli.live", "bench_command"),
}


def refusal(e: redis.ResponseError) -> str:
    """What Redis said, and what to fix where a setting is the obvious cause."""
    fix = fix_for(e)
    return f"{e}; {fix}" if fix else str(e)


# `bench` and `demo` make, scan and delete keys of their own, and load the functions:
# none of the services' users may run them, and the ACL template lists no right for them.
ADMIN_FIX = (
    "run `attnlstm {command}` as a user with every right (`user admin on #SHA256 ~* &* "
    "+@all`, deploy/README.md), not as one of the services' users"
)


def _said(args: argparse.Namespace, message: str) -> str:
    """``message`` with its fixes as they hold for the command: for ``bench``, which reads
    no ATTNLSTM_* variable, the CA named in the URL; for ``bench`` and ``demo``, a user
    with every right, not one the ACL template lists."""
    if args.command == "bench":
        message = message.replace(TLS_VERIFY_FIX, URL_TLS_VERIFY_FIX)
    if args.command in ("bench", "demo"):
        message = message.replace(ACL_FIX, ADMIN_FIX.format(command=args.command))
    return message


def _credentials_fix(args: argparse.Namespace) -> str:
    """What to fix where Redis refused the password, the file's given one."""
    if args.command == "bench":  # which reads no ATTNLSTM_* variable
        return credentials_fix(getattr(args, "redis_password_file", None), fix=URL_CREDENTIALS)
    named = getattr(args, "redis_password_file", None)
    return credentials_fix(named or os.environ.get("ATTNLSTM_REDIS_PASSWORD_FILE"))


def command_of(args: argparse.Namespace) -> Command:
    """The parsed command's function, its module imported now."""
    module, name = COMMANDS[args.command]
    if args.command == "plot" and args.from_stream:  # what a live system published
        module, name = "worker.cli.live", "live_plot_command"
    return cast(Command, getattr(importlib.import_module(module), name))


def run(args: argparse.Namespace) -> int:
    """The parsed command run, its report printed; the exit status."""
    try:
        report = command_of(args)(args)
    except UsageError as e:  # as the parser says it, naming the models command's action
        prog = " ".join(["attnlstm", args.command, *([args.action] if "action" in args else [])])
        print(f"{prog}: error: {e} (see {prog} --help)", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, CheckpointError, EmbeddedServerError, ValueError) as e:
        print(f"attnlstm {args.command}: error: {_said(args, str(e))}", file=sys.stderr)
        return EXIT_FAILURE
    except redis.AuthenticationError as e:  # (a ConnectionError, that no retry mends)
        message = f"Redis refused: {e}; {_credentials_fix(args)}"
        print(f"attnlstm {args.command}: error: {message}", file=sys.stderr)
        return EXIT_FAILURE
    except (redis.ConnectionError, redis.TimeoutError) as e:  # bench's or demo's Redis
        said = _said(args, unreachable(e, getattr(args, "redis_url", None)))
        print(f"attnlstm {args.command}: error: cannot reach Redis: {said}", file=sys.stderr)
        return EXIT_FAILURE
    except redis.ResponseError as e:
        said = _said(args, refusal(e))
        print(f"attnlstm {args.command}: error: Redis refused: {said}", file=sys.stderr)
        return EXIT_FAILURE
    except redis.DataError:  # a value of ours the client refused to send: a bug here
        raise
    except (redis.RedisError, RedisClusterException) as e:  # ssl_cert_reqs=bogus; a cluster's
        # (InvalidResponse: another server answered, as HTTP's "<" or "H")
        hint = f": {NOT_REDIS_HINT}" if isinstance(e, redis.InvalidResponse) else ""
        print(f"attnlstm {args.command}: error: Redis: {e}{hint}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:  # writing a checkpoint or a plot
        where = f" {e.filename}:" if e.filename else ""
        print(f"attnlstm {args.command}: error:{where} {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"attnlstm {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return _reported(args, report)


def _reported(args: argparse.Namespace, report: dict[str, Any]) -> int:
    """``report`` printed; the exit status: 1 where stdout would not take it all, 130
    where a stop signal cut the command short (a replay or a demo, with its report so
    far: `replay ... && next` went on after a replay cut short, exit 0)."""
    try:
        _print_report(args, report)
        sys.stdout.flush()
    except BrokenPipeError:  # `attnlstm evaluate | head -1`: whoever reads is gone
        _drop_stdout()
        return EXIT_FAILURE
    except OSError as e:  # `> /dev/full`, a disk full, a file system gone: not written
        _drop_stdout()
        message = f"cannot write the report: {e.strerror or e}"
        print(f"attnlstm {args.command}: error: {message}", file=sys.stderr)
        return EXIT_FAILURE
    if report.get("interrupted"):  # cut short: a script must not take it for done
        print(f"attnlstm {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _drop_stdout() -> None:
    """Stdout pointed at devnull, as Python advises after a failed write to it: else the
    flush at exit fails again, on what is still buffered."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _print_report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(_standard(report), allow_nan=False))
    elif args.command == "bench":
        from worker.tools.bench import format_report
        from worker.tools.poolbench import format_pool_report

        print((format_pool_report if args.workers else format_report)(report))
    else:
        _print_human(report)


def _standard(value: Any) -> Any:
    """``value`` with each NaN and infinity made None: standard JSON has no word for
    them (a row without intervals has NaN coverage), and strict parsers refuse Python's."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _standard(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_standard(v) for v in value]
    return value


def _figure(value: Any) -> str:
    """A figure of a report's row as printed without --json: None (no figure) as -."""
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


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
        elif isinstance(value, dict):  # demo --csv's held-out tail: it printed Python's dict
            print(f"{key:>20}  " + "  ".join(f"{k}={_figure(v)}" for k, v in value.items()))
        elif isinstance(value, str) and "\n" in value:  # a table
            print(f"\n{value}")
        else:
            print(f"{key:>20}  {value}")
