"""The commands that talk to a live system and load the model: ``worker``, ``demo``,
``plot --from-stream``, ``models`` and ``bench`` (``replay``, which needs no model, is
in :mod:`worker.cli.replay`). Each takes the parsed arguments and returns the figures
it reports; :mod:`worker.cli` dispatches to them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
import torch

from attnlstm.checkpoint import Checkpoint, CheckpointError, dumps, open_checkpoint
from attnlstm.device import resolve_device
from attnlstm.partition import partition_of
from worker.app import run_service
from worker.cli.argtypes import refuse_given
from worker.cli.parser import PLOT_FILE_FLAGS, WORKER_FLAGS, plot_defaults
from worker.cli.replay import redis_for
from worker.lease import ensure_library
from worker.online.store import FILE_BYTES_MAX, SWITCHES, ModelStore
from worker.settings import WORKER_ONLY, Settings, check_url, from_flags, with_password
from worker.streams import unreachable
from worker.tools import RUNS
from worker.tools.bench import BenchPlan, run_bench
from worker.tools.demo import DemoPlan, run_demo
from worker.tools.poolbench import PoolPlan, run_pool_bench
from worker.tools.readback import draw, read_views, summary
from worker.usage import UsageError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def worker_command(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    return run_service(_on_device(worker_settings(args)), burst=args.burst, stop=args.stop)


def worker_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment and .env, with the flags that were given on top."""
    return from_flags(**{name: getattr(args, name) for _, name, _, _ in WORKER_FLAGS})


def _on_device(settings: Settings) -> Settings:
    """The settings with their device resolved (auto: CUDA when present, else the CPU).
    A device this machine lacks (ATTNLSTM_DEVICE=cuda with no GPU) stops the command as
    it starts, not when its first model arrives from the store or a cold start."""
    return settings.model_copy(update={"device": resolve_device(settings.device)})


def bench_command(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level="INFO", format=LOG_FORMAT)
    _check_bench_flags(args)
    torch.set_num_threads(args.threads or 1)
    flags = {**vars(args), "runs": args.runs or RUNS}  # named after the plan's fields
    given = [f.name for f in dataclasses.fields(BenchPlan) if flags.get(f.name) is not None]
    plan = BenchPlan(**{name: flags[name] for name in given})
    model = open_checkpoint(args.model).model if args.model else None
    device = resolve_device(args.device)
    url = args.redis_url
    if url is not None and args.redis_password_file is not None:
        url = with_password(url, args.redis_password_file)  # (out of `ps`)
    if args.workers:
        pool = PoolPlan(
            workers=args.workers,
            partitions=args.partitions or PoolPlan.partitions,
            entries=args.entries or PoolPlan.entries,
            series=args.series or PoolPlan.series,
            cluster=not args.no_cluster,
        )
        return run_pool_bench(plan=pool, device=device, url=url, model=model)
    return run_bench(plan=plan, device=device, url=url, model=model)


# The flags of one worker's bench, and those of a pool's: each refused in the other.
ONE_WORKER_FLAGS = (
    "runs",
    "threads",
    "per_entry_entries",
    "rate",
    "scale_series",
    "seconds",
    "repeats",
)
POOL_FLAGS = ("partitions", "no_cluster")
# The runs of one worker's bench that read each flag (worker.tools.bench); --series and
# --threads, all of them.
READ_BY = {
    "model": ("drains", "latency"),  # the models run times three models of its own
    "entries": ("drains", "models"),
    "repeats": ("drains", "models"),
    "per_entry_entries": ("drains",),
    "rate": ("latency",),
    "seconds": ("latency",),
    "scale_series": ("latency",),
}


