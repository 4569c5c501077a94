"""Checkpoints: safetensors weights plus config and metadata, with a content hash.

The file is a plain safetensors file (no pickle, so loading cannot run code). Its
header metadata carries the format version, the model config, the training
metadata and ``sha256``: a hash over everything else in the file (metadata and every
tensor's name, dtype, shape and bytes). Loading recomputes it, so a flipped byte
anywhere is refused. The model's version is a second hash, over the config and the
weights only: the same model trained twice gets the same version, whatever its
metadata (timings) says.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from attnlstm.model import AttentionLSTM, ModelConfig

FORMAT = "attnlstm-checkpoint"
FORMAT_VERSION = 1
VERSION_HEX = 16  # hex digits of the content hash used as the model version


class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt, tampered with or of an unknown format."""


@dataclass(frozen=True)
class Checkpoint:
    model: AttentionLSTM
    version: str  # content hash prefix; names the model in every forecast
    meta: dict[str, Any] = field(default_factory=dict)  # training metadata

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def dumps(model: AttentionLSTM, meta: dict[str, Any] | None = None) -> tuple[bytes, str]:
    """The checkpoint as bytes, and its version."""
    tensors, config = _tensors(model), _config_json(model)
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": config,
        "meta": json.dumps(meta or {}, sort_keys=True),
    }
    data = st_save(tensors, metadata={**header, "sha256": _digest(header, tensors)})
    return data, _version(config, tensors)


def version_of(model: AttentionLSTM) -> str:
    """The model's version: a hash of its config and weights, nothing else."""
    return _version(_config_json(model), _tensors(model))


def save(path: str | Path, model: AttentionLSTM, meta: dict[str, Any] | None = None) -> str:
    """Write atomically (temp file in the same folder, fsync, rename); return the version."""
    data, version = dumps(model, meta)
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def loads(data: bytes, *, source: str = "checkpoint") -> Checkpoint:
    """Rebuild the model from checkpoint bytes, refusing anything that does not verify."""
    header = _header(data, source)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{source}: unreadable tensors ({e})") from e
    expected = header.pop("sha256", None)
    if expected != _digest(header, tensors):
        raise CheckpointError(f"{source}: content hash mismatch, the file is corrupt or altered")
    if header.get("format") != FORMAT or header.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{source}: unsupported format {header.get('format')!r} "
            f"version {header.get('format_version')!r} (this build reads version {FORMAT_VERSION})"
        )
    try:
        config = ModelConfig.from_dict(json.loads(header["config"]))
        meta = json.loads(header["meta"])
        model = AttentionLSTM(config)
        model.load_state_dict(tensors, strict=True)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{source}: does not describe a valid model ({e})") from e
    model.eval()
    return Checkpoint(model=model, version=_version(header["config"], tensors), meta=meta)


def load(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    return loads(data, source=str(path))


def open_checkpoint(path: str | Path) -> Checkpoint:
    """:func:`load`, with a hint of how to make one when there is no file at ``path``."""
    if not Path(path).exists():
        raise CheckpointError(f"no model at {path}: train one with: attnlstm train --out PATH")
    return load(path)


def _header(data: bytes, source: str) -> dict[str, str]:
    """The safetensors header's metadata, checked for shape before any tensor is read."""
    if len(data) < 8:
        raise CheckpointError(f"{source}: not a safetensors checkpoint (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise CheckpointError(f"{source}: not a safetensors checkpoint (bad header length)")
    try:
        parsed = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: not a safetensors checkpoint (bad header)") from e
    meta = parsed.get("__metadata__") if isinstance(parsed, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{source}: not an attnlstm checkpoint (no valid metadata)")
    return dict(meta)


def _config_json(model: AttentionLSTM) -> str:
    return json.dumps(model.config.to_dict(), sort_keys=True)


def _version(config_json: str, tensors: dict[str, torch.Tensor]) -> str:
    return _digest({"config": config_json}, tensors)[:VERSION_HEX]


def _tensors(model: AttentionLSTM) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _digest(header: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(header, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
