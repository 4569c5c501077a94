"""Checkpoints round-trip exactly and refuse anything corrupt, altered or pickled."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import stat
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save

from attnlstm.checkpoint import (
    CONFIG_BOUNDS,
    CheckpointError,
    _digest,
    check_config,
    dumps,
    holds_checkpoint,
    load,
    loads,
    save,
    version_of,
)
from attnlstm.experiment import seasonal_config
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.synthetic import article_sine
from attnlstm.train import new_model
from attnlstm.windows import sliding_windows


def _windows() -> torch.Tensor:
    return torch.as_tensor(sliding_windows(article_sine(), 20).x, dtype=torch.float32)


def test_save_then_load_gives_bit_identical_predictions(
    trained_sines: AttentionLSTM, tmp_path: Path
) -> None:
    path = tmp_path / "m.safetensors"
    version = save(path, trained_sines, {"note": "hello", "losses": [1.0, 0.5]})
    loaded = load(path)
    assert loaded.version == version == version_of(trained_sines)
    assert loaded.config == trained_sines.config
    assert loaded.meta == {"note": "hello", "losses": [1.0, 0.5]}
    with torch.inference_mode():
        a, attn_a = trained_sines.eval()(_windows())
        b, attn_b = loaded.model(_windows())
    assert torch.equal(a, b)
    assert torch.equal(attn_a, attn_b)


def test_version_names_the_weights_not_the_metadata(trained_sines: AttentionLSTM) -> None:
    assert dumps(trained_sines, {"seconds": 1})[1] == dumps(trained_sines, {"seconds": 2})[1]
    other = new_model(trained_sines.config, seed=99)
    assert version_of(other) != version_of(trained_sines)


def test_every_flipped_byte_is_refused(trained_sines: AttentionLSTM) -> None:
    data, _ = dumps(trained_sines)
    header_end = 8 + int.from_bytes(data[:8], "little")
    # every header byte (where a flip could change meaning), and a spread of tensor bytes
    positions = list(range(header_end)) + list(range(header_end, len(data), 37))
    for pos in positions:
        corrupt = bytearray(data)
        corrupt[pos] ^= 0xFF
        with pytest.raises(CheckpointError):
            loads(bytes(corrupt))


def test_flipped_byte_in_a_file_names_the_file_and_the_reason(
    trained_sines: AttentionLSTM, tmp_path: Path
) -> None:
    path = tmp_path / "m.safetensors"
    save(path, trained_sines)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # a weight's low bit: a valid file in every other respect
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"m\.safetensors: content hash mismatch"):
        load(path)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_a_payload_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load(path)
    assert not marker.exists()


def test_a_torch_save_file_is_refused(trained_sines: AttentionLSTM, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(trained_sines.state_dict(), path)
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load(path)


def test_a_plain_safetensors_file_without_our_metadata_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"not an attnlstm checkpoint \(no valid metadata\)"):
        loads(st_save({"w": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="unsupported format 'attnlstm-checkpoint'"):
        loads(st_save({"w": torch.zeros(3)}, metadata={"format": "attnlstm-checkpoint"}))
    model = new_model(ModelConfig(hidden_size=4, attention_size=4))
    unhashed = {
        "format": "attnlstm-checkpoint",
        "format_version": "1",
        "config": json.dumps(model.config.to_dict(), sort_keys=True),
        "meta": "{}",
    }
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        loads(st_save(tensors, metadata=unhashed))


def test_an_unknown_format_version_is_refused_even_when_its_hash_is_right(
    trained_sines: AttentionLSTM,
) -> None:
    tensors = {k: v.contiguous() for k, v in trained_sines.state_dict().items()}
    header = {
        "format": "attnlstm-checkpoint",
        "format_version": "99",
        "config": json.dumps(trained_sines.config.to_dict(), sort_keys=True),
        "meta": "{}",
    }
    data = st_save(tensors, metadata={**header, "sha256": _digest(header, tensors)})
    with pytest.raises(CheckpointError, match=r"unsupported format.*'99'"):
        loads(data)


def test_truncated_empty_and_missing_files_are_refused(tmp_path: Path) -> None:
    model = new_model(ModelConfig(hidden_size=4, attention_size=4))
    data, _ = dumps(model)
    for bad in (b"", data[:6], data[:100], data[: len(data) // 2]):
        with pytest.raises(CheckpointError):
            loads(bad)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load(tmp_path / "absent.safetensors")


def test_a_device_is_not_read_and_a_pipe_with_no_writer_is_not_waited_for(
    tmp_path: Path,
) -> None:
    """``/dev/zero`` was read until memory ran out, and a named pipe held the reader
    until something wrote to it. (``/dev/null`` stands in for a device here: read, it
    would only be empty.) A pipe that a checkpoint is written into is read."""
    with pytest.raises(CheckpointError, match="cannot read checkpoint /dev/null: it is no reg"):
        load("/dev/null")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*: it is a folder"):
        load(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(CheckpointError, match=r"pipe: not a safetensors checkpoint \(too short"):
        load(tmp_path / "pipe")  # no writer: empty
    model = new_model(ModelConfig(hidden_size=4, attention_size=4))
    data, version = dumps(model)
    read, write = os.pipe()  # `--model <(cat m.st)`: /dev/fd/63
    try:
        os.write(write, data)  # (less than a pipe's buffer)
        os.close(write)
        assert load(f"/dev/fd/{read}").version == version
    finally:
        os.close(read)


def test_nothing_but_a_regular_file_is_saved_over(tmp_path: Path) -> None:
    """A save renamed its file over whatever was there: a device (``/dev/null`` became a
    file), or a link (``/dev/stdout``), which written through instead would write where
    whoever made it chose. A pipe stands in for a device here, which nothing is lost by."""
    model = new_model(ModelConfig(hidden_size=4, attention_size=4))
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    (tmp_path / "v1.st").write_bytes(b"kept")
    (tmp_path / "link.st").symlink_to("v1.st")
    (tmp_path / "dangling.st").symlink_to("absent/v2.st")
    for name in ("pipe", "folder", "link.st", "dangling.st"):
        with pytest.raises(CheckpointError, match=f"cannot write checkpoint .*{name}: it is no"):
            save(tmp_path / name, model)
    assert stat.S_ISFIFO((tmp_path / "pipe").lstat().st_mode)
    assert (tmp_path / "link.st").readlink() == Path("v1.st")
    assert (tmp_path / "v1.st").read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dangling.st", "folder", "link.st", "pipe", "v1.st"
    ]  # fmt: skip


def test_holds_checkpoint_knows_ours_from_other_files(tmp_path: Path) -> None:
    """What `train --out` may write over: a checkpoint of ours, even cut short; not
    another library's safetensors file, nor a CSV (it wrote over both)."""
    data, _ = dumps(new_model(ModelConfig(hidden_size=4, attention_size=4)))
    (tmp_path / "other.safetensors").write_bytes(st_save({"w": torch.zeros(2)}, {"a": "b"}))
    files = {
        "ours.st": data,
        "cut.st": data[:-100],  # its tensors cut short
        "nine.st": b"\x01" + b"\x00" * 7 + b"{",
        "data.csv": b"t,a\n1,2\n",
        "short.st": b"\x00" * 3,
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    held = {p.name: holds_checkpoint(p) for p in sorted(tmp_path.iterdir())}
    assert held == {
        "cut.st": True,
        "data.csv": False,
        "nine.st": False,
        "other.safetensors": False,
        "ours.st": True,
        "short.st": False,
    }


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_save_is_atomic_and_leaves_no_temp_files(
    failing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save over a checkpoint that fails part way (the disk full at the flush, the
    rename refused) leaves the old one whole, and no temp file. (It saved to a folder
    before, which a plain write_bytes refused alike: atomicity went unchecked.)"""
    path = tmp_path / "m.safetensors"
    save(path, new_model(ModelConfig(hidden_size=4, attention_size=4), seed=0))
    before = path.read_bytes()

    def fails(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, fails)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*m\.safetensors"):
        save(path, new_model(ModelConfig(hidden_size=4, attention_size=4), seed=1))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_checkpoint_is_created_as_the_umask_says(umask: int, tmp_path: Path) -> None:
    """Created 0600 (mkstemp's), a checkpoint copied into the worker's container was
    unreadable to its user: the deploy README's way to serve one failed."""
    before = os.umask(umask)
    try:
        save(tmp_path / "m.safetensors", new_model(ModelConfig(hidden_size=4, attention_size=4)))
    finally:
        os.umask(before)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def _forged(hidden_size: int) -> bytes:
    """A checkpoint of one tiny tensor whose config claims ``hidden_size``, its hash right."""
    tensors = {"head.bias": torch.zeros(1)}
    header = {
        "format": "attnlstm-checkpoint",
        "format_version": "1",
        "config": json.dumps(ModelConfig(hidden_size=hidden_size).to_dict(), sort_keys=True),
        "meta": "{}",
    }
    return st_save(tensors, metadata={**header, "sha256": _digest(header, tensors)})


# Loads each file named in argv, after a real one (torch's lazy setup is done by then);
# prints each refusal, then the seconds and the peak memory growth (KiB) of them all.
PROBE = """
import resource, sys
from attnlstm.checkpoint import CheckpointError, dumps, loads
from attnlstm.model import AttentionLSTM, ModelConfig
loads(dumps(AttentionLSTM(ModelConfig(hidden_size=4, attention_size=4)))[0])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[1:]:
    try:
        loads(open(path, "rb").read())
    except CheckpointError as e:
        print(e)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_a_small_file_claiming_a_huge_model_is_refused_before_anything_is_allocated(
    tmp_path: Path,
) -> None:
    """A 400-byte file claiming hidden_size 6000 (over the bound) used to build the model
    first: 550 MB and 1.6 s here. One within the bounds (4000) whose tensors are not that
    model's is refused on its declared shapes, also without building it."""
    paths = []
    for hidden in (6000, 4000):
        data = _forged(hidden_size=hidden)
        assert len(data) < 500
        paths.append(tmp_path / f"hidden-{hidden}.safetensors")
        paths[-1].write_bytes(data)
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    *refusals, figures = probe.stdout.strip().splitlines()
    assert refusals == [
        "checkpoint: hidden_size 6000 is out of bounds (a whole number from 1 to 4096)",
        "checkpoint: its tensors are not those of the model its config names",
    ]
    assert float(figures) < 20_000  # KiB the process grew by: 550 MB before


def test_declared_shapes_and_byte_lengths_must_be_the_configs(
    trained_sines: AttentionLSTM,
) -> None:
    """Every tensor of the config's model, of its shape and a float dtype, with the byte
    length those imply: checked on the header, before the tensors are read."""
    data, _ = dumps(trained_sines)
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])

    def forged(**entry: object) -> bytes:
        changed = copy.deepcopy(header)
        changed["head.bias"] |= entry
        text = json.dumps(changed).encode()
        return struct.pack("<Q", len(text)) + text + data[8 + size :]

    with pytest.raises(CheckpointError, match=r"tensor head\.bias is F32 \[2\]"):
        loads(forged(shape=[2]))
    with pytest.raises(CheckpointError, match=r"tensor head\.bias is I32 \[1\]"):
        loads(forged(dtype="I32"))
    with pytest.raises(CheckpointError, match=r"tensor head\.bias has the wrong byte length"):
        loads(forged(dtype="F64"))  # 8 bytes for its one value; 4 declared
    start, end = header["head.bias"]["data_offsets"]
    with pytest.raises(CheckpointError, match="do not add up to the file's"):
        loads(forged(data_offsets=[start, end + 4]))
    with pytest.raises(CheckpointError, match=r"bad declaration of tensor 'head\.bias'"):
        loads(forged(shape=[-1]))


@pytest.mark.parametrize(
    ("reach", "context"),
    [({"lags": (1_000_000,)}, 1_000_020), ({"period": 1_000, "profile_weeks": 100}, 703_001)],
)
def test_lags_or_a_profile_that_reach_past_the_bound_are_refused(
    reach: dict[str, Any], context: int
) -> None:
    # The worker keeps `context` values of every series: a planted config whose lags or
    # profile reach a million steps back would have it allocate gigabytes.
    config = ModelConfig(hidden_size=4, attention_size=4, **reach)
    tensors = {"head.bias": torch.zeros(1)}
    header = {
        "format": "attnlstm-checkpoint",
        "format_version": "1",
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "meta": "{}",
    }
    data = st_save(tensors, metadata={**header, "sha256": _digest(header, tensors)})
    with pytest.raises(CheckpointError, match=f"context {context} is out of bounds"):
        loads(data)


def _signed(tensors: dict[str, torch.Tensor], config: str, meta: str = "{}") -> bytes:
    """A checkpoint of ``tensors`` with this config and meta (JSON text), its hash right."""
    header = {
        "format": "attnlstm-checkpoint",
        "format_version": "1",
        "config": config,
        "meta": meta,
    }
    return st_save(tensors, metadata={**header, "sha256": _digest(header, tensors)})


def _small_model() -> tuple[dict[str, torch.Tensor], str]:
    model = new_model(ModelConfig(hidden_size=4, attention_size=4))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    return tensors, json.dumps(model.config.to_dict(), sort_keys=True)


def test_bf16_weights_are_refused_on_their_declared_dtype() -> None:
    """The format never writes BF16 (numpy, which hashes the tensors, has no bfloat16):
    accepted by the layout check, such a file failed in the hash with a TypeError that
    no caller catches, and a model planted in the store crash-looped every worker."""
    tensors, config = _small_model()
    bf16 = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    header = {"format": "attnlstm-checkpoint", "format_version": "1", "config": config}
    data = st_save(bf16, metadata={**header, "meta": "{}", "sha256": "0" * 64})
    with pytest.raises(CheckpointError, match=r"tensor \S+ is BF16 .* in F64, F32, F16$"):
        loads(data)


@pytest.mark.parametrize("size", [-1, 0])
def test_an_attention_size_below_one_is_refused(size: int) -> None:
    """-1 made building the model (on the meta device, for its shapes) raise a
    RuntimeError that escaped; 0 built a model whose attention has no width."""
    config = {**ModelConfig(hidden_size=4, attention_size=4).to_dict(), "attention_size": size}
    data = _signed({"head.bias": torch.zeros(1)}, json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=rf"does not describe a valid model \(attention_size must be >= 1, got {size}\)",
    ):
        loads(data)


def test_a_config_torch_cannot_build_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second line of defence: whatever building the model raises is a refusal."""

    def refuse(self: AttentionLSTM, config: ModelConfig) -> None:
        raise RuntimeError("Trying to create tensor with negative dimension -1")

    tensors, config = _small_model()
    monkeypatch.setattr(AttentionLSTM, "__init__", refuse)
    with pytest.raises(CheckpointError, match=r"does not describe a valid model .*negative"):
        loads(_signed(tensors, config))


@pytest.mark.parametrize(
    ("config", "refusal"),
    [
        (ModelConfig(window=10_001, hidden_size=4, attention_size=4), "window 10001"),
        (ModelConfig(lags=(20_000,), hidden_size=4, attention_size=4), "context 20020"),
    ],
)
def test_a_model_no_checkpoint_would_load_is_not_saved(
    config: ModelConfig, refusal: str, tmp_path: Path
) -> None:
    """save() wrote it, and load() refused it: trained by the library, which checks no
    bound (the command line does), it was found out only at the next load."""
    with pytest.raises(CheckpointError, match=f"^cannot save the model: {refusal} is out of"):
        save(tmp_path / "m.safetensors", AttentionLSTM(config))
    assert not list(tmp_path.iterdir())
    with pytest.raises(TypeError, match="meta must be a dict, got list"):
        dumps(AttentionLSTM(ModelConfig(hidden_size=4, attention_size=4)), [1, 2])  # type: ignore[arg-type]


DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested past Python's recursion limit


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: struct.pack("<Q", len(DEEP)) + DEEP.encode(), "not a safetensors checkpoint"),
        (lambda: _signed({"head.bias": torch.zeros(1)}, DEEP), "does not describe a valid model"),
        (lambda: _signed(*_small_model(), meta=DEEP), "does not describe a valid model"),
    ],
    ids=["header", "config", "meta"],
)
def test_json_nested_too_deep_is_refused(make: Callable[[], bytes], reason: str) -> None:
    """json.loads raises RecursionError on it, which the header and config parses let
    escape."""
    with pytest.raises(CheckpointError, match=reason):
        loads(make())


def test_meta_that_is_not_an_object_is_refused() -> None:
    """A checkpoint's metadata is read as a dict (its spread, by every worker serving it)."""
    with pytest.raises(CheckpointError, match="its meta is not a JSON object"):
        loads(_signed(*_small_model(), meta="[1, 2]"))


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf])
def test_weights_that_are_not_finite_are_refused(weight: float) -> None:
    """Every forecast of such a model is NaN: a worker served it, promoted it to the
    store and dead-lettered every valid entry ("forecast not finite"), and evaluate
    reported NaN scores, exit 0. The hash is right: the file is what was written."""
    model = new_model(ModelConfig(hidden_size=4, attention_size=4))
    with torch.no_grad():
        model.head.bias.fill_(weight)
    with pytest.raises(
        CheckpointError, match=r"^checkpoint: tensor head\.bias holds NaN or infinite weights$"
    ):
        loads(_signed(dict(model.state_dict()), json.dumps(model.config.to_dict())))
    # Nor is it saved: save() wrote it, and only the next load refused it.
    with pytest.raises(
        CheckpointError,
        match=r"^cannot save the model: tensor head\.bias holds NaN or infinite weights$",
    ):
        dumps(model)


