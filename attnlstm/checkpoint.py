"""Checkpoints: safetensors weights plus config and metadata, with a content hash.

The file is a plain safetensors file (no pickle, so loading cannot run code). Its
header metadata carries the format version, the model config, the training
metadata and ``sha256``: a hash over everything else in the file (metadata and every
tensor's name, dtype, shape and bytes). Loading recomputes it, so a flipped byte
anywhere is refused. The model's version is a second hash, over the config and the
weights only, as this release writes them: the same model trained twice gets the same
version, whatever its metadata (timings) says, and so does a file of an older release
(its config without the fields added since, which take their defaults) stored again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import secrets
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from attnlstm.errors import CheckpointError as CheckpointError
from attnlstm.files import open_file
from attnlstm.model import AttentionLSTM, ModelConfig

FORMAT = "attnlstm-checkpoint"
HEADER_BYTES_MAX = 100_000_000  # what safetensors reads of a header, at most
FORMAT_VERSION = 1
VERSION_HEX = 16  # hex digits of the content hash used as the model version
# Bounds on a stored config: the upper ones far above what this project trains (hidden
# 32, window 20), far below what a forecaster of one value per step could use; a size
# below its lower one is no model (an attention of width -1 cannot even be built).
CONFIG_BOUNDS = {
    "window": (2, 10_000),
    "horizon": (1, 1_000),
    "input_size": (1, 1_024),  # 1 + the number of lags
    "context": (1, 10_000),  # values a forecast reads (the worker keeps this many a series)
    "period": (0, 10_000),
    "profile_weeks": (0, 1_000),
    "hidden_size": (1, 4_096),
    "num_layers": (1, 16),
    "attention_size": (1, 4_096),
}
# The dtypes a model may load from: those the hash can read (numpy has no bfloat16).
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2}


@dataclass(frozen=True)
class Checkpoint:
    model: AttentionLSTM
    version: str  # content hash prefix; names the model in every forecast
    meta: dict[str, Any] = field(default_factory=dict)  # training metadata
    # The version releases before 2026-12-06 gave the same bytes (a hash of the file's own
    # config text, which lacks the fields added since): a model store that such a release
    # filled names the model by it. None where it is ``version``.
    former_version: str | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def dumps(model: AttentionLSTM, meta: dict[str, Any] | None = None) -> tuple[bytes, str]:
    """The checkpoint as bytes, and its version: the weights as float32, the dtype every
    loaded model runs in, so that the version is the one :func:`load` gives the file.
    Refused (CheckpointError, TypeError): what :func:`loads` would refuse (a weight that is
    not finite, weights not of the shapes the model's config names; both were saved, then
    refused at load), and metadata that is no dict."""
    check_config(model.config, "cannot save the model")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    tensors, config = _tensors(model), _config_json(model)
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": config,
        "meta": json.dumps(meta or {}, sort_keys=True),
    }
    data = st_save(tensors, metadata={**header, "sha256": _digest(header, tensors)})
    return data, loads(data, source="cannot save the model").version


def version_of(model: AttentionLSTM) -> str:
    """The model's version: a hash of its config and weights (as float32), nothing else."""
    return _version(_config_json(model), _tensors(model))


