"""``attnlstm replay``, and the Redis client that every command talking to a live system
opens (:func:`redis_for`). Neither needs the model, nor torch (1-2 s to import): a
replay starts writing at once."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from attnlstm.synthetic import SineSpec
from worker.cli.argtypes import refuse_given
from worker.cli.commands import refusal
from worker.contract import parse
from worker.settings import WORKER_ONLY, Settings, from_flags
from worker.streams import NOT_REDIS_HINT, connect, credentials_fix, unreachable
from worker.tools.replay import (
    MAX_SINE_VALUES,
    CsvLayout,
    FlatFields,
    check_sine_size,
    count_csv,
    csv_entries,
    replay,
    sine_entries,
)
from worker.usage import UsageError

# The flags of each source, (flag, argument): each defaults to None (or, --column, to
# []), so that one given with the other source is refused, not ignored.
SINE_FLAGS = (
    ("--series", "series"),
    ("--points", "points"),
    ("--seed", "seed"),
    ("--prefix", "prefix"),
    ("--freq", "freq"),
    ("--amplitude", "amplitude"),
    ("--offset", "offset"),
    ("--drift-factor", "drift_factor"),
    ("--noise", "noise"),
    ("--drift-at", "drift_at"),
    ("--drift-kind", "drift_kind"),
    ("--anomaly-rate", "anomaly_rate"),
    ("--bad-rate", "bad_rate"),
)
DRIFT_FLAGS = (("--drift-kind", "drift_kind"), ("--drift-factor", "drift_factor"))
CSV_FLAGS = (
    ("--time-column", "time_column"),
    ("--column", "column"),
    ("--series-column", "series_column"),
    ("--value-column", "value_column"),
)


def replay_command(args: argparse.Namespace) -> dict[str, Any]:
    if args.rate is not None and args.seconds is not None and args.seconds * args.rate <= 0.5:
        raise UsageError(
            f"--seconds {args.seconds:g} at --rate {args.rate:g} is less than one entry"
        )
    entries, total = _replay_source(args)
    settings = from_flags(
        redis_url=args.redis_url,
        input_stream=args.stream,
        partitions=args.partitions,
        unused=WORKER_ONLY,
    )
    with redis_for(settings, "replay") as (client, settings):
        return replay(
            client,
            settings.input_stream,
            entries,
            rate=args.rate,
            seconds=args.seconds,
            maxlen=args.maxlen,
            total=total,
            progress=not args.json and sys.stderr.isatty(),
            partitions=settings.partitions,
        )


def _replay_source(args: argparse.Namespace) -> tuple[Iterable[FlatFields], int | None]:
    """The entries to write, and how many there are when that is known."""
    if args.csv is not None:
        return _csv_source(args)
    refuse_given(args, CSV_FLAGS, "for --csv, not sines")
    if args.drift_at is None:  # they were ignored
        refuse_given(args, DRIFT_FLAGS, "for a drift: give --drift-at STEP")
    default = SineSpec()
    n_series = args.series or default.n_series
    points = args.points
    if points is None and args.seconds is not None:
        if args.rate is None:
            raise UsageError("--seconds with --fast needs --points: how many to write")
        wanted = args.seconds * args.rate  # inf past the floats' range
        if wanted > MAX_SINE_VALUES:
            raise UsageError(
                f"--seconds {args.seconds:g} at --rate {args.rate:g} is {wanted:.3g} entries, "
                f"more than the {MAX_SINE_VALUES:,} sine values a replay draws at once: give "
                "--points (per series; it stops after --seconds or when they run out), "
                "or a lower --seconds"
            )
        points = max(2, math.ceil(wanted / n_series))
    spec = SineSpec(
        n_series=n_series,
        n_points=points or 1000,
        freq=args.freq or default.freq,
        amplitude=args.amplitude or default.amplitude,
        offset=args.offset or default.offset,
        noise=args.noise or default.noise,
        drift_at=args.drift_at,
        drift_kind=args.drift_kind or default.drift_kind,
        drift_factor=args.drift_factor or default.drift_factor,
        anomaly_rate=args.anomaly_rate or default.anomaly_rate,
    )
    bad_rate = args.bad_rate or 0.0
    prefix = "sine-" if args.prefix is None else args.prefix
    _check_prefix(prefix, spec.n_series)
    try:  # the sines are drawn here: what they refuse, the flags asked for
        check_sine_size(spec)
        entries = sine_entries(spec, seed=args.seed or 0, bad_rate=bad_rate, prefix=prefix)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return entries, None if bad_rate else spec.n_series * spec.n_points


def _csv_source(args: argparse.Namespace) -> tuple[Iterable[FlatFields], int]:
    """The entries of ``--csv``, and how many: every row checked first."""
    refuse_given(args, SINE_FLAGS, "for sines, not --csv")
    if args.series_column is None and args.value_column is not None:  # it was ignored
        raise UsageError("--value-column is for a long file, with --series-column")
    if args.series_column is not None and args.column:  # so was this
        raise UsageError("--column is for a wide file, not with --series-column")
    if args.csv.is_dir():
        raise UsageError(f"--csv {args.csv} is a folder, not a CSV file")
    if args.csv.exists() and not args.csv.is_file():  # read twice: a pipe, once only
        raise UsageError(
            f"--csv {args.csv} is no file: replay reads it twice (every row checked "
            "before the first is sent); write it to a file first"
        )
    layout = CsvLayout(
        time_column=args.time_column,
        value_columns=tuple(args.column),
        series_column=args.series_column,
        value_column=args.value_column or CsvLayout.value_column,
    )
    count = count_csv(args.csv, layout)
    if count.refused:
        print(
            f"attnlstm replay: note: the worker refuses {count.refused:,} of the "
            f"{count.total:,} values, each dead-lettered (the first, {args.csv}:"
            f"{count.first_refused})",
            file=sys.stderr,
        )
    return csv_entries(args.csv, layout), count.total


def _check_prefix(prefix: str, n_series: int) -> None:
    """A usage error where the series ids of ``prefix`` (the longest, the last) are no
    ids the worker takes: they were written, and every entry dead-lettered."""
    last = f"{prefix}{n_series - 1}"
    try:
        refused = parse(b"0-1", {b"series": last.encode(), b"value": b"0"})
    except UnicodeEncodeError:  # a byte the shell's locale could not decode
        refused = "it is no text"
    if isinstance(refused, str):
        raise UsageError(
            f"argument --prefix: series id {last!r} is refused by the worker: {refused}"
        )


@contextlib.contextmanager
def redis_for(settings: Settings, command: str) -> Iterator[tuple[redis.Redis, Settings]]:
    """A client for the configured Redis, and the settings for it (a cluster's keys on a
    Redis Cluster). A lost connection, a command Redis refuses (a database index out
    of range, a user without the right, a key of another type), and a URL option the
    client refuses (``ssl_cert_reqs=bogus``) are one-line errors with what was said; an
    error of the client's own data (redis.DataError: a bug here) is not caught."""
    url = settings.url()
    if url is None:
        raise ValueError(
            f"{command} needs a Redis: set ATTNLSTM_REDIS_URL or pass --redis-url "
            "(`attnlstm demo` runs an embedded one with a worker and a replay)"
        )
    try:
        client = connect(
            url,
            socket_timeout_s=settings.socket_timeout_s,
            client_name=command,
            cluster=settings.cluster,
        )
        try:
            yield client, settings.on(client)
        finally:
            client.close()
    except redis.AuthenticationError as e:  # (a ConnectionError, that no retry mends)
        where = settings.url_for_logs()
        fix = credentials_fix(settings.redis_password_file)
        raise ValueError(f"Redis at {where} refused: {e}; {fix}") from None
    except (redis.ConnectionError, redis.TimeoutError) as e:
        where = settings.url_for_logs()
        raise ValueError(f"cannot reach Redis at {where}: {unreachable(e, where)}") from None
    except redis.ResponseError as e:
        raise ValueError(f"Redis at {settings.url_for_logs()} refused: {refusal(e)}") from None
    except redis.DataError:
        raise
    except redis.InvalidResponse as e:
        raise ValueError(f"Redis at {settings.url_for_logs()}: {e}: {NOT_REDIS_HINT}") from None
    except redis.RedisError as e:
        raise ValueError(f"Redis at {settings.url_for_logs()}: {e}") from None
