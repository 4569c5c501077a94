"""Synthetic series: the article's sine, and many sines with their own character.

Everything is deterministic by seed: the same arguments give the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

DriftKind = Literal["frequency", "amplitude"]


def article_sine() -> np.ndarray:
    """The article's series: ``sin(linspace(0, 50, 1000))``, a step of about 0.05 rad."""
    return np.sin(np.linspace(0.0, 50.0, 1000))


@dataclass(frozen=True)
class SineSpec:
    n_series: int = 50
    n_points: int = 1000
    freq: tuple[float, float] = (0.05, 0.4)  # angular step in radians per point
    amplitude: tuple[float, float] = (0.5, 5.0)
    offset: tuple[float, float] = (-10.0, 10.0)
    noise: float = 0.0  # noise std, as a fraction of each series' amplitude
    drift_at: int | None = None  # step where every series changes character
    drift_kind: DriftKind = "frequency"
    drift_factor: tuple[float, float] = (1.5, 2.5)  # frequency or amplitude multiplier
    anomaly_rate: float = 0.0  # fraction of points replaced by spikes
    anomaly_size: float = 4.0  # spike height, in amplitudes


@dataclass(frozen=True)
class SineSet:
    values: np.ndarray  # (n_series, n_points)
    freq: np.ndarray  # (n_series,) angular step before any drift
    phase: np.ndarray  # (n_series,)
    amplitude: np.ndarray  # (n_series,) before any drift
    offset: np.ndarray  # (n_series,)
    anomalies: np.ndarray  # (n_series, n_points) bool, where spikes were injected


def make_sines(spec: SineSpec, seed: int = 0) -> SineSet:
    """Draw ``spec.n_series`` sines; parameters are uniform within the spec's ranges.

    With ``drift_at``, each series' frequency (or amplitude) is multiplied by a factor
    drawn from ``drift_factor`` from that step on; the phase stays continuous. So an
    amplitude drift shows at ``drift_at``, and a frequency drift from the step after:
    the value at ``drift_at`` is the same under either frequency, the first drifted
    step being the one that leads away from it.
    """
    _validate(spec)
    rng = np.random.default_rng(seed)
    s, n = spec.n_series, spec.n_points
    freq = rng.uniform(*spec.freq, size=s)
    phase = rng.uniform(0.0, 2.0 * np.pi, size=s)
    amplitude = rng.uniform(*spec.amplitude, size=s)
    offset = rng.uniform(*spec.offset, size=s)
    factor = rng.uniform(*spec.drift_factor, size=s)

    step_freq = np.repeat(freq[:, None], n, axis=1)  # (S, n)
    step_amp = np.repeat(amplitude[:, None], n, axis=1)  # (S, n)
    if spec.drift_at is not None:
        target = step_freq if spec.drift_kind == "frequency" else step_amp
        target[:, spec.drift_at :] *= factor[:, None]
    # Integrating the per-step frequency keeps the phase continuous across a drift.
    angle = phase[:, None] + np.concatenate(
        [np.zeros((s, 1)), np.cumsum(step_freq[:, :-1], axis=1)], axis=1
    )
    values = offset[:, None] + step_amp * np.sin(angle)
    if spec.noise > 0:
        values += rng.normal(0.0, 1.0, size=(s, n)) * spec.noise * amplitude[:, None]
    anomalies = rng.random((s, n)) < spec.anomaly_rate
    signs = rng.choice([-1.0, 1.0], size=(s, n))
    values = np.where(anomalies, values + signs * spec.anomaly_size * amplitude[:, None], values)
    return SineSet(values, freq, phase, amplitude, offset, anomalies)


def sine_steps(n_series: int, n_points: int, seed: int = 0) -> np.ndarray:
    """(n_points, n_series) sines of the default spec, one time step after another: the
    order a producer writes them in."""
    spec = SineSpec(n_series=n_series, n_points=max(n_points, 2))
    return make_sines(spec, seed).values.T[:n_points]


def _validate(spec: SineSpec) -> None:
    if spec.n_series < 1 or spec.n_points < 2:
        raise ValueError("need at least one series of at least two points")
    # Each field named with the flag of `attnlstm replay` and `demo` that sets it.
    for name in ("freq", "amplitude", "offset", "drift_factor"):
        lo, hi = getattr(spec, name)
        if lo > hi:
            flag = name.replace("_", "-")
            raise ValueError(f"{name} (--{flag} LO HI) range is empty: ({lo}, {hi})")
    if spec.noise < 0 or not 0.0 <= spec.anomaly_rate <= 1.0:
        raise ValueError("noise (--noise) must be >= 0 and anomaly_rate (--anomaly-rate) in [0, 1]")
    if spec.drift_at is not None and not 0 < spec.drift_at < spec.n_points:
        raise ValueError(
            f"drift_at (--drift-at) must lie inside the series' {spec.n_points:,} points "
            f"(1 to {spec.n_points - 1:,}), got {spec.drift_at}"
        )
