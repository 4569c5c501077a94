"""``attnlstm``: the one command line. This module only parses and wires.

Errors a user can cause (bad arguments, unreadable data, a bad checkpoint) end in one
line on stderr and a non-zero exit, never a traceback. With ``--json`` the last line
on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from attnlstm.checkpoint import CheckpointError
from attnlstm.data import DataError, load_dataset
from attnlstm.device import resolve_device
from attnlstm.model import ModelConfig
from attnlstm.train import TrainConfig
from worker import offline
from worker.app import run_worker
from worker.argtypes import fraction, positive
from worker.bench import BenchPlan, format_report, run_bench
from worker.embedded import EmbeddedServerError
from worker.live_cli import (
    add_demo_args,
    add_live_plot_args,
    add_models_args,
    add_replay_args,
    run_demo_command,
    run_live_plot,
    run_models,
    run_replay,
    series_count,
)
from worker.settings import Settings, from_flags

EXIT_FAILURE = 1
EXIT_USAGE = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as for every other user error, pointing at --help.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _data_args(p: argparse.ArgumentParser, *, live: bool = False) -> None:
    p.add_argument(
        "--data",
        default="sine",
        help="sine (the article's series), sines (many), or csv:PATH (default: sine)",
    )
    p.add_argument(
        "--series",
        type=str if live else positive,
        default=50,
        help="series count for --data sines" + (", or the series id with --from-stream" * live),
    )
    p.add_argument(
        "--column",
        action="append",
        default=[],
        help="CSV value column (repeatable; default: every column but the first)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for data and training (default 0)")
    p.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.2,
        help="held-out tail of each series, in time order (default 0.2)",
    )
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda (default cpu)")
    p.add_argument(
        "--threads", type=positive, default=None, help="torch CPU threads (default: torch's)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attnlstm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model offline and save a checkpoint")
    _data_args(train)
    train.add_argument("--window", type=positive, default=20, help="input steps (default 20)")
    train.add_argument("--horizon", type=positive, default=1, help="forecast steps (default 1)")
    train.add_argument("--hidden", type=positive, default=32, help="LSTM units (default 32)")
    train.add_argument("--layers", type=positive, default=1, help="LSTM layers (default 1)")
    train.add_argument(
        "--epochs",
        type=positive,
        default=None,
        help="epochs (default: enough for about 3,000 optimiser steps, 3 to 300)",
    )
    train.add_argument("--batch-size", type=positive, default=64, help="(default 64)")
    train.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (default 1e-2)")
    train.add_argument(
        "--out", type=Path, default=Path("model.safetensors"), help="checkpoint path"
    )

    evaluate = sub.add_parser("evaluate", help="score a checkpoint against naive baselines")
    _data_args(evaluate)
    evaluate.add_argument("--model", type=Path, default=Path("model.safetensors"))
    evaluate.add_argument(
        "--period", type=positive, default=None, help="season length for seasonal naive"
    )

    plot = sub.add_parser(
        "plot",
        help="true vs predicted, attention heatmap, loss curves; or --from-stream",
        description="From a checkpoint and data (default), or with --from-stream --series ID "
        "from a running system's output and input streams.",
    )
    _data_args(plot, live=True)
    plot.add_argument("--model", type=Path, default=Path("model.safetensors"))
    plot.add_argument("--out", type=Path, default=Path("plots"), help="folder for the PNGs")
    add_live_plot_args(plot)

    demo = sub.add_parser(
        "demo",
        help="embedded server + worker + replay + plots, in one go",
        description="Runs on the embedded server unless ATTNLSTM_REDIS_URL is set; then it "
        "uses (and first empties) the streams demo:sensors, demo:forecasts, demo:sensors:dead.",
    )
    add_demo_args(demo)

    work = sub.add_parser(
        "worker",
        help="the long-running worker: sensor stream in, forecasts out",
        description="Flags override ATTNLSTM_* environment variables and .env; "
        "see the README for every setting.",
    )
    _worker_args(work)

    add_replay_args(
        sub.add_parser(
            "replay",
            help="write sine-wave or CSV test streams into the input stream",
            description="Sines (default) or --csv PATH, paced by --rate or --fast.",
        )
    )

    add_models_args(
        sub.add_parser(
            "models",
            help="the model store: list versions and events, roll back",
            description="Versions stored by the workers' fine-tuning, in Redis.",
        )
    )

    bench = sub.add_parser(
        "bench", help="worker throughput and latency beside raw Redis and per-entry serving"
    )
    bench.add_argument("--model", type=Path, default=None, help="(default: an untrained model)")
    bench.add_argument("--device", default="cpu", help="auto, cpu or cuda (default cpu)")
    bench.add_argument("--threads", type=positive, default=1, help="torch threads (default 1)")
    bench.add_argument("--redis-url", default=None, help="(default: an embedded server)")
    bench.add_argument("--entries", type=positive, default=100_000, help="(default 100000)")
    bench.add_argument("--series", type=positive, default=1_000, help="(default 1000)")
    bench.add_argument("--per-entry-entries", type=positive, default=20_000, help="(default 20000)")
    bench.add_argument("--rate", type=positive, default=2_000, help="entries/s (default 2000)")
    bench.add_argument("--seconds", type=float, default=20.0, help="latency run (default 20)")
    bench.add_argument(
        "--repeats", type=positive, default=3, help="rounds of the fast drains (default 3)"
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return parser


# Worker flags: (flag, settings field, type, help). Unset flags leave the setting alone.
_WORKER_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--redis-url", "redis_url", str, "redis://, rediss:// or unix:// (unset: embedded server)"),
    ("--redis-ca-file", "redis_ca_file", Path, "CA file to verify a rediss:// server with"),
    ("--redis-password-file", "redis_password_file", Path, "the URL user's password, in a file"),
    ("--input-stream", "input_stream", str, "stream to read (default sensors)"),
    ("--output-stream", "output_stream", str, "stream for forecasts (default forecasts)"),
    ("--dead-stream", "dead_stream", str, "stream for bad entries (default sensors:dead)"),
    ("--group", "group", str, "consumer group (default forecasters)"),
    ("--consumer", "consumer", str, "this worker's consumer name (default host-pid)"),
    ("--model", "model", Path, "checkpoint from attnlstm train (unset: the store, or cold start)"),
    ("--device", "device", str, "auto, cpu or cuda (default auto)"),
    ("--threads", "torch_threads", positive, "torch CPU threads (default: torch's)"),
    ("--max-batch", "max_batch", positive, "entries per batch, at most (default 1024)"),
    ("--max-wait-ms", "max_wait_ms", float, "longest wait for a batch to fill (default 5)"),
    ("--block-ms", "block_ms", positive, "one blocking read's longest wait (default 1000)"),
    ("--output-maxlen", "output_maxlen", positive, "approximate cap on the output stream"),
    ("--max-series", "max_series", positive, "series with a window, at most (default 100000)"),
    ("--checkpoint-interval-s", "checkpoint_interval_s", float, "window state saves (default 5)"),
    ("--metrics-port", "metrics_port", int, "/metrics and /healthz port, 0: off (default 9108)"),
    ("--history-len", "history_len", positive, "values kept per series (default 200)"),
    ("--finetune-interval-s", "finetune_interval_s", float, "between fine-tunes, 0: off (300)"),
    ("--drift-ratio", "drift_ratio", float, "rolling MAE / its level that fine-tunes now (1.5)"),
    ("--finetune-steps", "finetune_steps", positive, "optimiser steps a fine-tune (300)"),
    ("--promote-margin", "promote_margin", float, "MASE drop a candidate needs (0.02)"),
    ("--models-stream", "models_stream", str, "model events and store (default models)"),
    ("--keep-models", "keep_models", positive, "stored model versions kept (default 5)"),
)


def _worker_args(p: argparse.ArgumentParser) -> None:
    for flag, name, kind, text in _WORKER_FLAGS:
        p.add_argument(flag, dest=name, type=kind, default=None, help=text)
    p.add_argument("--burst", action="store_true", help="exit once the stream is drained")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def worker_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment and .env, with the flags that were given on top."""
    return from_flags(**{name: getattr(args, name) for _, name, _, _ in _WORKER_FLAGS})


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "worker":
        logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
        return run_worker(worker_settings(args), burst=args.burst)
    if args.command == "replay":
        return run_replay(args)
    if args.command == "models":
        return run_models(args)
    if args.command == "demo":
        logging.basicConfig(level="INFO", format=LOG_FORMAT)
        return run_demo_command(args)
    if args.command == "plot" and args.from_stream:
        return run_live_plot(args)
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
    n_series = args.series if isinstance(args.series, int) else series_count(args.series)
    dataset = load_dataset(args.data, n_series=n_series, columns=args.column, seed=args.seed)
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
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{key:>20}")
            for row in value:
                print(" " * 22 + "  ".join(f"{k}={v}" for k, v in row.items()))
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