def save(path: str | Path, model: AttentionLSTM, meta: dict[str, Any] | None = None) -> str:
    """Write atomically (temp file in the same folder, fsync, rename); return the version.

    Anything at ``path`` but a regular file is refused, not renamed over: a device
    (``/dev/null`` became a file), a pipe, a folder, or a link (``/dev/stdout``; and a
    link written through would write where whoever made it chose)."""
    data, version = dumps(model, meta)
    path = Path(path)
    tmp: str | None = None
    try:
        if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
            raise OSError(errno.EINVAL, "it is no regular file (a link, device or pipe)")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_beside(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return version


def _create_beside(path: Path) -> tuple[int, str]:
    """A new file beside ``path`` for writing, and its name: created as open() creates
    one, its mode 0666 less the umask. mkstemp's 0600 made every checkpoint unreadable to
    any other user, such as a worker's container, which reads one copied into its volume
    as its own user (`cannot read checkpoint ...: Permission denied`)."""
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue


def loads(data: bytes, *, source: str = "checkpoint") -> Checkpoint:
    """Rebuild the model from checkpoint bytes, refusing anything that does not verify."""
    header, declared = _header(data, source)
    if header.get("format") != FORMAT or header.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{source}: unsupported format {header.get('format')!r} "
            f"version {header.get('format_version')!r} (this build reads version {FORMAT_VERSION})"
        )
    config = _config(header, source)
    _check_layout(declared, config, source)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{source}: unreadable tensors ({e})") from e
    expected = header.pop("sha256", None)
    if expected != _digest(header, tensors):
        raise CheckpointError(f"{source}: content hash mismatch, the file is corrupt or altered")
    try:
        meta = json.loads(header["meta"])  # RecursionError (a RuntimeError) when too deep
        model = AttentionLSTM(config)
        model.load_state_dict(tensors, strict=True)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{source}: does not describe a valid model ({e})") from e
    # A NaN or infinite weight makes every forecast NaN: a worker would dead-letter every
    # valid entry ("forecast not finite") and promote the model to the store. Checked as
    # loaded: a float64 tensor's 1e300 is finite as stored, and inf in the model's float32.
    weights = model.state_dict()
    broken = next((name for name in sorted(weights) if not weights[name].isfinite().all()), None)
    if broken is not None:
        raise CheckpointError(f"{source}: tensor {broken} holds NaN or infinite weights")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: its meta is not a JSON object")
    model.eval()
    # The loaded model's version, as :func:`dumps` gives it: not one of the file's own
    # config text and tensors. A file of an older release (its config without the fields
    # added since) had a version that its bytes, stored again by a worker or `models
    # promote`, did not: every worker then refused the store's model as not its version.
    # The former version is hashed only where the file is not as this release writes it:
    # its config text another (an older release's), or a tensor not float32.
    version, stored = version_of(model), tensors.values()
    if header["config"] == _config_json(model) and all(t.dtype == torch.float32 for t in stored):
        return Checkpoint(model, version, meta)
    former = _version(header["config"], tensors)
    return Checkpoint(model, version, meta, None if former == version else former)


def load(path: str | Path, max_bytes: int | None = None) -> Checkpoint:
    """The checkpoint in the file at ``path``; with ``max_bytes``, no more than that is
    read (a file of 1 GB, or ``/dev/zero``, was read whole before anything looked at it)
    and a larger file is refused."""
    path = Path(path)
    try:
        with open_file(path) as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    if max_bytes is not None and len(data) > max_bytes:
        raise CheckpointError(f"checkpoint {path} is larger than {max_bytes:,} bytes: not read")
    return loads(data, source=str(path))


def holds_checkpoint(path: str | Path) -> bool:
    """Whether the file at ``path`` begins as a checkpoint of ours does (a safetensors
    header that names :data:`FORMAT`; its tensors may be cut short): what ``attnlstm
    train --out`` may write over (it wrote over the CSV it trained on, and would over
    another library's ``model.safetensors``). OSError as :func:`open_file`."""
    with open_file(path) as f:
        head = f.read(8)
        if len(head) < 8 or (size := struct.unpack("<Q", head)[0]) > HEADER_BYTES_MAX:
            return False
        header = f.read(size)
    try:
        meta = json.loads(header)["__metadata__"]
    except (ValueError, RecursionError, TypeError, KeyError):  # not JSON, or none of ours
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def open_checkpoint(path: str | Path, max_bytes: int | None = None) -> Checkpoint:
    """:func:`load`, with a hint of how to make one when there is no file at ``path``."""
    if not Path(path).exists():
        raise CheckpointError(f"no model at {path}: train one with: attnlstm train --out PATH")
    return load(path, max_bytes)


# A tensor as the safetensors header declares it: dtype, shape, [start, end) of its bytes.
Declared = tuple[str, list[int], tuple[int, int]]