def test_weights_not_of_the_configs_shapes_are_not_saved(tmp_path: Path) -> None:
    """A model whose config was replaced after it was built: saved, then refused at load
    (`tensor linear.weight is F32 [1, 20]; its config needs [1, 21]`)."""
    model = new_model(ModelConfig(hidden_size=4, attention_size=4))
    model.config = ModelConfig(window=21, hidden_size=4, attention_size=4)
    with pytest.raises(CheckpointError, match=r"^cannot save the model: tensor \S+ is F32 "):
        save(tmp_path / "m.safetensors", model)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_model_of_another_dtype_is_saved_as_it_loads(dtype: torch.dtype, tmp_path: Path) -> None:
    """Every loaded model runs in float32. A float64 or float16 model was stored in its own
    dtype under a version that its loaded self did not have (a store holding "model A"
    served model B); a bfloat16 one raised numpy's TypeError."""
    model = new_model(ModelConfig(hidden_size=4, attention_size=4)).to(dtype)
    path = tmp_path / "m.safetensors"
    version = save(path, model)
    loaded = load(path)
    assert version == loaded.version == version_of(model) == version_of(loaded.model)
    assert {t.dtype for t in loaded.model.state_dict().values()} == {torch.float32}
    as_float32 = {k: v.float() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, as_float32[k]) for k, v in loaded.model.state_dict().items())
    assert loaded.former_version is None  # (as this release writes it)
    # Stored in its own dtype, as before: loaded as float32, and named too by the version
    # that release gave it, which a store it filled holds it under.
    if dtype != torch.bfloat16:
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        config = json.dumps(model.config.to_dict(), sort_keys=True)
        before = loads(_signed(tensors, config))
        assert before.version == version
        assert before.former_version == _digest({"config": config}, tensors)[:16]


