"""The Attention-LSTM: an LSTM whose hidden states are pooled by additive attention.

Per-window standardisation lives inside ``forward``: every window is shifted and
scaled to zero mean and unit variance before the LSTM sees it, and the forecasts are
mapped back to the window's own units. One global model therefore serves series of
any level and amplitude, and ``forward(a * x + b) == a * forward(x) + b`` for a > 0.

The head forecasts the change from the last observed value (a skip connection from
the last step, as in NLinear), so that training only has to learn what naive misses
(the head starts from torch's random weights: an untrained model forecasts the last
value plus a small random change). On the article's sine this takes the held-out
MSE from about 1e-7 to about 1e-9, and on the real sea-temperature recording it is
the difference between losing to naive and beating it. Beside it, a linear map from
the whole (standardised) window to the horizon, zero at first (as in DLinear): it
carries what is linear in the window, which on seasonal data is most of the forecast,
and leaves the LSTM the rest.

Seasonal context at a bounded cost: with ``lags`` (a period P, a week 7P), each of the
LSTM's ``window`` steps also sees the values ``lag`` steps before it, as extra input
features. The model reads ``context = window + max(lags)`` raw values, but runs the
LSTM over ``window`` steps only: a window of one day (48 half-hourly steps) with lags
6P and 7P puts, beside the hour of yesterday that each forecast step follows, the same
hour a week before and a week before that.

A seasonal profile at a bounded cost: with ``profile_weeks`` K (and a period P, a week
W = 7P), the model also computes the profile forecast ``last + S(t+h) - S(t)``, where
``S(u)`` is the mean of the values at the same hour of the seven days before ``u``, plus
the mean over the K weeks before of how far that weekday's value lay from the mean of the
same hour over the seven days centred on it (itself and three on either side): a weekday
effect that sums to zero over a week, so a series that repeats weekly is forecast exactly.
It is a fixed linear map of the context (no parameters; ``context`` grows to K weeks and
three days), and its share per step ahead,
``profile_share``, is zero until a blend (:mod:`attnlstm.blend`) finds that it helps: on
the electricity demand the profile alone forecasts one step ahead with MASE 0.163 (a day
ahead 0.038), the model alone 0.204 (0.042).
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn

from attnlstm.device import cpu_info
from attnlstm.intervals import FLAT

Scaling = Literal["window", "none"]
CLIP = 5.0  # standardised inputs are clipped to +- this many window deviations


def _integral(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def whole(value: object, name: str) -> int:
    """``value`` as an int: a Python or numpy integer (a bool is none); else TypeError."""
    if not _integral(value):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    return int(cast(numbers.Integral, value))


@dataclass(frozen=True)
class ModelConfig:
    window: int = 20  # input steps the LSTM runs over (and the attention weighs)
    horizon: int = 1  # steps it forecasts
    lags: tuple[int, ...] = ()  # extra features per step: the value this many steps before
    period: int = 0  # the data's main cycle in steps (0: none), as trained
    profile_weeks: int = 0  # weeks averaged by the seasonal profile (0: no profile)
    linear: bool = True  # the linear map from the window to the horizon
    hidden_size: int = 32  # LSTM hidden units, also the attention's input size
    num_layers: int = 1  # stacked LSTM layers
    dropout: float = 0.0  # between LSTM layers; ignored by torch when num_layers == 1
    attention_size: int = 32  # width of the additive attention's tanh layer
    scaling: Scaling = "window"  # per-window standardisation, or none

    def __post_init__(self) -> None:
        self._check_sizes()
        lags = list(self.lags)
        if any(not _integral(lag) or lag < 1 for lag in lags):
            raise ValueError(f"lags must be whole numbers >= 1, got {lags}")
        # Kept as a tuple of ints: a list given made the frozen config unhashable.
        object.__setattr__(self, "lags", tuple(int(lag) for lag in lags))
        for name in ("period", "profile_weeks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.profile_weeks and not 1 <= self.horizon <= self.period:
            raise ValueError(
                f"a profile needs a period of at least the horizon ({self.horizon}), "
                f"got {self.period}"
            )
        if self.window < 2:  # to scale by, and for the blend's trend: the last change
            raise ValueError("a window needs at least 2 steps, got 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.scaling not in ("window", "none"):
            raise ValueError(f"scaling must be 'window' or 'none', got {self.scaling!r}")
        if not isinstance(self.linear, bool):  # "no" was a linear map, 0 another version
            raise TypeError(f"linear must be True or False, got {self.linear!r}")

    def _check_sizes(self) -> None:
        sizes = ("window", "horizon", "hidden_size", "num_layers", "attention_size")
        for name in (*sizes, "period", "profile_weeks"):
            # A float window (20.5) was a torch error at the model's build.
            object.__setattr__(self, name, whole(getattr(self, name), name))
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def input_size(self) -> int:
        """Features per LSTM step: the value, and one per lag."""
        return 1 + len(self.lags)

    @property
    def context(self) -> int:
        """Raw values one forecast reads: the window, and as far back as the lags and the
        profile reach."""
        profile = (7 * self.profile_weeks + 3) * self.period + 1 if self.profile_weeks else 0
        return max(self.window + max(self.lags, default=0), profile)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lags": list(self.lags)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        # A config written before lags and the linear map: one feature, no linear map.
        if data.pop("input_size", 1) != 1:
            raise ValueError("input_size is derived from lags; only 1 is accepted")
        data.setdefault("linear", False)
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        if not isinstance(data.get("lags", []), list):
            raise ValueError("lags must be a list")
        return cls(**{**data, "lags": tuple(data.get("lags", []))})


def profile_taps(config: ModelConfig) -> list[tuple[int, float]]:
    """(offset, weight) pairs: the profile at a time u is the sum of weight * value[u +
    offset] (see the module's docstring)."""
    period, weeks = config.period, config.profile_weeks
    taps = [(-i * period, 1 / 7) for i in range(1, 8)]
    for j in range(1, weeks + 1):
        # the weekday's value less the mean of the seven days centred on it (itself included)
        taps.append((-j * 7 * period, 6 / (7 * weeks)))
        taps += [(-j * 7 * period + i * period, -1 / (7 * weeks)) for i in (-3, -2, -1, 1, 2, 3)]
    return taps


def one_step_reads(config: ModelConfig) -> np.ndarray:
    """(context,) bools, newest first: whether the one-step forecast reads the value
    that many steps before the newest (0: the newest itself). The window's values (the
    LSTM, the linear map and the standardisation), each lag's window, and the two values
    each of the profile's taps reads for its first step (S(t+1) - S(t)); nothing else
    moves it. The day-ahead model with a two-week profile reads 219 of its 817 values."""
    reads = np.zeros(config.context, dtype=bool)
    for lag in (0, *config.lags):
        reads[lag : lag + config.window] = True
    if config.profile_weeks:
        for k, _ in profile_taps(config):
            reads[[-k - 1, -k]] = True
    return reads


def profile_changes(z: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """(B, horizon): the profile's change S(t+h) - S(t) from the last value t of each
    context in ``z`` (B, context). A sum over the taps of slices (each tap reaches at
    least a period back, and the horizon is at most a period), not a (context, horizon)
    matrix product: a few thousand operations a window, where the product was 39,000."""
    last, horizon = z.shape[1] - 1, config.horizon
    profile = z.new_zeros((z.shape[0], horizon + 1))  # S(t), S(t+1), ..., S(t+horizon)
    for k, weight in profile_taps(config):
        profile += weight * z[:, last + k : last + k + horizon + 1]
    return profile[:, 1:] - profile[:, :1]


# Which tanh is fast on the CPU depends on the CPU, not on its instruction set (torch
# 2.13, AVX-512 on both): for the attention of 1,024 windows of 48 steps, torch.tanh takes
# 2.6-3.1 ms on an AMD EPYC, where 2 sigmoid(2x) - 1 takes 0.75-0.9 ms; on an Intel Xeon
# torch.tanh takes 0.27 ms, and the sigmoid form 1.1-1.3. Keyed on the vendor, not timed
# at start, so that a process forecasts as the one before it did on the same machine.
_SIGMOID_TANH = cpu_info("vendor_id") == "AuthenticAMD"


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh(x); on an AMD CPU as 2 sigmoid(2x) - 1 (within 2e-7 of torch.tanh)."""
    if _SIGMOID_TANH and x.device.type == "cpu":
        return 2 * torch.sigmoid(2 * x) - 1
    return torch.tanh(x)


class AdditiveAttention(nn.Module):
    """Bahdanau-style pooling: score_t = v . tanh(W h_t + b), softmax over time."""

    def __init__(self, hidden_size: int, attention_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, attention_size)  # W, b
        self.v = nn.Linear(attention_size, 1, bias=False)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.v(_tanh(self.proj(h))).squeeze(-1)  # (B, T)
        weights = torch.softmax(scores, dim=-1)  # (B, T)
        context = torch.bmm(weights.unsqueeze(1), h).squeeze(1)  # (B, H)
        return context, weights


def _unit(std: torch.Tensor) -> torch.Tensor:
    """A power of two per window (B, 1) that brings a deviation far from 1 to order 1,
    and 1 for the rest.

    The scaling itself runs in float32, in which the inverse of a deviation below about
    3e-39 (a valid series that lives at 1e-38) is infinite, and its forecasts with it.
    Multiplying by a power of two is exact, so such a window forecasts as the same window
    scaled up would; ordinary windows, multiplied by 1, keep their bits. Between 2**-64
    and 2**64 neither the inverse nor the deviations come near float32's limits.
    """
    _, exponent = torch.frexp(std)  # std = mantissa * 2**exponent; 0 for 0
    ones = torch.ones_like(std)
    return torch.where(exponent.abs() > 64, torch.ldexp(ones, -exponent), ones)


class AttentionLSTM(nn.Module):
    """``forward(x)`` takes raw values (B, context), oldest first, and returns forecasts
    (B, horizon) in the input's units, and attention weights (B, window) that sum to 1
    over the LSTM's steps."""

    profile_share: torch.Tensor  # (horizon,), with a profile: its share per step ahead

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.lstm = nn.LSTM(
            input_size=config.input_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.attention = AdditiveAttention(config.hidden_size, config.attention_size)
        self.head = nn.Linear(config.hidden_size, config.horizon)
        if config.linear:
            self.linear = nn.Linear(config.window * config.input_size, config.horizon)
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        if config.profile_weeks:
            self.register_buffer("profile_share", torch.zeros(config.horizon))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = self.config.context
        if x.dim() != 2 or x.shape[1] != context:
            raise ValueError(f"expected windows of shape (B, {context}), got {tuple(x.shape)}")
        if not x.is_floating_point():  # forecasts come back in x's dtype: ints truncated them
            raise TypeError(f"expected windows of floating-point values, got {x.dtype}")
        if self.config.scaling == "none":
            out, weights = self._forecast(x.to(self.head.weight.dtype))
            return out.to(x.dtype), weights
        # The statistics are taken in float64: series with a large level and a small
        # swing (1e6 +- 1) would lose their whole signal to float32 cancellation. They
        # are the window's (the last ``window`` values), applied to the lagged values too.
        x64 = x.double()
        recent = x64[:, -self.config.window :]
        mean = recent.mean(dim=1, keepdim=True)  # (B, 1)
        std = recent.std(dim=1, unbiased=False, keepdim=True)  # (B, 1)
        flat = std <= FLAT * mean.abs()
        # A constant window has nothing to standardise: it is fed as zeros and its
        # forecast is its own level, finite and scale-equivariant. Constant at a level
        # with no exact binary form (0.1), its deviation is rounding error, not 0: flat
        # too (FLAT), as its interval is. The difference from
        # the mean is what needs float64; scaled in the model's own type, it costs one
        # pass over the context fewer.
        dtype = self.head.weight.dtype
        unit = _unit(std)
        inverse = 1 / torch.where(flat, torch.ones_like(std), std * unit)
        z = torch.addcmul(mean * -unit, x64, unit)  # (x - mean) * unit in one pass, exactly
        z = z.to(dtype).mul_(inverse.to(dtype))  # (B, C)
        out, weights = self._forecast(z)
        scale = torch.where(flat, torch.zeros_like(std), std)
        # A flat window's level is its last value, not the mean, which rounds: the mean
        # of twenty 0.11s is 0.11000000000000001, and 0.11 then fell off the forecast of
        # a zero-wide interval, an anomaly of score inf.
        level = torch.where(flat, recent[:, -1:], mean)
        return (level + out.double() * scale).to(x.dtype), weights

    def _forecast(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forecasts (B, horizon) and attention of values in the model's own units."""
        window, end = self.config.window, z.shape[1]
        last = z[:, -1:].clone()  # the skip from the last value reads it unclipped
        # Clipped: a glitch in the lagged values (a pipe's flow dropping to a quarter a
        # week ago) would otherwise be hundreds of window deviations, and so the forecast.
        # Raw values (scaling none) are not: their units are no deviations.
        if self.config.scaling == "window":
            z = z.clamp_(-CLIP, CLIP)  # in place: z is this forward's own
        steps = [z[:, end - window - lag : end - lag] for lag in (0, *self.config.lags)]
        features = torch.stack(steps, dim=-1)  # (B, window, features)
        h, _ = self.lstm(features)  # (B, window, H)
        pooled, weights = self.attention(h)
        out = self.head(pooled) + last
        if self.config.linear:
            out = out + self.linear(features.flatten(1))
        if self.config.profile_weeks:
            out = out + self.profile_share * profile_changes(z, self.config)
        return out, weights

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
