"""The offline commands: ``train``, ``evaluate`` and ``plot``, on data in files, with no
Redis. Each takes the parsed arguments and returns the figures it reports."""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeGuard, cast

import torch

from attnlstm import baselines
from attnlstm.checkpoint import (
    CONFIG_BOUNDS,
    CheckpointError,
    check_config,
    dumps,
    holds_checkpoint,
    open_checkpoint,
    save,
)
from attnlstm.data import DAY_S, Dataset, Layout, fingerprint, load_dataset, prefix_fingerprints
from attnlstm.device import resolve_device
from attnlstm.experiment import (
    SEASONAL_WEIGHT_DECAY,
    dataset_config,
    evaluate_model,
    series_forecast,
    split_dataset,
    train_model,
    training_meta,
)
from attnlstm.heldout import Comparison, compare, format_margins, format_table
from attnlstm.intervals import Spread
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.plots import plot_attention, plot_forecast, plot_losses
from attnlstm.synthetic import SineSpec
from attnlstm.train import TrainConfig
from attnlstm.windows import HELD_OUT, split_point
from worker.cli.argtypes import positive, refuse_given
from worker.cli.parser import PLOT_STREAM_FLAGS, plot_defaults
from worker.online.store import check_size
from worker.tools.replay import MAX_SINE_VALUES
from worker.usage import UsageError

# Fewer validation windows than this and `train` says the blend and the intervals, fitted
# on them, are not to be trusted: a 90% quantile of 50 errors rests on its 5 largest.
FEW_VAL_WINDOWS = 50

# train's flags that size the model: (flag, argument, the config field it sets).
SIZE_FLAGS = (
    ("--window", "window", "window"),
    ("--horizon", "horizon", "horizon"),
    ("--hidden", "hidden", "hidden_size"),
    ("--layers", "layers", "num_layers"),
)


def train_command(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    _check_sizes(args)
    _check_out(args.out)
    dataset, device = _prepare(args)
    period = dataset.daily_period() if args.period is None else args.period
    if args.period is None:
        _note_no_period(args, dataset, period)
    given = {
        "window": args.window,
        "horizon": args.horizon,
        "hidden_size": args.hidden,
        "attention_size": args.hidden,
    }
    model_config = dataset_config(
        dataset,
        period,
        val_fraction=args.val_fraction,
        num_layers=args.layers,
        **{name: value for name, value in given.items() if value is not None},
    )
    try:
        check_config(model_config, f"the model for period {model_config.period}")
    except CheckpointError as e:
        raise ValueError(
            f"{e}: no checkpoint of it would load; pass a smaller --window or --horizon, "
            "or --period N (0: none)"
        ) from None
    _note_short(dataset, model_config, args.val_fraction)
    _note_gaps(dataset, "train")
    _note_repeats(dataset, "train")
    # Said before the training too, not only once it is spent:
    # untrained and with no figures, its checkpoint takes all but a few KB of train's.
    oversized = _note_over_cap(len(dumps(AttentionLSTM(model_config))[0]), "the model, untrained,")
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        weight_decay=SEASONAL_WEIGHT_DECAY if model_config.period else 0.0,
    )
    model, result, metrics = train_model(
        dataset,
        model_config,
        train_config,
        val_fraction=args.val_fraction,
        device=device,
        progress=not args.json and sys.stderr.isatty(),
    )
    if result.val_windows < FEW_VAL_WINDOWS:
        print(
            f"attnlstm train: note: {result.val_windows} validation windows (the last "
            f"{args.val_fraction:g} of what comes before the held-out tail) chose the epoch, "
            "the blend and the intervals' spread: too few to trust them; more data, or a "
            "larger --val-fraction",
            file=sys.stderr,
        )
    meta = training_meta(
        args.data, dataset, train_config, result, metrics, val_fraction=args.val_fraction
    )
    version = save(args.out, model, meta)
    if not oversized:  # the training's figures may still take it past the cap
        _note_over_cap(Path(args.out).stat().st_size, f"model {version}")
    return {
        **metrics,
        "seconds": round(time.perf_counter() - started, 3),
        "train_seconds": round(result.seconds, 3),
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "params": model.num_params(),
        "period": model_config.period,
        "window": model_config.window,
        "horizon": model_config.horizon,
        "lags": list(model_config.lags),
        "model": str(args.out),
        "version": version,
    }


