"""The ``attnlstm`` command line's arguments: every command, its flags and their help.

Argument types refuse bad text with a one-line reason (:mod:`worker.cli.argtypes`), and
a usage error is one line that points at ``--help``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

from attnlstm.synthetic import SineSpec
from attnlstm.windows import HELD_OUT
from worker.cli.argtypes import (
    at_most,
    counts_to,
    data_spec,
    device,
    fraction,
    learning_rate,
    names_of,
    nonnegative_number,
    number,
    positive,
    positive_number,
    seed,
    share,
    switch,
    threads,
    two_or_more,
    whole,
)
from worker.tools import RUNS

EXIT_USAGE = 2
MAXLEN_MAX = 2**63 - 1  # what Redis takes as a stream's MAXLEN: past it, a refusal
# Workers a pool bench starts at most, each a process beside a raw client: past a few a
# core they measure the scheduler (--workers 1,1000 started a thousand).
MAX_POOL_WORKERS = 4 * (os.cpu_count() or 1)
DESCRIPTION = (
    "Streaming forecasts with an Attention-LSTM: train and score models offline, run the "
    "worker on a Redis stream, feed it, watch it, measure it. Errors a user can cause end "
    "in one line on stderr and a non-zero exit; with --json the last line on stdout is "
    "one JSON object."
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as for every other user error, pointing at --help.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandParser(_Parser):
    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # A command refuses the flags it does not know itself: argparse hands them up to
        # the top parser, whose error named no command and sent to `attnlstm --help`,
        # which lists none of the command's flags.
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def _data_args(p: argparse.ArgumentParser, *, live: bool = False, trains: bool = False) -> None:
    # For plot (live), --data, --seed and --device default to None: see PLOT_FILE_FLAGS.
    p.add_argument(
        "--data",
        type=data_spec,
        default=None if live else "sine",
        help="sine (the article's series), sines (many), or csv:PATH (default: sine)",
    )
    # --series and --column default to None and []: given with data they are no part of,
    # they are refused (worker.cli.offline), not ignored.
    p.add_argument(
        "--series",
        type=str if live else positive,
        default=None,
        help="series count for --data sines (default 50)"
        + (", or the series id with --from-stream" * live),
    )
    p.add_argument(
        "--column",
        action="append",
        default=[],
        help="CSV value column, or a long file's series (repeatable; default: every column "
        "but the time, or every series)",
    )
    p.add_argument("--time-column", default=None, help="CSV time column (default: the first)")
    p.add_argument(
        "--series-column",
        default=None,
        help="a long CSV file (a row per reading): the column naming each row's series",
    )
    p.add_argument(
        "--value-column", default=None, help="a long CSV file's value column (default value)"
    )
    seeded = "the sines and the training" if trains else "the sines"
    p.add_argument(
        "--seed", type=seed, default=None if live else 0, help=f"seed for {seeded} (default 0)"
    )
    p.add_argument(
        "--val-fraction",
        type=fraction,
        default=HELD_OUT if trains else None,
        help="held-out tail of each series, in time order (default "
        + ("0.2)" if trains else "the checkpoint's: the tail it was trained without)"),
    )
    p.add_argument(
        "--device",
        type=device,
        default=None if live else "cpu",
        help="auto, cpu, cuda or cuda:N (default cpu)",
    )
    p.add_argument(
        "--threads", type=threads, default=None, help="torch CPU threads (default: torch's)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _installed() -> str:
    """This package's version, as installed (``unknown`` run from a bare checkout)."""
    try:
        return metadata.version("attnlstm")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attnlstm", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"attnlstm {_installed()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    _train_args(sub.add_parser("train", help="train a model offline and save a checkpoint"))
    evaluate = sub.add_parser("evaluate", help="score a checkpoint against naive baselines")
    _data_args(evaluate)
    evaluate.add_argument(
        "--model",
        type=Path,
        default=Path("model.safetensors"),
        help="checkpoint from attnlstm train (default model.safetensors)",
    )
    evaluate.add_argument(
        "--period",
        type=whole,
        default=None,
        help="the data's period, 0 for none (default: the model's): seasonal naive's "
        "season, the statistical baselines' seasons and refits, and the day-ahead origins' "
        "spacing",
    )
    evaluate.add_argument(
        "--baselines",
        action="store_true",
        help="also score naive, seasonal naive and, with attnlstm[baselines] installed, "
        "AutoETS, MSTL and AutoARIMA on the same points, one step and multi-step",
    )
    plot = sub.add_parser(
        "plot",
        help="true vs predicted, attention heatmap, loss curves; or --from-stream",
        description="From a checkpoint and data (default), or with --from-stream --series ID "
        "from a running system's output and input streams.",
    )
    _data_args(plot, live=True)
    plot.add_argument("--model", type=Path, default=None, help="(default model.safetensors)")
    plot.add_argument(
        "--out", type=Path, default=Path("plots"), help="folder for the PNGs (default plots)"
    )
    _live_plot_args(plot)
    _demo_args(
        sub.add_parser(
            "demo",
            help="embedded server + worker + replay + plots, in one go",
            description="Runs on the embedded server unless ATTNLSTM_REDIS_URL is set; then "
            "it uses (and first empties) the streams demo:sensors, demo:forecasts, "
            "demo:sensors:dead, demo:anomalies.",
        )
    )
    _worker_args(
        sub.add_parser(
            "worker",
            help="the long-running worker: sensor stream in, forecasts out",
            description="Flags override ATTNLSTM_* environment variables and .env; "
            "see the README for every setting.",
        )
    )
    _replay_args(
        sub.add_parser(
            "replay",
            help="write sine-wave or CSV test streams into the input stream",
            description="Sines (default) or --csv PATH, paced by --rate or --fast.",
        )
    )
    _models_args(
        sub.add_parser(
            "models",
            help="the model store: list versions and events, roll back, promote a file",
            description="Versions stored by the workers' fine-tuning, in Redis.",
        )
    )
    _bench_args(
        sub.add_parser(
            "bench", help="worker throughput and latency beside raw Redis and per-entry serving"
        )
    )
    return parser


def _train_args(train: argparse.ArgumentParser) -> None:
    _data_args(train, trains=True)
    train.add_argument(
        "--period",
        type=whole,
        default=None,
        help="the data's main cycle in steps, 0 for none (default: a day, from the CSV's "
        "times; none for sines)",
    )
    train.add_argument(
        "--window", type=positive, default=None, help="LSTM steps (default: the period, or 20)"
    )
    train.add_argument(
        "--horizon", type=positive, default=None, help="forecast steps (default: the period, or 1)"
    )
    train.add_argument(
        "--hidden",
        type=positive,
        default=None,
        help="LSTM units, and the attention's width (default 32; 16 with a period)",
    )
    train.add_argument("--layers", type=positive, default=1, help="LSTM layers (default 1)")
    epochs = "epochs (default: enough for about 3,000 optimiser steps, 3 to 300)"
    train.add_argument("--epochs", type=positive, default=None, help=epochs)
    train.add_argument("--batch-size", type=positive, default=64, help="(default 64)")
    train.add_argument(
        "--lr", type=learning_rate, default=1e-2, help="peak learning rate, at most 1 (1e-2)"
    )
    train.add_argument(
        "--out",
        type=Path,
        default=Path("model.safetensors"),
        help="checkpoint to write, or write over (default model.safetensors)",
    )


def _bench_args(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--model", type=Path, default=None, help="(default: an untrained model)")
    bench.add_argument(
        "--device", type=device, default="cpu", help="auto, cpu, cuda or cuda:N (cpu)"
    )
    bench.add_argument("--threads", type=threads, default=None, help="torch threads (default 1)")
    bench.add_argument("--redis-url", default=None, help="(default: an embedded server)")
    bench.add_argument(
        "--redis-password-file",
        type=Path,
        default=None,
        help="the URL user's password, read from this file: not on the command line",
    )
    bench.add_argument("--entries", type=positive, default=None, help="(default 100000)")
    bench.add_argument("--series", type=positive, default=None, help="(default 1000)")
    # The bench's flags default to None: one that the runs asked for would not read is
    # refused (worker.cli.live), not dropped without a word.
    bench.add_argument("--per-entry-entries", type=positive, default=None, help="(default 20000)")
    bench.add_argument("--rate", type=positive, default=None, help="entries/s (default 2000)")
    bench.add_argument(
        "--scale-series", type=positive, default=None, help="series at scale (default 100000)"
    )
    bench.add_argument(
        "--seconds", type=positive_number, default=None, help="latency run (default 20)"
    )
    bench.add_argument(
        "--repeats", type=positive, default=None, help="rounds of the fast drains (default 3)"
    )
    bench.add_argument(
        "--runs",
        type=names_of(RUNS),
        default=None,
        help=f"the parts to run, comma-separated: some of {','.join(RUNS)} (default all)",
    )
    pool = bench.add_argument_group("a pool of workers (instead of the runs above)")
    pool.add_argument(
        "--workers",
        type=counts_to(MAX_POOL_WORKERS),
        default=None,
        help="pool sizes to run, e.g. 1,2,4: each beside as many raw clients; at most "
        f"{MAX_POOL_WORKERS} (4 a CPU core)",
    )
    pool.add_argument(
        "--partitions", type=at_most(4096), default=None, help="partitions they share (default 12)"
    )
    pool.add_argument(
        "--no-cluster",
        action="store_true",
        help="with no --redis-url: one embedded server only, no local 3-master cluster",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object as the last line")


# Worker flags: (flag, settings field, type, help). Unset flags leave the setting alone.
WORKER_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--redis-url", "redis_url", str, "redis://, rediss:// or unix:// (unset: embedded server)"),
    ("--redis-ca-file", "redis_ca_file", Path, "CA file to verify a rediss:// server with"),
    ("--redis-password-file", "redis_password_file", Path, "the URL user's password, in a file"),
    ("--input-stream", "input_stream", str, "stream to read (default sensors)"),
    ("--output-stream", "output_stream", str, "stream for forecasts (default forecasts)"),
    ("--dead-stream", "dead_stream", str, "stream for bad entries (default sensors:dead)"),
    ("--anomalies-stream", "anomalies_stream", str, "stream for anomalies (default anomalies)"),
    ("--group", "group", str, "consumer group (default forecasters)"),
    ("--consumer", "consumer", str, "this worker's consumer name (default host-pid)"),
    ("--partitions", "partitions", positive, "P input streams STREAM{k}, a pool shares (1)"),
    ("--model", "model", Path, "checkpoint from attnlstm train (unset: the store, or cold start)"),
    ("--model-key-file", "model_key_file", Path, "key that signs and verifies stored models"),
    ("--device", "device", device, "auto, cpu, cuda or cuda:N (default auto)"),
    ("--threads", "torch_threads", threads, "torch CPU threads (default: torch's)"),
    ("--max-batch", "max_batch", positive, "entries per batch, at most (default 1024)"),
    ("--max-wait-ms", "max_wait_ms", number, "longest wait for a batch to fill (default 5)"),
    ("--block-ms", "block_ms", positive, "one blocking read's longest wait (default 1000)"),
    (
        "--output-maxlen",
        "output_maxlen",
        positive,
        "approximate cap on the forecasts, anomalies and dead streams (default 1000000)",
    ),
    ("--coverage", "coverage", number, "prediction intervals' coverage, 0: none (default 0.9)"),
    ("--anomaly-threshold", "anomaly_threshold", number, "anomaly: this many half-widths (5)"),
    (
        "--stand-in-anomalies",
        "stand_in_anomalies",
        switch,
        "on/off: anomalies enter windows as forecasts (on)",
    ),
    ("--max-series", "max_series", positive, "series with a window, at most (default 100000)"),
    ("--checkpoint-interval-s", "checkpoint_interval_s", number, "window state saves (default 5)"),
    ("--lease-ttl-ms", "lease_ttl_ms", positive, "the lease's time to live (default 10000)"),
    ("--metrics-port", "metrics_port", whole, "/metrics and /healthz port, 0: off (default 9108)"),
    ("--metrics-host", "metrics_host", str, "their address (default 127.0.0.1; 0.0.0.0: all)"),
    ("--history-len", "history_len", positive, "values kept per series (default 200)"),
    ("--history-series", "history_series", positive, "series that keep them (default 10000)"),
    ("--series-idle-s", "series_idle_s", number, "idle series free their slot, 0: never (7 d)"),
    ("--finetune-interval-s", "finetune_interval_s", number, "between fine-tunes, 0: off (300)"),
    ("--drift-ratio", "drift_ratio", number, "rolling MAE / its level that fine-tunes now (1.5)"),
    ("--finetune-steps", "finetune_steps", positive, "optimiser steps a fine-tune (300)"),
    ("--promote-margin", "promote_margin", number, "MASE drop a candidate needs (0.02)"),
    ("--models-stream", "models_stream", str, "model events and store (default models)"),
    ("--keep-models", "keep_models", positive, "stored model versions kept (default 5)"),
)


def _worker_args(p: argparse.ArgumentParser) -> None:
    for flag, name, kind, text in WORKER_FLAGS:
        p.add_argument(flag, dest=name, type=kind, default=None, help=text)
    p.add_argument("--burst", action="store_true", help="exit once the stream is drained")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None, help="(default: ATTNLSTM_REDIS_URL)")
    p.add_argument("--stream", default=None, help="(default: ATTNLSTM_INPUT_STREAM or sensors)")
    pace = p.add_mutually_exclusive_group(required=True)
    pace.add_argument("--rate", type=positive_number, help="entries per second, steady")
    pace.add_argument("--fast", action="store_true", help="as fast as Redis takes them")
    p.add_argument("--seconds", type=positive_number, default=None, help="stop after this long")
    p.add_argument(
        "--maxlen", type=at_most(MAXLEN_MAX), default=None, help="approximate cap (XADD MAXLEN ~)"
    )
    p.add_argument(
        "--partitions",
        type=positive,
        default=None,
        help="P > 1: each entry to its series' partition, STREAM{crc32(series) mod P} "
        "(default: ATTNLSTM_PARTITIONS or 1)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    # The sines' flags and the CSV's default to None, so that one given with the other
    # source is told from its default, and refused (worker.cli.replay fills them in).
    sines = p.add_argument_group("sines (the default source)")
    spec = SineSpec()
    sines.add_argument("--series", type=positive, default=None, help="(default 50)")
    sines.add_argument(
        "--points",
        type=two_or_more,
        default=None,
        help="per series, at least 2 (default: enough for --seconds at --rate, else 1000)",
    )
    sines.add_argument(
        "--seed", type=seed, default=None, help="same seed, same entries (default 0)"
    )
    sines.add_argument("--prefix", default=None, help="series ids are PREFIX0.. (sine-)")
    for flag, name, what in (
        ("--freq", "freq", "angular step, radians per point"),
        ("--amplitude", "amplitude", "amplitude"),
        ("--offset", "offset", "level"),
        ("--drift-factor", "drift_factor", "multiplier at --drift-at"),
    ):
        lo, hi = getattr(spec, name)
        sines.add_argument(
            flag, nargs=2, type=number, metavar=("LO", "HI"), help=f"{what} (default {lo} {hi})"
        )
    sines.add_argument(
        "--noise", type=nonnegative_number, default=None, help="std, in amplitudes (default 0)"
    )
    sines.add_argument(
        "--drift-at",
        type=positive,
        default=None,
        help="step where drift starts (a frequency drift shows from the step after)",
    )
    sines.add_argument(
        "--drift-kind", choices=["frequency", "amplitude"], default=None, help="(frequency)"
    )
    sines.add_argument("--anomaly-rate", type=share, default=None, help="share of spikes (0)")
    sines.add_argument(
        "--bad-rate", type=share, default=None, help="share of malformed entries (0)"
    )
    table = p.add_argument_group("CSV")
    table.add_argument("--csv", type=Path, default=None, help="replay this file instead of sines")
    table.add_argument("--time-column", default=None, help="(default: the first column)")
    table.add_argument(
        "--column", action="append", default=[], help="value column, repeatable (default: all)"
    )
    table.add_argument("--series-column", default=None, help="long format: the series id column")
    table.add_argument("--value-column", default=None, help="long format (default value)")


def _demo_args(demo: argparse.ArgumentParser) -> None:
    demo.add_argument(
        "--seconds", type=positive_number, default=60.0, help="replay length (default 60)"
    )
    # None: told from a value given, which --csv refuses (worker.cli.live fills them in).
    demo.add_argument("--series", type=positive, default=None, help="sine series (default 50)")
    pace = demo.add_mutually_exclusive_group()
    pace.add_argument(
        "--rate", type=positive_number, default=None, help="entries/s (default 500 for sines)"
    )
    pace.add_argument("--fast", action="store_true", help="replay as fast as Redis takes it")
    demo.add_argument("--csv", type=Path, default=None, help="replay this file, not sines")
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="(default demo-out)")
    demo.add_argument("--points", type=positive, default=200, help="forecasts drawn (200)")
    demo.add_argument(
        "--noise", type=nonnegative_number, default=None, help="sine noise, in amplitudes (0)"
    )
    demo.add_argument(
        "--drift-at",
        type=positive,
        default=None,
        help="step where sines drift (a frequency drift shows from the step after)",
    )
    demo.add_argument(
        "--finetune-interval-s",
        type=nonnegative_number,
        default=None,
        help="(default: ATTNLSTM_FINETUNE_INTERVAL_S or 300; 0: off)",
    )
    demo.add_argument(
        "--device",
        type=device,
        default=None,
        help="auto, cpu, cuda or cuda:N (default: ATTNLSTM_DEVICE or auto)",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _live_plot_args(plot: argparse.ArgumentParser) -> None:
    live = plot.add_argument_group("--from-stream")
    live.add_argument("--from-stream", action="store_true", help="read the live streams")
    live.add_argument("--redis-url", default=None, help="(default: ATTNLSTM_REDIS_URL)")
    live.add_argument(
        "--partitions", type=positive, default=None, help="(default: ATTNLSTM_PARTITIONS or 1)"
    )
    live.add_argument(
        "--last", type=positive, default=None, help="output entries to search (100000)"
    )
    live.add_argument("--points", type=positive, default=None, help="forecasts drawn (200)")


# plot's flags for each source, (flag, argument), each defaulting to None (or []): one
# given with the other source is refused, not ignored; plot_defaults fills them in.
PLOT_FILE_FLAGS = (
    ("--data", "data"),
    ("--model", "model"),
    ("--column", "column"),
    ("--time-column", "time_column"),
    ("--series-column", "series_column"),
    ("--value-column", "value_column"),
    ("--seed", "seed"),
    ("--val-fraction", "val_fraction"),
    ("--device", "device"),
    ("--threads", "threads"),
)
PLOT_STREAM_FLAGS = (
    ("--redis-url", "redis_url"),
    ("--partitions", "partitions"),
    ("--last", "last"),
    ("--points", "points"),
)
PLOT_DEFAULTS = {
    "data": "sine",
    "model": Path("model.safetensors"),
    "seed": 0,
    "device": "cpu",
    "last": 100_000,
    "points": 200,
}


def plot_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with each of plot's flags that was not given at its default; a ValueError
    where its --out is a file (from a checkpoint or a stream alike: "File exists")."""
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"cannot write the figures into {args.out}: it is not a folder")
    for name, value in PLOT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def _models_args(models: argparse.ArgumentParser) -> None:
    what = models.add_subparsers(dest="action", required=True, parser_class=type(models))
    listing = what.add_parser("list", help="stored versions, the serving one, recent events")
    listing.add_argument(  # the models stream keeps about 10,000
        "--events", type=at_most(10_000), default=10, help="events shown (default 10)"
    )
    back = what.add_parser("rollback", help="serve a stored version again, from the next batch")
    back.add_argument("version", help="a version from `attnlstm models list`")
    promote = what.add_parser(
        "promote",
        help="store a model file (signed, with a key) and serve it on every worker",
        description="Store a model file (signed, with a key) and serve it on every worker "
        "from its next batch. Nothing is pruned here: the workers prune the store to their "
        "own keep_models at their next promotion.",
    )
    promote.add_argument("path", type=Path, help="a checkpoint from `attnlstm train`")
    promote.add_argument(
        "--sign-into-unsigned-store",
        action="store_true",
        help="with a model key, promote even though the store holds unsigned models (moving "
        "a store to a key: give every worker the key first; one without it stops at its "
        "next start)",
    )
    for action in (listing, back, promote):
        action.add_argument("--redis-url", default=None, help="(default: ATTNLSTM_REDIS_URL)")
        action.add_argument(
            "--models-stream", default=None, help="(default: ATTNLSTM_MODELS_STREAM or models)"
        )
        action.add_argument(
            "--model-key-file",
            type=Path,
            default=None,
            help="key that signs and verifies stored models (default: ATTNLSTM_MODEL_KEY_FILE)",
        )
        action.add_argument("--json", action="store_true", help="one JSON object, last line")
