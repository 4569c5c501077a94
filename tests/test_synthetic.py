"""Synthetic series: the article's sine, and many sines, deterministic by seed."""

from __future__ import annotations

import numpy as np
import pytest

from attnlstm.synthetic import SineSpec, article_sine, make_sines


def test_article_sine_is_the_articles() -> None:
    np.testing.assert_array_equal(article_sine(), np.sin(np.linspace(0, 50, 1000)))


def test_same_seed_same_values_other_seed_other_values() -> None:
    spec = SineSpec(n_series=5, n_points=300, noise=0.1, anomaly_rate=0.01)
    a, b, c = make_sines(spec, seed=7), make_sines(spec, seed=7), make_sines(spec, seed=8)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.allclose(a.values, c.values)


def test_parameters_lie_in_their_ranges() -> None:
    spec = SineSpec(n_series=200, n_points=50)
    s = make_sines(spec, seed=1)
    assert s.values.shape == (200, 50)
    for name in ("freq", "amplitude", "offset"):
        lo, hi = getattr(spec, name)
        values = getattr(s, name)
        assert values.min() >= lo
        assert values.max() <= hi
    # no noise, no drift: each series is exactly its sine
    t = np.arange(50)
    expected = s.offset[:, None] + s.amplitude[:, None] * np.sin(
        s.phase[:, None] + s.freq[:, None] * t
    )
    np.testing.assert_allclose(s.values, expected, atol=1e-9)


def _crossings(values: np.ndarray, offset: np.ndarray) -> int:
    return int(np.sum(np.diff(np.sign(values - offset[:, None]), axis=1) != 0))


@pytest.mark.parametrize("kind", ["frequency", "amplitude"])
def test_drift_changes_the_series_from_its_step_on(kind: str) -> None:
    base = SineSpec(n_series=10, n_points=400)
    drifted = SineSpec(n_series=10, n_points=400, drift_at=200, drift_kind=kind)  # type: ignore[arg-type]
    a, b = make_sines(base, seed=3), make_sines(drifted, seed=3)
    np.testing.assert_array_equal(a.values[:, :200], b.values[:, :200])
    after_a, after_b = a.values[:, 200:], b.values[:, 200:]
    if kind == "frequency":  # more crossings of the offset after the change
        assert _crossings(after_b, a.offset) > 1.4 * _crossings(after_a, a.offset)
    else:
        assert np.ptp(after_b, axis=1).min() > 1.4 * np.ptp(after_a, axis=1).min()
    # A frequency drift keeps the phase continuous: no jump at the change bigger than
    # the largest other step (compared with a maximum that held it, this could not fail;
    # an amplitude drift does jump, by design: the swing changes at once).
    steps = np.abs(np.diff(b.values, axis=1))
    others = np.maximum(steps[:, :199].max(axis=1), steps[:, 200:].max(axis=1))
    jumps = steps[:, 199] > others + 1e-12
    assert not jumps.any() if kind == "frequency" else jumps.any()


@pytest.mark.parametrize(("kind", "first"), [("frequency", 201), ("amplitude", 200)])
def test_a_frequency_drift_shows_a_step_after_an_amplitude_drift(kind: str, first: int) -> None:
    """As the docstring and the README say: with a continuous phase, the value at
    drift_at is the same under either frequency (the README's figures rest on this)."""
    base = SineSpec(n_series=10, n_points=400)
    drifted = SineSpec(n_series=10, n_points=400, drift_at=200, drift_kind=kind)  # type: ignore[arg-type]
    a, b = make_sines(base, seed=3), make_sines(drifted, seed=3)
    np.testing.assert_array_equal(a.values[:, :first], b.values[:, :first])
    assert (a.values[:, first] != b.values[:, first]).all()


def test_anomalies_are_marked_and_stand_out() -> None:
    spec = SineSpec(n_series=20, n_points=1000, anomaly_rate=0.01)
    s = make_sines(spec, seed=2)
    clean = make_sines(SineSpec(n_series=20, n_points=1000), seed=2)
    assert 100 < s.anomalies.sum() < 300  # about 1% of 20,000
    jumps = np.abs(s.values - clean.values)
    assert (jumps[s.anomalies] >= 4.0 * 0.5 - 1e-9).all()
    assert (jumps[~s.anomalies] == 0).all()


def test_noise_scales_with_amplitude() -> None:
    noisy = make_sines(SineSpec(n_series=30, n_points=2000, noise=0.1), seed=4)
    clean = make_sines(SineSpec(n_series=30, n_points=2000), seed=4)
    # the noise is drawn after the parameters, so the parameters are the same
    np.testing.assert_array_equal(noisy.amplitude, clean.amplitude)
    ratio = (noisy.values - clean.values).std(axis=1) / noisy.amplitude
    np.testing.assert_allclose(ratio, 0.1, rtol=0.1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (SineSpec(n_series=0), "at least one series"),
        (
            SineSpec(amplitude=(5.0, 1.0)),
            r"amplitude \(--amplitude LO HI\) range is empty: \(5.0, 1.0\)",
        ),
        (SineSpec(noise=-1.0), r"noise \(--noise\) must be >= 0"),
        (
            SineSpec(n_points=100, drift_at=100),
            r"drift_at \(--drift-at\) must lie inside the series' 100 points \(1 to 99\)",
        ),
    ],
)
def test_bad_specs_are_refused(spec: SineSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_sines(spec)