def evaluate_command(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    dataset, device = _prepare(args)
    checkpoint = open_checkpoint(args.model)
    args.val_fraction = _held_out(args, checkpoint.meta, dataset)
    _note_gaps(dataset, "evaluate")
    _note_repeats(dataset, "evaluate")
    checkpoint.model.to(device)
    period = (checkpoint.config.period if args.period is None else args.period) or None
    metrics = evaluate_model(
        checkpoint.model, dataset, val_fraction=args.val_fraction, period=period, device=device
    )
    comparison = None
    if args.baselines:
        stat_models = _stat_models(period, none_asked=args.period == 0)
        comparison = compare(
            checkpoint.model,
            dataset,
            spread=Spread.from_meta(checkpoint.meta, checkpoint.config.horizon),
            val_fraction=args.val_fraction,
            period=period or 0,
            stat_models=stat_models,
            device=device,
            progress=not args.json and sys.stderr.isatty(),
        )
    _note_other_data(args)
    return {
        **metrics,
        **_tables(comparison, args.json, horizon=checkpoint.config.horizon),
        "val_fraction": args.val_fraction,
        "seconds": round(time.perf_counter() - started, 3),
        "params": checkpoint.model.num_params(),
        "model": str(args.model),
        "version": checkpoint.version,
    }


def plot_command(args: argparse.Namespace) -> dict[str, Any]:
    """The article's figures for the data's first series, and the loss curves."""
    refuse_given(args, PLOT_STREAM_FLAGS, "for --from-stream")
    dataset, device = _prepare(plot_defaults(args))
    checkpoint = open_checkpoint(args.model)
    name, values = dataset.names[0], dataset.series[0]  # what it draws
    args.val_fraction = _held_out(args, checkpoint.meta, Dataset([name], [values]))
    checkpoint.model.to(device)
    config = checkpoint.config  # refused as evaluate refuses it: too short to plot
    split_dataset(
        Dataset([name], [values]), config.context, config.horizon, args.val_fraction, training=False
    )
    steps, forecast, attention = series_forecast(checkpoint.model, values, device=device)
    cut = split_point(len(values), args.val_fraction)
    written = [
        plot_forecast(
            values[steps],
            forecast,
            args.out / "forecast.png",
            x=steps,
            naive=values[steps - 1],
            title=f"{name}: true vs predicted (one step ahead, model {checkpoint.version})",
            split=cut,
        ),
        plot_attention(
            attention[steps >= cut],
            args.out / "attention.png",
            title=f"{name}: attention over the window, held-out forecasts",
        ),
    ]
    curves = _loss_curves(checkpoint.meta)
    if curves is None:
        print(
            "attnlstm plot: no loss.png: the checkpoint's meta holds no train_loss and "
            "val_loss of as many finite numbers",
            file=sys.stderr,
        )
    else:
        written.append(plot_losses(*curves, args.out / "loss.png"))
    _note_other_data(args)
    return {"written": [str(p) for p in written], "series": name, "version": checkpoint.version}


def _note_gaps(dataset: Dataset, command: str) -> None:
    """``command``'s note naming the series whose times skip steps: the model takes their
    values one step apart, so across a gap its window, lags and profile span more time
    than they say (in training, and in the forecasts evaluate scores)."""
    named = {
        name: f"{_counted(g.missing, 'step')} missing in {_counted(g.count, 'place')}, "
        f"the longest {g.longest:,}"
        for name, g in dataset.gaps.items()
    }
    _note_series(
        command,
        "the times skip steps in",
        named,
        "values are taken one step apart, as the worker takes a live series, so across a "
        "gap the window, the lags and the profile span more time than they say",
    )


def _note_repeats(dataset: Dataset, command: str) -> None:
    """``command``'s note naming the series in which a time comes again: each reading is
    kept as a step of its own, so there the window and the lags span less time than they
    say. One is a reading kept as it came; 55 passed without a word."""
    named = {name: _counted(count, "time") for name, count in dataset.repeats.items()}
    _note_series(
        command,
        "a time comes again in",
        named,
        "each reading is taken as a step of its own, so there the window and the lags span "
        "less time than they say",
    )


def _note_series(command: str, what: str, named: dict[str, str], why: str, shown: int = 3) -> None:
    """``command``'s note of ``what`` in the series of ``named`` (each with its counts): the
    first ``shown``, and how many more; nothing where there are none."""
    if not named:
        return
    first = "; ".join(f"{name} ({counts})" for name, counts in list(named.items())[:shown])
    more = f"; and {len(named) - shown:,} more series" if len(named) > shown else ""
    print(f"attnlstm {command}: note: {what} {first}{more}: {why}", file=sys.stderr)


def _counted(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'s' * (count != 1)}"


def _note_over_cap(size: int, what: str) -> bool:
    """A note when ``size``, the bytes of the checkpoint of ``what``, is over the model
    store's cap; True when noted. Noted, not refused: `evaluate` and `plot` take it."""
    try:
        check_size(size, what)
    except CheckpointError as e:
        print(f"attnlstm train: note: {e}", file=sys.stderr)
        return True
    return False


def _note_short(dataset: Dataset, config: ModelConfig, val_fraction: float) -> None:
    """A note naming the series whose part before the held-out tail holds no window of
    the model: it trains without them, which a file's short column left unsaid. (None
    where every series is: then training is refused, with why.)"""
    need = config.context + config.horizon
    short = [
        f"{name} ({n:,} values)"
        for name, n in zip(dataset.names, dataset.lengths, strict=True)
        if split_point(n, val_fraction) < need
    ]
    if 0 < len(short) < len(dataset.names):
        print(
            f"attnlstm train: note: {len(short)} of {len(dataset.names)} series are too short "
            f"to train on (the model reads {config.context:,} values and forecasts "
            f"{config.horizon} ahead, before each series' held-out tail): "
            f"{', '.join(short[:5])}{', ...' if len(short) > 5 else ''}",
            file=sys.stderr,
        )


def _loss_curves(meta: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    """The loss per epoch, training and validation, where the meta holds both as lists of
    as many finite numbers. A checkpoint of another making, or of a training that
    diverged (NaN), may hold anything there: its hash says who wrote it, not what."""
    train, val = meta.get("train_loss"), meta.get("val_loss")
    if _finite_list(train) and _finite_list(val) and len(train) == len(val) > 0:
        return train, val
    return None


def _finite_list(curve: object) -> TypeGuard[list[float]]:
    return isinstance(curve, list) and all(map(_finite, curve))


def _finite(x: object) -> bool:
    try:
        return type(x) in (int, float) and math.isfinite(cast(float, x))
    except OverflowError:  # an int past a float's range (JSON takes 10**400)
        return False


def _held_out(args: argparse.Namespace, meta: dict[str, Any], dataset: Dataset) -> float:
    """The tail to score a checkpoint on: --val-fraction, or the one it was trained
    without (0.2 where its meta does not say). A tail that reaches into the values a
    series was trained on is refused: the checkpoint knows them by the fingerprint of
    each series' training part, whatever the path, the copy or the column, and however
    many rows were added (or removed from the end, leaving that part) since. One written
    before 2026-12-06 knows its whole series by their fingerprints, and one before that
    the data spec as written: a tail longer than its own fraction is refused there."""
    trained = meta.get("val_fraction")
    trained = trained if isinstance(trained, float) and 0 < trained < 1 else None
    fraction = float(args.val_fraction or trained or HELD_OUT)
    parts = meta.get("trained_values")
    if isinstance(parts, list):
        if not _check_unseen(args, dataset, parts, fraction):
            args.other_data = meta.get("data", "?")  # said once the figures are out
        return fraction
    known = meta.get("data_fingerprints")
    if isinstance(known, list):
        seen = not {fingerprint(s) for s in dataset.series}.isdisjoint(map(str, known))
    else:
        seen = meta.get("data") == args.data
    if trained is not None and seen and fraction > trained:
        raise ValueError(
            f"the model was trained on all but the last {trained:g} of each series of "
            f"{args.data}: --val-fraction {fraction:g} would score it on values it "
            f"trained on; pass at most {trained:g}"
        )
    return fraction


def _note_other_data(args: argparse.Namespace) -> None:
    """A note where no series scored is one the model was trained on (:func:`_held_out`):
    `evaluate` with no --data scored a model of other data on the article's sine, and
    `plot` drew it, without a word."""
    if trained_on := getattr(args, "other_data", None):
        print(
            f"attnlstm {args.command}: note: no series of --data {args.data} is one the "
            f"model was trained on ({_trained_on(args.data, trained_on)}): its figures are "
            "of other data than it was held out from",
            file=sys.stderr,
        )


def _trained_on(data: str, trained_on: str) -> str:
    """The data the model was trained on, as the note names it: a spec as the one given
    ("no series of --data sines ... (--data sines)") was read with other flags, or from a
    file changed since."""
    if trained_on != data:
        return f"--data {trained_on}"
    if data.startswith("csv:"):
        return (
            f"--data {trained_on} too, but other columns of it (--column), or the file "
            "changed since"
        )
    return f"--data {trained_on} too, but with another --series or --seed"


def _check_unseen(
    args: argparse.Namespace, dataset: Dataset, parts: list[Any], fraction: float
) -> bool:
    """A ValueError where the tail of ``fraction`` of a series of ``dataset`` starts
    before the end of a training part in ``parts`` ([values, fingerprint] pairs); else
    whether a series of ``dataset`` begins with one of them (was trained on)."""
    wanted: dict[int, set[str]] = {}
    for part in parts:
        if isinstance(part, list) and len(part) == 2 and isinstance(part[0], int):
            wanted.setdefault(part[0], set()).add(str(part[1]))
    # A series shorter than a training part may be the start of one: not known for other
    # data (a copy cut short was said to be, which it trained on).
    overlap, trained_on = [], any(len(values) < max(wanted, default=0) for values in dataset.series)
    for name, values in zip(dataset.names, dataset.series, strict=True):
        cut = split_point(len(values), fraction)
        ends = sorted(n for n in wanted if n <= len(values))  # hashed in one pass
        seen = [
            n
            for n, p in zip(ends, prefix_fingerprints(values, ends), strict=True)
            if p in wanted[n]
        ]
        trained_on = trained_on or bool(seen)
        overlap += [(name, len(values), n) for n in seen if n > cut]
    if overlap:
        name, length, n = overlap[0]
        most = math.floor(min((size - n) / size for _, size, n in overlap) * 1000) / 1000
        more = f" (and {len(overlap) - 1} more series)" if len(overlap) > 1 else ""
        fix = f"pass --val-fraction {most:g} or less" if most else "it has too few values since"
        raise ValueError(
            f"the model trained on the first {n:,} of the {length:,} values of {name} of "
            f"{args.data}{more}: a held-out tail of {fraction:g} would score it on values it "
            f"trained on; {fix}"
        )
    return trained_on


def _check_sizes(args: argparse.Namespace) -> None:
    """A size past a checkpoint's bounds, refused before the data is read and the model
    built (--hidden 200000 ended in torch's allocation error): training would only write
    a file that no loader takes."""
    for flag, name, field in SIZE_FLAGS:
        value, (least, most) = getattr(args, name), CONFIG_BOUNDS[field]
        if value is not None and value > most:
            raise UsageError(f"argument {flag}: must be at most {most:,} (a checkpoint's bound)")
        if value is not None and value < least:
            raise UsageError(f"argument {flag}: must be at least {least:,} (a checkpoint's bound)")
    if args.period == 1 and args.window is None:  # was "a window needs at least 2 steps"
        raise UsageError(
            "argument --period: 1 step is no cycle (the model's window is one period, and "
            "needs 2 steps or more); 0 for none"
        )


def _check_out(path: Path) -> None:
    """An --out that save cannot write (a folder, a path under a file, a folder that takes
    no file, a device, a pipe, a link), refused before the training rather than after it;
    and a file that is not a checkpoint, which the training would replace (the CSV it
    read, or another library's model.safetensors)."""
    if path.is_symlink():  # renamed over (`/dev/stdout`), or written through: neither asked
        raise ValueError(
            f"--out {path} is a link: pass the path of the file it names, or another --out"
        )
    if path.is_dir():
        raise ValueError(f"cannot write checkpoint {path}: it is a folder")
    if path.exists():
        if not path.is_file():
            raise ValueError(
                f"cannot write checkpoint {path}: it is no regular file (a device, pipe or socket)"
            )
        try:
            ours = holds_checkpoint(path)
        except OSError as e:
            raise ValueError(
                f"--out {path}: cannot read it to see that it is a checkpoint "
                f"({e.strerror or e}): remove it, or pass another --out"
            ) from None
        if not ours and path.stat().st_size:
            raise ValueError(
                f"--out {path} holds something other than a checkpoint of attnlstm: not "
                "written over (remove it, or pass another --out)"
            )
    folder = next((p for p in path.parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise ValueError(f"cannot write checkpoint {path}: {folder} is not a folder")
    try:  # where save writes its temporary file, or makes the folders it lacks
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"cannot write checkpoint {path}: {e.strerror or e}") from None


def _tables(comparison: Comparison | None, as_json: bool, *, horizon: int) -> dict[str, Any]:
    """The baselines' scores and margins for --json, or their tables for people; nothing
    without --baselines."""
    if comparison is None:
        return {}
    if as_json:
        return {
            "baselines": [asdict(row) for row in comparison.rows],
            "margins": [asdict(margin) for margin in comparison.margins],
        }
    return {
        "table": format_table(comparison.rows, horizon=horizon),
        "margins": format_margins(comparison, horizon=horizon),
    }


def _stat_models(period: int | None, *, none_asked: bool) -> tuple[str, ...]:
    """The statistical baselines to run: all of them, given statsforecast and a period
    (``none_asked``: --period 0 took the model's away)."""
    if not baselines.available():
        print(
            "attnlstm evaluate: note: AutoETS, MSTL and AutoARIMA need: "
            "pip install 'attnlstm[baselines]'",
            file=sys.stderr,
        )
        return ()
    if not period:
        print(
            "attnlstm evaluate: note: AutoETS, MSTL and AutoARIMA need the data's period: "
            + ("--period 0 leaves them out" if none_asked else "pass --period"),
            file=sys.stderr,
        )
        return ()
    if period < 2:  # a season of one step: MSTL died in statsforecast, a traceback
        print(
            "attnlstm evaluate: note: AutoETS, MSTL and AutoARIMA need a period of 2 steps or more",
            file=sys.stderr,
        )
        return ()
    return baselines.STAT_MODELS


def _note_no_period(args: argparse.Namespace, dataset: Dataset, period: int) -> None:
    """A note where no daily period was found for ``train`` (none given): the times make
    no whole day of steps, or the file has none."""
    if not period and dataset.step_s:
        print(
            f"attnlstm train: note: values {dataset.step_s:g} s apart (the time column's "
            f"median step) make a day of {DAY_S / dataset.step_s:,.6g} steps, no daily period "
            "a model can take (a whole number from 4 to "
            f"{CONFIG_BOUNDS['period'][1]:,}): trained with none; --period N sets one",
            file=sys.stderr,
        )
    elif (
        dataset.step_s is None
        and args.data.startswith("csv:")
        and max(dataset.lengths) > 1  # one row has no step, and the error follows
    ):
        other = (
            ""
            if args.series_column
            else ", --column NAME reads a column as a series, and --series-column NAME a "
            "long file (a row per reading, its series named in column NAME)"
        )
        print(
            "attnlstm train: note: the first column, taken to be the time, holds no time "
            "at its first row (ISO 8601 or a count since the epoch): trained with no daily "
            f"period; --period N sets one, --time-column NAME names the time column{other}",
            file=sys.stderr,
        )


def _prepare(args: argparse.Namespace) -> tuple[Dataset, str]:
    """The data the flags name, and the device; torch's threads set."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    n_series = _series_count(args.series)
    if args.series is not None and args.data != "sines":
        raise UsageError(f"argument --series: for --data sines, not --data {args.data}")
    layout = _layout(args)
    points = SineSpec().n_points
    if args.data == "sines" and n_series * points > MAX_SINE_VALUES:  # 30,000,000: MemoryError
        raise UsageError(
            f"argument --series: {n_series:,} sines of {points:,} points are more than "
            f"the {MAX_SINE_VALUES:,} values drawn at once"
        )
    dataset = load_dataset(
        args.data, n_series=n_series, columns=args.column, seed=args.seed, layout=layout
    )
    return dataset, device


CSV_FLAGS = (
    ("--column", "column"),
    ("--time-column", "time_column"),
    ("--series-column", "series_column"),
    ("--value-column", "value_column"),
)


def _layout(args: argparse.Namespace) -> Layout:
    """The CSV file's columns, as the flags name them; a UsageError for a flag of no use
    with the data or the others (it was ignored, as replay refuses it)."""
    if not args.data.startswith("csv:"):
        refuse_given(args, CSV_FLAGS, f"for --data csv:PATH, not --data {args.data}")
    if args.series_column is None and args.value_column is not None:
        raise UsageError("--value-column is for a long file, with --series-column")
    return Layout(
        time_column=args.time_column or None,  # "": the first, as replay takes it
        series_column=args.series_column,
        value_column=args.value_column or Layout.value_column,
    )


def _series_count(given: int | str | None) -> int:
    """The count of sines: 50 unless given; ``plot --series`` (text, without
    --from-stream) a count as for train and evaluate."""
    if given is None:
        return SineSpec().n_series
    if isinstance(given, int):
        return given
    try:
        return positive(given)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"argument --series: {e} (a series id needs --from-stream)") from None
