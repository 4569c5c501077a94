"""Forecasts read back from a live system and set beside the values that followed them.

Used by ``attnlstm demo`` and ``attnlstm plot --from-stream``: everything comes from
the streams themselves (the forecast's ``src`` names its input entry), so it works on
any running system, not only on one this process started.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from attnlstm.partition import partition_of
from attnlstm.plots import plot_attention, plot_latency, plot_series_forecasts
from worker.contract import Reading, entry_ms, parse
from worker.keys import Keys
from worker.streams import Entry, id_key, pages


@dataclass(frozen=True)
class SeriesView:
    """One series' forecasts (one-step), each beside the value that came next.

    ``actual`` and ``naive`` are NaN where the next value has not arrived yet.
    """

    name: str
    target_ms: np.ndarray  # (n,) ``ts`` of the value each forecast was for (NaN: not yet)
    forecast: np.ndarray  # (n,) yhat's first step
    actual: np.ndarray  # (n,) the series' next valid value
    naive: np.ndarray  # (n,) the last value in the window: what naive would forecast
    attention: np.ndarray  # (n, window)
    latency_ms: np.ndarray  # (n,) forecast entry time - input entry time
    position: np.ndarray  # (n,) index of the target among the series' values read

    @property
    def scored(self) -> np.ndarray:
        arrived: np.ndarray = ~np.isnan(self.actual)
        return arrived

    def mae(self) -> tuple[float, float]:
        """(model MAE, naive MAE) on the forecasts whose actual has arrived."""
        ok = self.scored
        return (
            float(np.mean(np.abs(self.forecast[ok] - self.actual[ok]))),
            float(np.mean(np.abs(self.naive[ok] - self.actual[ok]))),
        )


class Views(dict[str, SeriesView]):
    """The views by series name, and how many entries of the output stream read were
    skipped: a field missing, or one that does not decode (another producer's entry on
    the stream, say). Counted and reported, not dropped silently, nor a crash."""

    skipped: int = 0


@dataclass(frozen=True)
class _Forecast:
    """What a view takes from one forecast entry."""

    id: bytes
    src: bytes
    yhat: float  # the first step
    attention: list[float]


def read_views(
    client: redis.Redis,
    keys: Keys,
    *,
    partitions: int = 1,
    series: set[str] | None = None,
    newest: int | None = None,
) -> Views:
    """Forecasts for ``series`` (all when None) among the output stream's last
    ``newest`` entries, joined with the input stream. With ``newest`` None both streams
    are read whole, and a view's ``position`` is the index in its whole series. With P
    ``partitions``, from the partitions that hold ``series`` (each its last ``newest``)."""
    wanted = list(range(partitions))
    if series is not None:
        wanted = sorted({partition_of(name, partitions) for name in series})
    views = Views()
    for k in wanted:
        part = _read_views(client, keys.partition(k, partitions), series, newest)
        views |= part
        views.skipped += part.skipped
    return views


def _read_views(
    client: redis.Redis, keys: Keys, series: set[str] | None, newest: int | None
) -> Views:
    forecasts: dict[str, list[_Forecast]] = {}
    skipped = 0
    for entry_id, fields in _entries(client, keys.output, newest=newest):
        if fields is None:
            continue
        try:
            name = fields[b"series"].decode()
        except (KeyError, UnicodeDecodeError):
            skipped += 1
            continue
        if series is None or name in series:
            forecast = _forecast(entry_id, fields)
            if forecast is None:
                skipped += 1
            else:
                forecasts.setdefault(name, []).append(forecast)
    views = Views()
    views.skipped = skipped
    if forecasts:
        first_src = min((f.src for rows in forecasts.values() for f in rows), key=id_key)
        start = b"-" if newest is None else first_src
        values = _inputs(client, keys.input, set(forecasts), start=start)
        views |= {name: _view(name, rows, values.get(name, [])) for name, rows in forecasts.items()}
    return views


def _forecast(entry_id: bytes, fields: dict[bytes, bytes]) -> _Forecast | None:
    """The entry's forecast, or None where a field is missing or does not decode."""
    try:
        src = fields[b"src"]
        id_key(src)  # an entry id
        yhat, attention = json.loads(fields[b"yhat"]), json.loads(fields[b"attn"])
        return _Forecast(entry_id, src, float(yhat[0]), [float(a) for a in attention])
    except (KeyError, IndexError, TypeError, ValueError):  # ValueError: bad JSON or UTF-8 too
        return None


def _inputs(
    client: redis.Redis, key: str, names: set[str], *, start: bytes
) -> dict[str, list[tuple[bytes, Reading]]]:
    """Each series' valid entries from ``start`` (included) on: ids and readings."""
    out: dict[str, list[tuple[bytes, Reading]]] = {}
    series_ids: dict[bytes, str] = {}
    for page in pages(client, key, first=start):
        for entry_id, fields in page:
            reading = parse(entry_id, fields, series_ids) if fields is not None else None
            if isinstance(reading, Reading) and reading.series in names:
                out.setdefault(reading.series, []).append((entry_id, reading))
    return out


