"""``attnlstm``: the one command line. This module only parses and wires.

Errors a user can cause (bad arguments, unreadable data, a bad checkpoint) end in one
line on stderr and a non-zero exit, never a traceback. With ``--json`` the last line
on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import redis
import torch
from pydantic import ValidationError

from attnlstm.checkpoint import CheckpointError
from attnlstm.data import DataError, load_dataset
from attnlstm.device import resolve_device
from attnlstm.model import ModelConfig
from attnlstm.synthetic import SineSpec
from attnlstm.train import TrainConfig
from worker import offline
from worker.app import run_worker
from worker.bench import BenchPlan, format_report, run_bench
from worker.embedded import EmbeddedServerError
from worker.replay import CsvLayout, Fields, csv_entries, replay, sine_entries
from worker.settings import Settings
from worker.streams import connect

EXIT_FAILURE = 1
EXIT_USAGE = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as for every other user error, pointing at --help.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default="sine",
        help="sine (the article's series), sines (many), or csv:PATH (default: sine)",
    )
    p.add_argument("--series", type=_positive, default=50, help="series count for --data sines")
    p.add_argument(
        "--column",
        action="append",
        default=[],
        help="CSV value column (repeatable; default: every column but the first)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for data and training (default 0)")
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.2,
        help="held-out tail of each series, in time order (default 0.2)",
    )
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda (default cpu)")
    p.add_argument(
        "--threads", type=_positive, default=None, help="torch CPU threads (default: torch's)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attnlstm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model offline and save a checkpoint")
    _data_args(train)
    train.add_argument("--window", type=_positive, default=20, help="input steps (default 20)")
    train.add_argument("--horizon", type=_positive, default=1, help="forecast steps (default 1)")
    train.add_argument("--hidden", type=_positive, default=32, help="LSTM units (default 32)")
    train.add_argument("--layers", type=_positive, default=1, help="LSTM layers (default 1)")
    train.add_argument(
        "--epochs",
        type=_positive,
        default=None,
        help="epochs (default: enough for about 3,000 optimiser steps, 3 to 300)",
    )
    train.add_argument("--batch-size", type=_positive, default=64, help="(default 64)")
    train.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (default 1e-2)")
    train.add_argument(
        "--out", type=Path, default=Path("model.safetensors"), help="checkpoint path"
    )

    evaluate = sub.add_parser("evaluate", help="score a checkpoint against naive baselines")
    _data_args(evaluate)
    evaluate.add_argument("--model", type=Path, default=Path("model.safetensors"))
    evaluate.add_argument(
        "--period", type=_positive, default=None, help="season length for seasonal naive"
    )

    plot = sub.add_parser("plot", help="true vs predicted, attention heatmap, loss curves")
    _data_args(plot)
    plot.add_argument("--model", type=Path, default=Path("model.safetensors"))
    plot.add_argument("--out", type=Path, default=Path("plots"), help="folder for the PNGs")

    work = sub.add_parser(
        "worker",
        help="the long-running worker: sensor stream in, forecasts out",
        description="Flags override ATTNLSTM_* environment variables and .env; "
        "see the README for every setting.",
    )
    _worker_args(work)

    _replay_args(
        sub.add_parser(
            "replay",
            help="write sine-wave or CSV test streams into the input stream",
            description="Sines (default) or --csv PATH, paced by --rate or --fast.",
        )
    )

    bench = sub.add_parser(
        "bench", help="worker throughput and latency beside raw Redis and per-entry serving"
    )
    bench.add_argument("--model", type=Path, default=None, help="(default: an untrained model)")
    bench.add_argument("--device", default="cpu", help="auto, cpu or cuda (default cpu)")
    bench.add_argument("--threads", type=_positive, default=1, help="torch threads (default 1)")
    bench.add_argument("--redis-url", default=None, help="(default: an embedded server)")
    bench.add_argument("--entries", type=_positive, default=100_000, help="(default 100000)")
    bench.add_argument("--series", type=_positive, default=1_000, help="(default 1000)")
    bench.add_argument(
        "--per-entry-entries", type=_positive, default=20_000, help="(default 20000)"
    )
    bench.add_argument("--rate", type=_positive, default=2_000, help="entries/s (default 2000)")
    bench.add_argument("--seconds", type=float, default=20.0, help="latency run (default 20)")
    bench.add_argument(
        "--repeats", type=_positive, default=3, help="rounds of the fast drains (default 3)"
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return parser


# Worker flags: (flag, settings field, type, help). Unset flags leave the setting alone.
_WORKER_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--redis-url", "redis_url", str, "redis://, rediss:// or unix:// (unset: embedded server)"),
    ("--input-stream", "input_stream", str, "stream to read (default sensors)"),
    ("--output-stream", "output_stream", str, "stream for forecasts (default forecasts)"),
    ("--dead-stream", "dead_stream", str, "stream for bad entries (default sensors:dead)"),
    ("--group", "group", str, "consumer group (default forecasters)"),
    ("--consumer", "consumer", str, "this worker's consumer name (default host-pid)"),
    ("--model", "model", Path, "checkpoint from attnlstm train (default model.safetensors)"),
    ("--device", "device", str, "auto, cpu or cuda (default auto)"),
    ("--threads", "torch_threads", _positive, "torch CPU threads (default: torch's)"),
    ("--max-batch", "max_batch", _positive, "entries per batch, at most (default 1024)"),
    ("--max-wait-ms", "max_wait_ms", float, "longest wait for a batch to fill (default 5)"),
    ("--block-ms", "block_ms", _positive, "one blocking read's longest wait (default 1000)"),
    ("--output-maxlen", "output_maxlen", _positive, "approximate cap on the output stream"),
    ("--max-series", "max_series", _positive, "series with a window, at most (default 100000)"),
    ("--checkpoint-interval-s", "checkpoint_interval_s", float, "window state saves (default 5)"),
    ("--metrics-port", "metrics_port", int, "/metrics and /healthz port, 0: off (default 9108)"),
)


def _worker_args(p: argparse.ArgumentParser) -> None:
    for flag, name, kind, text in _WORKER_FLAGS:
        p.add_argument(flag, dest=name, type=kind, default=None, help=text)
    p.add_argument("--burst", action="store_true", help="exit once the stream is drained")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _pair(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None, help="(default: ATTNLSTM_REDIS_URL)")
    p.add_argument("--stream", default=None, help="(default: ATTNLSTM_INPUT_STREAM or sensors)")
    pace = p.add_mutually_exclusive_group(required=True)
    pace.add_argument("--rate", type=float, help="entries per second, steady")
    pace.add_argument("--fast", action="store_true", help="as fast as Redis takes them")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--maxlen", type=_positive, default=None, help="approximate cap (XADD MAXLEN ~)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    sines = p.add_argument_group("sines (the default source)")
    spec = SineSpec()
    sines.add_argument("--series", type=_positive, default=spec.n_series, help="(default 50)")
    sines.add_argument(
        "--points",
        type=_positive,
        default=None,
        help="per series (default: enough for --seconds at --rate, else 1000)",
    )
    sines.add_argument("--seed", type=int, default=0, help="same seed, same entries (default 0)")
    sines.add_argument("--prefix", default="sine-", help="series ids are PREFIX0.. (sine-)")
    for flag, name, what in (
        ("--freq", "freq", "angular step, radians per point"),
        ("--amplitude", "amplitude", "amplitude"),
        ("--offset", "offset", "level"),
        ("--drift-factor", "drift_factor", "multiplier at --drift-at"),
    ):
        lo, hi = getattr(spec, name)
        sines.add_argument(
            flag, nargs=2, type=_pair, metavar=("LO", "HI"), help=f"{what} (default {lo} {hi})"
        )
    sines.add_argument("--noise", type=float, default=0.0, help="std, in amplitudes (default 0)")
    sines.add_argument("--drift-at", type=_positive, default=None, help="step where drift starts")
    sines.add_argument(
        "--drift-kind", choices=["frequency", "amplitude"], default="frequency", help="(frequency)"
    )
    sines.add_argument("--anomaly-rate", type=float, default=0.0, help="share of spikes (0)")
    sines.add_argument("--bad-rate", type=float, default=0.0, help="share of malformed entries (0)")
    table = p.add_argument_group("CSV")
    table.add_argument("--csv", type=Path, default=None, help="replay this file instead of sines")
    table.add_argument("--time-column", default=None, help="(default: the first column)")
    table.add_argument(
        "--column", action="append", default=[], help="value column, repeatable (default: all)"
    )
    table.add_argument("--series-column", default=None, help="long format: the series id column")
    table.add_argument("--value-column", default="value", help="long format (default value)")


def _replay_source(args: argparse.Namespace) -> tuple[Iterable[Fields], int | None]:
    """The entries to write, and how many there are when that is known."""
    if args.csv is not None:
        layout = CsvLayout(
            time_column=args.time_column,
            value_columns=tuple(args.column),
            series_column=args.series_column,
            value_column=args.value_column,
        )
        return csv_entries(args.csv, layout), None
    points = args.points
    if points is None and args.seconds is not None:
        if args.rate is None:
            raise ValueError("--seconds with --fast needs --points: how many to write")
        points = max(2, math.ceil(args.seconds * args.rate / args.series))
    default = SineSpec()
    spec = SineSpec(
        n_series=args.series,
        n_points=points or 1000,
        freq=args.freq or default.freq,
        amplitude=args.amplitude or default.amplitude,
        offset=args.offset or default.offset,
        noise=args.noise,
        drift_at=args.drift_at,
        drift_kind=args.drift_kind,
        drift_factor=args.drift_factor or default.drift_factor,
        anomaly_rate=args.anomaly_rate,
    )
    if not 0.0 <= args.bad_rate <= 1.0:
        raise ValueError(f"--bad-rate must be in [0, 1], got {args.bad_rate}")
    entries = sine_entries(spec, seed=args.seed, bad_rate=args.bad_rate, prefix=args.prefix)
    return entries, None if args.bad_rate else spec.n_series * spec.n_points


def _replay(args: argparse.Namespace) -> dict[str, Any]:
    if args.rate is not None and not (0 < args.rate < math.inf):
        raise ValueError(f"--rate must be a positive number, got {args.rate}")
    entries, total = _replay_source(args)
    settings = _settings(redis_url=args.redis_url, input_stream=args.stream)
    url = settings.url()
    if url is None:
        raise ValueError(
            "replay needs a Redis: set ATTNLSTM_REDIS_URL or pass --redis-url "
            "(`attnlstm demo` runs an embedded one with a worker and a replay)"
        )
    client = connect(url, socket_timeout_s=settings.socket_timeout_s, client_name="replay")
    try:
        return replay(
            client,
            settings.input_stream,
            entries,
            rate=args.rate,
            seconds=args.seconds,
            maxlen=args.maxlen,
            total=total,
            progress=not args.json and sys.stderr.isatty(),
        )
    except redis.ConnectionError as e:
        raise ValueError(f"cannot reach Redis at {settings.url_for_logs()}: {e}") from None
    finally:
        client.close()


def _settings(**given: Any) -> Settings:
    """Settings from the environment and .env, with the given values on top."""
    try:
        return Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"bad settings: {problems}") from None


def worker_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment and .env, with the flags that were given on top."""
    return _settings(**{name: getattr(args, name) for _, name, _, _ in _WORKER_FLAGS})


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "worker":
        logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
        return run_worker(worker_settings(args), burst=args.burst)
    if args.command == "replay":
        return _replay(args)
    if args.command == "bench":
        logging.basicConfig(level="INFO", format=LOG_FORMAT)
        torch.set_num_threads(args.threads)
        plan = BenchPlan(
            entries=args.entries,
            series=args.series,
            per_entry_entries=args.per_entry_entries,
            rate=args.rate,
            seconds=args.seconds,
            repeats=args.repeats,
        )
        model = offline.open_checkpoint(args.model).model if args.model else None
        return run_bench(
            plan=plan, device=resolve_device(args.device), url=args.redis_url, model=model
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dataset = load_dataset(args.data, n_series=args.series, columns=args.column, seed=args.seed)
    if args.command == "train":
        return offline.run_train(
            dataset,
            data_spec=args.data,
            model_config=ModelConfig(
                window=args.window,
                horizon=args.horizon,
                hidden_size=args.hidden,
                attention_size=args.hidden,
                num_layers=args.layers,
            ),
            train_config=TrainConfig(
                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed
            ),
            out=args.out,
            val_fraction=args.val_fraction,
            device=device,
            progress=not args.json and sys.stderr.isatty(),
        )
    if args.command == "evaluate":
        return offline.run_evaluate(
            dataset,
            model_path=args.model,
            val_fraction=args.val_fraction,
            period=args.period,
            device=device,
        )
    return offline.run_plot(
        dataset,
        model_path=args.model,
        out_dir=args.out,
        val_fraction=args.val_fraction,
        device=device,
    )


def _print_human(report: dict[str, Any]) -> None:
    for key, value in report.items():
        if isinstance(value, float):
            print(f"{key:>20}  {value:.6g}")
        elif isinstance(value, list):
            print(f"{key:>20}  {', '.join(map(str, value))}")
        else:
            print(f"{key:>20}  {value}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = _run(args)
    except (DataError, CheckpointError, EmbeddedServerError, ValueError) as e:
        print(f"attnlstm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:  # writing a checkpoint or a plot
        where = f" {e.filename}" if e.filename else ""
        print(f"attnlstm {args.command}: error:{where} {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"attnlstm {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report))
    elif args.command == "bench":
        print(format_report(report))
    else:
        _print_human(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