def _check_bench_flags(args: argparse.Namespace) -> None:
    """Flags that the bench asked for would not read are refused: a pool's workers run
    none of one worker's runs (and one torch thread each), one worker shares no
    partitions, each run reads only some flags, and a --redis-url leaves no servers to
    start. They were dropped without a word, and a long run was not the one asked for.
    A URL the worker's settings refuse is refused first: the pool's workers refused it
    after the raw clients' runs."""
    if args.redis_password_file is not None:
        if args.redis_url is None:
            raise UsageError("--redis-password-file is for the user of --redis-url")
        if urlsplit(args.redis_url).password is not None:
            raise UsageError("--redis-url has a password already: keep one of the two")
    if args.redis_url is not None:
        try:
            check_url(args.redis_url)
        except ValueError as e:
            raise UsageError(f"--redis-url: {e}") from None
    if args.workers:
        if args.no_cluster and args.redis_url:
            raise UsageError("--no-cluster is for the servers the bench starts, not --redis-url")
        unused = [name for name in ONE_WORKER_FLAGS if getattr(args, name) is not None]
        _refuse(unused, "for the bench of one worker, not of a pool (--workers)")
        return
    _refuse(
        [name for name in POOL_FLAGS if getattr(args, name)], "for a pool of workers (--workers)"
    )
    runs = set(args.runs or RUNS)
    unread = [n for n, by in READ_BY.items() if getattr(args, n) is not None and not runs & set(by)]
    _refuse(unread, f"not read by --runs {','.join(args.runs or RUNS)}")


def _refuse(names: list[str], why: str) -> None:
    if names:
        flags = ", ".join("--" + name.replace("_", "-") for name in names)
        raise UsageError(f"{flags} {'is' if len(names) == 1 else 'are'} {why}")


def demo_command(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level="INFO", format=LOG_FORMAT)
    torch.set_num_threads(1)  # the worker's; Redis and the replay have the other cores
    pace = None if args.fast or (args.csv and args.rate is None) else args.rate or 500.0
    sines = {"--series": args.series, "--noise": args.noise, "--drift-at": args.drift_at}
    if args.csv is not None and (given := [flag for flag, v in sines.items() if v is not None]):
        raise UsageError(
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for sines, not --csv"
        )
    if args.out.exists() and not args.out.is_dir():  # found once it had trained (15 s)
        raise UsageError(f"--out {args.out} is a file: the demo writes into a folder")
    try:  # a CSV it refuses is a DataError; sines it refuses, the flags asked for
        plan = DemoPlan(
            seconds=args.seconds,
            series=args.series or DemoPlan.series,
            rate=pace,
            csv=args.csv,
            points=args.points,
            noise=args.noise or DemoPlan.noise,
            drift_at=args.drift_at,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:  # a folder it cannot write into was found at the end, the whole run lost
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.out):
            pass
    except OSError as e:
        raise ValueError(f"cannot write into --out {args.out}: {e.strerror or e}") from None
    settings = _on_device(
        from_flags(device=args.device, finetune_interval_s=args.finetune_interval_s)
    )
    progress = not args.json and sys.stderr.isatty()
    try:
        return run_demo(settings, plan, args.out, progress=progress)
    except redis.AuthenticationError:  # no retry mends it: what to fix, from commands.run
        raise
    except redis.ConnectionError as e:
        where = settings.url_for_logs()
        raise ValueError(f"cannot reach Redis at {where}: {unreachable(e, where)}") from None


def live_plot_command(args: argparse.Namespace) -> dict[str, Any]:
    if args.series is None:
        raise UsageError("plot --from-stream needs --series ID: the series to draw")
    refuse_given(args, PLOT_FILE_FLAGS, "for a plot from a checkpoint, not --from-stream")
    args = plot_defaults(args)
    settings = from_flags(redis_url=args.redis_url, partitions=args.partitions, unused=WORKER_ONLY)
    with redis_for(settings, "plot") as (client, settings):
        views = read_views(
            client,
            settings.keys,
            partitions=settings.partitions,
            series={args.series},
            newest=args.last,
        )
        # The stream written in more partitions than read here: the series may be in another.
        marked = None if args.series in views else client.get(settings.keys.partitions)
    if args.series not in views:
        k = partition_of(args.series, settings.partitions)
        count = marked.decode(errors="replace") if isinstance(marked, bytes) else ""
        hint = (
            f"; {settings.keys.partitions} says the stream is written in {count} partitions: "
            f"pass --partitions {count}"
            if count and count != str(settings.partitions)
            else ""
        )
        raise ValueError(
            f"no forecast for series {args.series!r} among the last {args.last:,} entries "
            f"of {settings.keys.partition(k, settings.partitions).output}{hint}"
        )
    written = draw(views, args.out, shown=[args.series], points=args.points, label=args.series)
    return summary(views) | {"series": args.series, "written": [str(w) for w in written]}