def _entries(client: redis.Redis, key: str, *, newest: int | None) -> Iterator[Entry]:
    """The stream, oldest first; only its last ``newest`` entries when given."""
    if newest is None:
        for page in pages(client, key):
            yield from page
        return
    taken: list[Entry] = []
    for page in pages(client, key, count=min(newest, 10_000), newest_first=True):
        taken += page[: newest - len(taken)]
        if len(taken) == newest:
            break
    yield from reversed(taken)


def _view(name: str, rows: list[_Forecast], inputs: list[tuple[bytes, Reading]]) -> SeriesView:
    at = {entry_id: k for k, (entry_id, _) in enumerate(inputs)}
    n = len(inputs)
    value = np.asarray([r.value for _, r in inputs] + [np.nan], dtype=np.float64)  # n: not yet
    times = np.asarray([r.ts for _, r in inputs] + [np.nan], dtype=np.float64)
    src = np.array([at.get(r.src, n) for r in rows])
    target = np.where(src < n, src + 1, n)
    # A model of another window (promoted by hand) leaves shorter rows: NaN-padded.
    attention = np.full((len(rows), max(len(r.attention) for r in rows)), np.nan)
    for k, r in enumerate(rows):
        attention[k, : len(r.attention)] = r.attention
    return SeriesView(
        name=name,
        target_ms=times[target],
        forecast=np.array([r.yhat for r in rows], dtype=np.float64),
        actual=value[target],
        naive=value[src],
        attention=attention,
        latency_ms=np.array([entry_ms(r.id) - entry_ms(r.src) for r in rows], dtype=np.float64),
        position=target,
    )


def summary(views: Views) -> dict[str, Any]:
    """Figures over every view: forecasts, scored ones, MAE against naive, latency; and
    ``skipped``, the entries read that were no forecast, when there were any."""
    skipped = {"skipped": views.skipped} if views.skipped else {}
    if not views:
        return {"forecasts": 0} | skipped
    every = list(views.values())
    latency = np.concatenate([v.latency_ms for v in every])
    ok = [v.scored for v in every]
    error = np.concatenate(
        [np.abs(v.forecast - v.actual)[s] for v, s in zip(every, ok, strict=True)]
    )
    naive = np.concatenate([np.abs(v.naive - v.actual)[s] for v, s in zip(every, ok, strict=True)])
    out: dict[str, Any] = {
        "forecasts": int(latency.size),
        "scored": int(error.size),
        "p50_latency_ms": float(np.percentile(latency, 50)),
        "p99_latency_ms": float(np.percentile(latency, 99)),
    }
    if error.size:
        out |= {"mae": float(error.mean()), "naive_mae": float(naive.mean())}
        out["mae_vs_naive"] = out["mae"] / out["naive_mae"] if out["naive_mae"] else None
    return out | skipped


def errors_by_time(views: dict[str, SeriesView], *, bucket_ms: float) -> dict[str, np.ndarray]:
    """Every series' absolute one-step errors (model and naive), averaged per time
    bucket of their targets' ``ts``: ``t_ms`` (bucket starts), ``mae``, ``naive_mae``."""
    scored = [v for v in views.values() if v.scored.any()]
    if not scored:
        return {"t_ms": np.empty(0), "mae": np.empty(0), "naive_mae": np.empty(0)}
    t = np.concatenate([v.target_ms[v.scored] for v in scored])
    err = np.concatenate([np.abs(v.forecast - v.actual)[v.scored] for v in scored])
    naive = np.concatenate([np.abs(v.naive - v.actual)[v.scored] for v in scored])
    bucket = ((t - t.min()) // bucket_ms).astype(np.int64)
    count = np.bincount(bucket)
    has = count > 0
    return {
        "t_ms": (t.min() + np.flatnonzero(has) * bucket_ms),
        "mae": np.bincount(bucket, weights=err)[has] / count[has],
        "naive_mae": np.bincount(bucket, weights=naive)[has] / count[has],
    }


def draw(
    views: dict[str, SeriesView], out_dir: Path, *, shown: list[str], points: int, label: str
) -> list[Path]:
    """forecasts.png (the ``shown`` series, their last ``points`` forecasts that have an
    actual), attention.png (the first shown series) and latency.png (every view)."""
    panels = []
    for name in shown:
        view = views[name]
        ok = np.flatnonzero(view.scored)[-points:]
        panels.append(
            (
                f"{name}: {_scores(view)}",
                view.target_ms[ok].astype("datetime64[ms]"),
                view.actual[ok],
                view.forecast[ok],
            )
        )
    first = views[shown[0]]
    latency = np.concatenate([v.latency_ms for v in views.values()])
    return [
        plot_series_forecasts(
            panels, out_dir / "forecasts.png", title=f"{label}: one-step forecasts read back"
        ),
        plot_attention(
            first.attention[-points:],
            out_dir / "attention.png",
            title=f"{first.name}: attention of its last {min(points, len(first.attention))} "
            "forecasts (one row each)",
        ),
        plot_latency(
            latency,
            out_dir / "latency.png",
            title=f"{label}: end-to-end latency of {latency.size:,} forecasts",
        ),
    ]


def _scores(view: SeriesView) -> str:
    """A panel's figures: the view's MAE and naive's, or none before an actual came."""
    if not view.scored.any():
        return "MAE none yet (no actual has come)"
    model, naive = view.mae()
    return f"MAE {model:.4g}, naive last value {naive:.4g}"