def _header(data: bytes, source: str) -> tuple[dict[str, str], dict[str, Declared]]:
    """The safetensors header's metadata and its tensor declarations, checked for shape
    before any tensor is read."""
    if len(data) < 8:
        raise CheckpointError(f"{source}: not a safetensors checkpoint (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise CheckpointError(f"{source}: not a safetensors checkpoint (bad header length)")
    try:
        parsed = json.loads(data[8 : 8 + size])
    except (ValueError, RecursionError) as e:  # undecodable, not JSON, or nested too deep
        raise CheckpointError(f"{source}: not a safetensors checkpoint (bad header)") from e
    meta = parsed.pop("__metadata__", None) if isinstance(parsed, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{source}: not an attnlstm checkpoint (no valid metadata)")
    declared = {name: _declaration(name, entry, source) for name, entry in parsed.items()}
    if sum(end - start for _, _, (start, end) in declared.values()) != len(data) - 8 - size:
        raise CheckpointError(f"{source}: its tensors' byte lengths do not add up to the file's")
    return dict(meta), declared


def _declaration(name: str, entry: Any, source: str) -> Declared:
    """One tensor's entry in the header, checked for types."""
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{source}: bad declaration of tensor {name!r}") from e
    listed = isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
    if not listed or not all(type(n) is int and n >= 0 for n in [*shape, *offsets]):
        raise CheckpointError(f"{source}: bad declaration of tensor {name!r}")
    if not isinstance(dtype, str) or offsets[1] < offsets[0]:
        raise CheckpointError(f"{source}: bad declaration of tensor {name!r}")
    return dtype, shape, (offsets[0], offsets[1])


def _config(header: dict[str, str], source: str) -> ModelConfig:
    """The model config of a header, within :data:`CONFIG_BOUNDS`."""
    try:
        config = ModelConfig.from_dict(json.loads(header["config"]))
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{source}: does not describe a valid model ({e})") from e
    check_config(config, source)
    return config


def check_config(config: ModelConfig, source: str = "checkpoint") -> None:
    """CheckpointError unless ``config`` is within :data:`CONFIG_BOUNDS`: what loading
    takes, so what training may make (a model over them is saved, then refused)."""
    for name, (low, high) in CONFIG_BOUNDS.items():
        value = getattr(config, name)
        if type(value) is not int or not low <= value <= high:
            raise CheckpointError(
                f"{source}: {name} {value!r} is out of bounds (a whole number from {low} to {high})"
            )


def _check_layout(declared: dict[str, Declared], config: ModelConfig, source: str) -> None:
    """The tensors declared are those of the config's model, shape for shape, each of
    a dtype of :data:`DTYPE_BYTES` and of the byte length its shape and dtype imply. The
    model is built on the meta device: shapes only, no memory."""
    try:
        with torch.device("meta"):
            shapes = {k: list(v.shape) for k, v in AttentionLSTM(config).state_dict().items()}
    except (ValueError, TypeError, RuntimeError) as e:  # a config torch refuses to build
        raise CheckpointError(f"{source}: does not describe a valid model ({e})") from e
    if set(declared) != set(shapes):
        raise CheckpointError(f"{source}: its tensors are not those of the model its config names")
    for name, (dtype, shape, (start, end)) in declared.items():
        if shape != shapes[name] or dtype not in DTYPE_BYTES:
            raise CheckpointError(
                f"{source}: tensor {name} is {dtype} {shape}; its config needs "
                f"{shapes[name]} in {', '.join(DTYPE_BYTES)}"
            )
        if end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{source}: tensor {name} has the wrong byte length")


def _config_json(model: AttentionLSTM) -> str:
    return json.dumps(model.config.to_dict(), sort_keys=True)


def _version(config_json: str, tensors: dict[str, torch.Tensor]) -> str:
    return _digest({"config": config_json}, tensors)[:VERSION_HEX]


def _tensors(model: AttentionLSTM) -> dict[str, torch.Tensor]:
    """The weights as stored: float32 (a float64 model's were stored as such, loaded into
    float32 and given another version; a bfloat16 model's could not be stored)."""
    state = model.state_dict().items()
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state}


def _digest(header: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(header, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