def models_command(args: argparse.Namespace) -> dict[str, Any]:
    settings = from_flags(
        redis_url=args.redis_url,
        models_stream=args.models_stream,
        model_key_file=args.model_key_file,
        unused=tuple(name for name in WORKER_ONLY if name != "model_key_file"),
    )
    with redis_for(settings, "models") as (client, settings):
        # keep None: nothing pruned here; the workers prune to their own keep_models at
        # their next promotion (this command's default of 5 deleted their rollback targets).
        store = ModelStore(client, settings.keys, keep=None, source="cli", key=settings.model_key())
        if args.action in ("rollback", "promote"):
            store.check_key()
            ensure_library(client)  # the serving pointer is set on the server (attnlstm_serve)
        if args.action == "rollback":
            checkpoint = store.get(args.version)  # refuses a missing, damaged or forged version
            before = store.serving()
            shape = _running(store, before)
            store.set_serving(checkpoint.version, "rolled_back", previous=before)
            _note_again(checkpoint.version, before)
            _note_shape(checkpoint, before, shape)  # (a rollback said nothing: a review)
            return {"serving": checkpoint.version, "previous": before}
        if args.action == "promote":
            return _promote(store, args.path, into_unsigned=args.sign_into_unsigned_store)
        events = [
            {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
            | {"id": entry_id.decode()}
            for entry_id, fields in reversed(store.recent_events(args.events))
            if fields is not None
        ]
        return {"serving": store.serving(), "versions": store.versions(), "events": events}


def _promote(store: ModelStore, path: Path, *, into_unsigned: bool) -> dict[str, Any]:
    """The model file stored (signed, with a key) and served by every worker. With a key,
    against a store of unsigned models, only when ``into_unsigned``: the workers that
    serve those have no key, and each would stop at its next start on a signed store."""
    if store.key is not None and not into_unsigned:
        signed, unsigned = store.signatures()
        if unsigned:
            named = ", ".join(unsigned[:3]) + (", ..." if len(unsigned) > 3 else "")
            raise ValueError(
                f"{len(unsigned)} of the {len(signed) + len(unsigned)} models in the store "
                f"({store.keys.versions}) are unsigned ({named}: no signature at "
                f"{store.keys.model_signature('VERSION')}, or another type of value there): "
                "the workers that stored them have no model key, and each would stop at its "
                "next start once a signed one is stored. Give every worker the key first "
                "(--model-key-file, ATTNLSTM_MODEL_KEY_FILE), then promote with "
                "--sign-into-unsigned-store"
            )
    checkpoint = open_checkpoint(path, FILE_BYTES_MAX)
    before = store.serving()
    shape = _running(store, before)  # read first: a failure here promotes nothing
    store.put(dumps(checkpoint.model, checkpoint.meta)[0], checkpoint.version)
    store.set_serving(checkpoint.version, "promoted", reason="promoted by hand")
    _note_again(checkpoint.version, before)
    _note_shape(checkpoint, before, shape)
    return {"serving": checkpoint.version, "previous": before, "signed": bool(store.key)}


def _note_again(version: str, before: str | None) -> None:
    """A note where ``version`` served already: its event said nothing of that. The
    event stays: it is what makes the workers that refused the version try it again,
    which mends their refusal where it was stored damaged and is now stored whole;
    without it, they served on with the one before (a review)."""
    if version == before:
        print(
            f"attnlstm models: note: model {version} served already: the workers that serve "
            "it serve on, and those that refused it try it again",
            file=sys.stderr,
        )


# Shapes: the values a model reads, its window and its horizon.
Shape = tuple[int, int, int]
# Events read at a time for the refusals of the version serving (``_refusals``).
REFUSALS_READ = 1000


def _note_shape(checkpoint: Checkpoint, before: str | None, running: _Running | None) -> None:
    """A note where ``checkpoint``, now served, has another shape than workers may run
    (``running``): served without a word before, while the workers refused it and
    stopped fine-tuning."""
    config = checkpoint.config
    new = (config.context, config.window, config.horizon)
    if running is None:
        return
    whose = []
    if running.own is not None and running.own != new:
        whose.append(f"{before}, serving before, reads {_read(running.own, 'forecasts')}")
    if refusing := [s for s in running.refusing if s != new]:
        read = " or ".join(_read(s, "forecast") for s in refusing)
        whose.append(f"the workers that refused {before} run models that read {read}")
    if whose:
        print(
            f"attnlstm models: note: model {checkpoint.version} reads "
            f"{_read(new, 'forecasts')}, where {', and '.join(whose)}: workers that run "
            "another shape refuse it (a `refused` event) and serve on with theirs; restart "
            "them to serve it (those with a model file of their own: without it)",
            file=sys.stderr,
        )


def _read(shape: Shape, forecast: str) -> str:
    return f"{shape[0]} values (window {shape[1]}) and {forecast} {shape[2]}"


@dataclasses.dataclass(frozen=True)
class _Running:
    """The shapes workers may run, as the store tells them: the version serving's own
    (None: damaged), and those in its `refused` events since it last began to serve
    (workers started since, or with no model file, run its own)."""

    own: Shape | None
    refusing: list[Shape]


def _running(store: ModelStore, version: str | None) -> _Running | None:
    """What workers may run before ``version`` is replaced; None where none serves. By
    its shape alone, a second model of a refused one's shape was promoted without a note
    while the workers refused it too (a review)."""
    if version is None:
        return None
    return _Running(_shape(store, version), _refusals(store, version.encode()))


def _refusals(store: ModelStore, version: bytes) -> list[Shape]:
    """The shapes in the `refused` events of ``version`` since it last began to serve,
    read back page by page to its switch (the fine-tunes' `trained` and `rejected`
    events had put refusals out of a first page's reach)."""
    refusing: list[Shape] = []
    before = None
    while page := store.recent_events(REFUSALS_READ, before):
        for _, fields in page:
            if fields is None or fields.get(b"version") != version:
                continue
            if fields.get(b"event") in SWITCHES:
                return refusing
            if fields.get(b"event") == b"refused" and (runs := _runs(fields.get(b"runs"))):
                refusing += [runs] if runs not in refusing else []
        before = page[-1][0]
    return refusing


# A `refused` event's ``runs`` is three counts: one longer is none (nested a hundred
# thousand deep, json.loads raised RecursionError, and the command a traceback).
RUNS_BYTES_MAX = 64
RUNS_MAX = 10**9  # no count of a shape is near it; one past it is no shape


def _runs(text: bytes | None) -> Shape | None:
    """A `refused` event's ``runs`` (a JSON list of three counts); None where it has
    none (an older release's event) or it is not that."""
    if not text or len(text) > RUNS_BYTES_MAX or not text.isascii():  # (json reads UTF-16)
        return None
    try:
        runs = json.loads(text)
    except ValueError:
        return None
    if not (isinstance(runs, list) and len(runs) == 3):
        return None
    if all(type(n) is int and 0 < n <= RUNS_MAX for n in runs) and runs[1] <= runs[0]:
        return runs[0], runs[1], runs[2]
    return None


def _shape(store: ModelStore, version: str) -> Shape | None:
    """The values the stored ``version`` reads, its window and its horizon; None where
    it is damaged."""
    try:
        config = store.get(version).config
    except CheckpointError:
        return None
    return config.context, config.window, config.horizon