def test_float64_weights_past_float32s_range_are_refused() -> None:
    """1e300 in an F64 tensor is finite as stored and inf once loaded into the model's
    float32: the check before loading let it through, and every forecast was NaN."""
    tensors, config = _small_model()
    wide = {k: v.double() for k, v in tensors.items()}
    wide["head.bias"][0] = 1e300
    with pytest.raises(
        CheckpointError, match=r"^checkpoint: tensor head\.bias holds NaN or infinite weights$"
    ):
        loads(_signed(wide, config))


@pytest.mark.parametrize(
    ("period", "lags", "profile_weeks"),
    [
        (48, (48, 288, 336), 2),
        (588, (588, 3528, 4116), 2),  # the profile reaches 17 periods back: 9,997 values
        (589, (589, 3534, 4123), 0),
        (1250, (1250, 7500, 8750), 0),  # the window and 7 periods: 10,000 values
        (1251, (1251,), 0),
        (1440, (1440,), 0),  # a day of minutes: context 24,481 with the weekly profile
    ],
)
def test_the_default_model_of_a_period_reads_no_further_back_than_a_checkpoint_may(
    period: int, lags: tuple[int, ...], profile_weeks: int
) -> None:
    """`attnlstm train` on a CSV of minutes wrote a checkpoint that no loader took: the
    profile goes first, then the weekly lags, where they would reach past the bound."""
    horizon = min(period, CONFIG_BOUNDS["horizon"][1])
    config = seasonal_config(period, [100 * period], weekly_cycle=True, horizon=horizon)
    assert (config.lags, config.profile_weeks) == (lags, profile_weeks)
    check_config(config)
