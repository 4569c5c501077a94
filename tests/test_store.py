"""The signed model store: a keyed worker serves only what its key signed, and which
model serves when a worker starts with a model file and the store already serves one."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import secrets
from pathlib import Path
from typing import cast

import pytest
import redis
import torch
from safetensors.torch import save as st_save

from attnlstm.checkpoint import (
    VERSION_HEX,
    Checkpoint,
    CheckpointError,
    _digest,
    dumps,
    load,
    loads,
    save,
    version_of,
)
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.synthetic import sine_steps
from attnlstm.train import new_model
from tests.conftest import CLI
from tests.helpers import (
    WorkerThread,
    burst_cli,
    entries,
    events,
    fill,
    kill_named,
    new_worker,
    other_model,
    settings_for,
    wait_for,
    worker_cmd,
)
from worker.cli import main, offline
from worker.keys import Keys
from worker.lease import ensure_library
from worker.metrics import Metrics
from worker.online import store as store_module
from worker.online.store import MODEL_BYTES_MAX, ModelStore
from worker.online.tuner import Tuner

UNAUTHENTICATED = "the model store is unauthenticated"


@pytest.fixture(autouse=True)
def _worker_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="attnlstm")


@pytest.fixture(autouse=True)
def _functions(redis_client: redis.Redis) -> None:
    """The function library loaded, as a worker loads it at start: the store points
    every worker at a version, and drops old ones, on the server."""
    ensure_library(redis_client)


def key_file(folder: Path, name: str = "model-key") -> Path:
    """A model key as deploy/make-secrets.sh writes one."""
    path = folder / name
    path.write_text(secrets.token_hex(32) + "\n")
    return path


def forecast_versions(client: redis.Redis, keys: Keys) -> dict[bytes, str]:
    """The model version of each forecast, by its input entry id."""
    return {f[b"src"]: f[b"model"].decode() for _, f in entries(client, keys.output)}


def test_a_keyed_store_signs_what_it_stores_and_refuses_anything_else(
    redis_client: redis.Redis, keys: Keys, trained_sines: AttentionLSTM, tmp_path: Path
) -> None:
    """The signature is checked before a byte is parsed, and a version pruned takes its
    signature with it."""
    key, other = (key_file(tmp_path, n).read_bytes().strip() for n in ("a", "b"))
    keyed = ModelStore(redis_client, keys, keep=1, source="test", key=key)
    blob, version = dumps(trained_sines)
    keyed.put(blob, version)
    assert keyed.get(version).version == version
    assert ModelStore(redis_client, keys, keep=1, source="test").get(version).version == version
    with pytest.raises(CheckpointError, match="bad signature"):
        ModelStore(redis_client, keys, keep=1, source="test", key=other).get(version)
    redis_client.set(keys.model(version), b"not a checkpoint at all")  # signature kept
    with pytest.raises(CheckpointError, match="bad signature"):  # not "not a safetensors"
        keyed.get(version)
    ModelStore(redis_client, keys, keep=1, source="test").put(blob, version)  # no key
    with pytest.raises(CheckpointError, match="is not signed"):
        keyed.get(version)
    keyed.put(blob, version)
    newer_blob, newer = dumps(other_model(trained_sines, 0.05))
    keyed.put(newer_blob, newer)  # keep=1, nothing serving: the first is dropped
    assert redis_client.exists(keys.model(version), keys.model_signature(version)) == 0
    assert redis_client.exists(keys.model(newer), keys.model_signature(newer)) == 2


def test_a_model_over_the_cap_is_neither_stored_nor_fetched(
    redis_client: redis.Redis,
    keys: Keys,
    trained_sines: AttentionLSTM,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A value over MODEL_BYTES_MAX under a version's key (Redis takes up to 512 MB) is
    refused by its length, before a byte of it crosses the network; the store itself
    stores nothing over the cap."""
    store = ModelStore(redis_client, keys, keep=5, source="test")
    blob, version = dumps(trained_sines)
    with pytest.raises(CheckpointError, match="over the model store's cap"):
        store.put(blob.ljust(MODEL_BYTES_MAX + 1, b" "), version)
    assert redis_client.exists(keys.model(version), keys.versions) == 0
    redis_client.set(keys.model(version), blob.ljust(MODEL_BYTES_MAX + 1, b" "))
    sent = cast(int, redis_client.info("stats")["total_net_output_bytes"])
    with pytest.raises(CheckpointError, match=f"takes {MODEL_BYTES_MAX + 1:,} bytes"):
        store.get(version)
    assert cast(int, redis_client.info("stats")["total_net_output_bytes"]) - sent < 2**20
    redis_client.set(keys.model(version), blob)  # under the cap: read as before
    assert store.get(version).version == version
    monkeypatch.setattr(store_module, "MODEL_BYTES_MAX", len(blob))  # at the cap: stored,
    store.put(blob, version)
    assert store.get(version).version == version  # and read to its last byte
    monkeypatch.setattr(store_module, "MODEL_BYTES_MAX", len(blob) - 1)
    with pytest.raises(CheckpointError, match=f"takes {len(blob):,} bytes, over"):
        store.put(blob, version)
    with pytest.raises(CheckpointError, match=f"takes {len(blob):,} bytes, over"):
        store.get(version)


def test_a_model_file_over_the_cap_stops_the_worker_at_start_and_train_says_so(
    redis_url: str,
    redis_client: redis.Redis,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cap at 1,000 bytes, where the sines' model takes 7 KB: a worker given it as
    its file stops at start with one line, before it takes a lease or stores anything
    (it used to store it and fail there, holding its lease); `models promote` refuses it,
    and `train` notes it as it saves one."""
    monkeypatch.setattr(store_module, "MODEL_BYTES_MAX", 1_000)
    path = tmp_path / "model.safetensors"
    version = save(path, trained_sines)
    assert main(worker_cmd(path, redis_url, keys, "--burst")[len(CLI) :]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"model {version} ({path}) takes " in err[0]
    assert "bytes, over the model store's cap of 1,000: no worker can serve it" in err[0]
    assert redis_client.exists(keys.lease, keys.versions, keys.serving) == 0
    assert main(["models", "promote", str(path), "--redis-url", redis_url,
                 "--models-stream", keys.models]) == 1  # fmt: skip
    assert f"model {version} takes " in capsys.readouterr().err
    assert redis_client.exists(keys.versions, keys.serving) == 0
    out = tmp_path / "trained.safetensors"
    train = ["train", "--data", "sine", "--epochs", "1", "--out", str(out)]
    assert main(train) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "store's cap" in line]
    assert len(notes) == 1  # said once, before the training
    assert notes[0].startswith("attnlstm train: note: the model, untrained, takes ")
    assert out.exists()  # noted, not refused: evaluate and plot take it
    # Under the cap untrained, over it with the training's figures: noted as it is saved.
    monkeypatch.setattr(store_module, "MODEL_BYTES_MAX", out.stat().st_size - 100)
    assert main(train) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "store's cap" in line]
    assert len(notes) == 1
    assert notes[0].startswith(f"attnlstm train: note: model {load(out).version} takes ")


@pytest.mark.parametrize("name", ["sparse", "/dev/zero"])
def test_a_model_file_past_twice_the_cap_is_not_read_whole(
    name: str,
    redis_url: str,
    redis_client: redis.Redis,
    keys: Keys,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`models promote` and the worker read the file whole before anything checked it:
    a sparse 1 GB file took 1.3 GB of memory to be called a bad header, and /dev/zero
    was read until memory ran out (now a device is not read at all)."""
    path = Path(name) if name.startswith("/") else tmp_path / "model.safetensors"
    limit = f"cannot read checkpoint {path}: it is no regular file (a device, pipe or socket)"
    if name == "sparse":
        with path.open("wb") as f:
            f.truncate(2**30)
        limit = f"checkpoint {path} is larger than {2 * MODEL_BYTES_MAX:,} bytes: not read"
    flags = ["--redis-url", redis_url, "--models-stream", keys.models]
    assert main(["models", "promote", str(path), *flags]) == 1
    assert limit in capsys.readouterr().err
    assert main(worker_cmd(path, redis_url, keys, "--burst")[len(CLI) :]) == 1
    assert limit in capsys.readouterr().err
    assert redis_client.exists(keys.lease, keys.versions, keys.serving) == 0


def test_train_says_a_model_is_over_the_cap_before_it_trains(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The note comes before the training: here the training stops, and it was said."""
    monkeypatch.setattr(store_module, "MODEL_BYTES_MAX", 1_000)

    def stopped(*args: object, **kwargs: object) -> None:
        raise ValueError("training stopped")

    monkeypatch.setattr(offline, "train_model", stopped)
    out = tmp_path / "model.safetensors"
    assert main(["train", "--data", "sine", "--epochs", "1", "--out", str(out)]) == 1
    note, stop = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        r"attnlstm train: note: the model, untrained, takes [\d,]+ bytes, over the model "
        r"store's cap of 1,000: no worker can serve it; train a smaller one \(--hidden, "
        r"--layers, --window, --horizon\)",
        note,
    )
    assert stop == "attnlstm train: error: training stopped"
    assert not out.exists()


@pytest.mark.parametrize("planted", ["unsigned", "another key", "oversized"])
def test_a_model_planted_in_the_store_is_never_served_by_a_keyed_worker(
    planted: str,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the worker's own Redis rights, an attacker stores a model with a planted
    head bias and a `promoted` event: the worker refuses it and serves what it served;
    so does a worker started after it. Oversized: a value over the store's cap under a
    version's key, which the worker does not fetch."""
    first = version_of(trained_sines)
    settings = settings_for(redis_url, keys, block_ms=100, model_key_file=key_file(tmp_path))
    attacker_key = key_file(tmp_path, "attacker").read_bytes() if planted == "another key" else None
    attacker = ModelStore(redis_client, keys, keep=5, source="attacker", key=attacker_key)
    blob, version = dumps(other_model(trained_sines, 100.0))
    values = sine_steps(5, 60, seed=11)
    with WorkerThread(new_worker(settings, trained_sines)) as running:
        fill(redis_client, keys.input, values[:30])
        running.wait_for(lambda: redis_client.xlen(keys.output) >= 5 * 11)
        if planted == "oversized":
            redis_client.set(keys.model(version), blob.ljust(MODEL_BYTES_MAX + 1, b" "))
        else:
            attacker.put(blob, version)
        attacker.set_serving(version, "promoted")
        after = fill(redis_client, keys.input, values[30:])
        running.wait_for(lambda: redis_client.xlen(keys.output) >= 5 * 41)
        running.wait_for(
            lambda: any(e["event"] == "refused" for e in events(redis_client, keys.models))
        )
    versions = forecast_versions(redis_client, keys)
    assert {versions[i] for i in after} == {first}
    refused = [e for e in events(redis_client, keys.models) if e["event"] == "refused"]
    reason = {"unsigned": "is not signed", "another key": "bad signature"}.get(
        planted, "over the model store's cap"
    )
    assert [(e["version"], reason in e["reason"]) for e in refused] == [(version, True)]
    assert f"refused model {version}" in caplog.text
    assert UNAUTHENTICATED not in caplog.text

    fill(redis_client, keys.input, sine_steps(5, 5, seed=12))  # a restart: still refused
    new_worker(settings, trained_sines, burst=True).run()
    assert set(list(forecast_versions(redis_client, keys).values())[-25:]) == {first}
    assert [e["event"] for e in events(redis_client, keys.models)][-1] == "refused"
    assert redis_client.get(keys.serving) == version.encode()  # refused, not overwritten


def test_a_second_worker_with_another_model_file_serves_the_stores_version(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_for(redis_url, keys, model_key_file=key_file(tmp_path))
    fill(redis_client, keys.input, sine_steps(3, 25, seed=13))
    new_worker(settings, trained_sines, burst=True).run()  # the first: its file is promoted
    first = version_of(trained_sines)
    assert redis_client.get(keys.serving) == first.encode()
    second_file = other_model(trained_sines, 1.0)
    fill(redis_client, keys.input, sine_steps(3, 10, seed=14))
    new_worker(settings, second_file, burst=True).run()
    assert set(forecast_versions(redis_client, keys).values()) == {first}
    assert [e["event"] for e in events(redis_client, keys.models)] == [
        "promoted"
    ]  # the first's only
    assert redis_client.get(keys.serving) == first.encode()
    assert f"(model {version_of(second_file)}) is not served: the store serves {first}" in (
        caplog.text
    )


def test_a_restart_with_the_original_file_keeps_the_version_promoted_since(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    """The file's version is pruned from the kept list by later fine-tunes; a restart
    with it used to promote it again, silently undoing the promotion."""
    settings = settings_for(redis_url, keys, keep_models=2, model_key_file=key_file(tmp_path))
    fill(redis_client, keys.input, sine_steps(3, 25, seed=15))
    new_worker(settings, trained_sines, burst=True).run()
    store = ModelStore(redis_client, keys, keep=2, source="finetune", key=settings.model_key())
    tuned_blob, tuned = dumps(other_model(trained_sines, 0.01))  # as a fine-tune promotes
    store.put(tuned_blob, tuned)
    store.set_serving(tuned, "promoted")
    for shift in (0.02, 0.03):  # rejected candidates: the file's version is dropped
        store.put(*dumps(other_model(trained_sines, shift)))
    assert version_of(trained_sines) not in store.versions()
    before = len(events(redis_client, keys.models))
    restart = fill(redis_client, keys.input, sine_steps(3, 10, seed=16))
    new_worker(settings, trained_sines, burst=True).run()
    versions = forecast_versions(redis_client, keys)
    assert {versions[i] for i in restart} == {tuned}
    assert redis_client.get(keys.serving) == tuned.encode()
    assert len(events(redis_client, keys.models)) == before  # nothing promoted at the restart


def test_without_a_key_the_store_is_unauthenticated_as_before(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A warning, once, at start; an unsigned stored model is served as it always was."""
    blob, version = dumps(other_model(trained_sines, 0.05))
    store = ModelStore(redis_client, keys, keep=5, source="another-worker")
    store.put(blob, version)
    store.set_serving(version, "promoted")
    fill(redis_client, keys.input, sine_steps(3, 25, seed=17))
    new_worker(settings_for(redis_url, keys), None, burst=True).run()
    assert set(forecast_versions(redis_client, keys).values()) == {version}
    warnings = [r for r in caplog.records if UNAUTHENTICATED in r.getMessage()]
    assert [r.levelname for r in warnings] == ["WARNING"]


def test_a_signature_key_of_another_type_stops_no_keyless_worker_nor_the_cli(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    """A list planted where a stored version's signature goes (anyone with the worker's
    password can): counting signatures raised WRONGTYPE, which stopped every worker
    without a key at start and at each re-sync, and `models promote` and `rollback`."""
    store = ModelStore(redis_client, keys, keep=5, source="another-worker")
    old_blob, old = dumps(other_model(trained_sines, 0.05))
    serving_blob, serving = dumps(trained_sines)
    store.put(old_blob, old)
    store.put(serving_blob, serving)
    store.set_serving(serving, "promoted")
    redis_client.rpush(keys.model_signature(old), "x")
    assert store.signatures() == ([], [serving, old])
    store.check_key()  # no key, and no version signed: nothing to refuse
    with pytest.raises(CheckpointError, match=f"stored model {old} is not a model: WRONGTYPE"):
        store.get(old)  # that version is refused where it is read, as before
    fill(redis_client, keys.input, sine_steps(3, 25, seed=17))
    new_worker(settings_for(redis_url, keys), None, burst=True).run()
    assert set(forecast_versions(redis_client, keys).values()) == {serving}
    path = tmp_path / "m.safetensors"
    save(path, other_model(trained_sines, 0.1))
    flags = ["--redis-url", redis_url, "--models-stream", keys.models]
    assert main(["models", "promote", str(path), *flags]) == 0
    assert main(["models", "rollback", serving, *flags]) == 0


def test_a_promotion_refused_for_its_event_moves_no_worker(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The events' key of another type: `models promote` said refused, but the serving
    pointer had moved (the function set it before the XADD that failed, and Redis keeps
    a function's writes before an error), with no event for the workers to read."""
    redis_client.set(keys.models, "not a stream")
    path = tmp_path / "m.safetensors"
    save(path, trained_sines)
    flags = ["--redis-url", redis_url, "--models-stream", keys.models]
    assert main(["models", "promote", str(path), *flags]) == 1
    assert "WRONGTYPE" in capsys.readouterr().err
    assert redis_client.get(keys.serving) is None
    assert redis_client.get(keys.models) == b"not a stream"


def test_promoting_a_model_of_another_shape_says_the_workers_refuse_it(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Window 10 and 3 steps where 20 and 1 serve: promoted (or rolled back to) without a
    word, while every worker refused it and stopped fine-tuning."""
    flags = ["--redis-url", redis_url, "--models-stream", keys.models]
    same, other = tmp_path / "same.safetensors", tmp_path / "other.safetensors"
    save(same, other_model(trained_sines, 0.05))
    shape = dataclasses.replace(trained_sines.config, window=10, horizon=3)
    other_version = save(other, AttentionLSTM(shape))
    served = save(tmp_path / "served.safetensors", trained_sines)
    assert main(["models", "promote", str(tmp_path / "served.safetensors"), *flags]) == 0
    assert main(["models", "promote", str(same), *flags]) == 0
    assert "note" not in capsys.readouterr().err  # the same shape
    assert main(["models", "rollback", served, *flags]) == 0
    assert main(["models", "promote", str(other), *flags]) == 0
    assert capsys.readouterr().err.strip() == (
        f"attnlstm models: note: model {other_version} reads 10 values (window 10) and "
        f"forecasts 3, where {served}, serving before, reads 20 values (window 20) and "
        "forecasts 1: workers that run another shape refuse it (a `refused` event) and serve "
        "on with theirs; restart them to serve it (those with a model file of their own: "
        "without it)"
    )
    assert redis_client.get(keys.serving) == other_version.encode()  # noted, not refused
    assert main(["models", "rollback", served, *flags]) == 0  # and back: noted too
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith(
            f"attnlstm models: note: model {served} reads 20 values (window 20) and forecasts 1, "
            f"where {other_version}, serving before, reads 10 values (window 10) and forecasts 3: "
        )
    )


def test_after_a_refusal_the_shape_note_goes_by_what_the_refusing_workers_run(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A running worker refuses a model of another shape, its `refused` event saying the
    shape it runs. A second model of the refused one's shape was promoted without a note
    (the shape of the one serving before was the same), and the rollback to the served
    one told the operator to restart workers that served on with it (a review)."""
    flags = ["--redis-url", redis_url, "--models-stream", keys.models]
    shape = dataclasses.replace(trained_sines.config, window=10, horizon=3)
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    first_version = save(first, AttentionLSTM(shape))
    second_version = save(second, other_model(AttentionLSTM(shape), 0.05))
    served = version_of(trained_sines)
    with WorkerThread(new_worker(settings_for(redis_url, keys, block_ms=100), trained_sines)):
        wait_for(lambda: redis_client.get(keys.serving) == served.encode())
        assert main(["models", "promote", str(first), *flags]) == 0
        wait_for(lambda: [e for e in events(redis_client, keys.models) if e["event"] == "refused"])
        refused = [e for e in events(redis_client, keys.models) if e["event"] == "refused"]
        assert [(e["version"], e["runs"]) for e in refused] == [(first_version, "[20, 20, 1]")]
        capsys.readouterr()
        assert main(["models", "promote", str(second), *flags]) == 0
        assert capsys.readouterr().err.strip() == (
            f"attnlstm models: note: model {second_version} reads 10 values (window 10) and "
            f"forecasts 3, where the workers that refused {first_version} run models that "
            "read 20 values (window 20) and forecast 1: workers that run another shape refuse "
            "it (a `refused` event) and serve on with theirs; restart them to serve it (those "
            "with a model file of their own: without it)"
        )
        wait_for(lambda: len(events(redis_client, keys.models)) == 5)  # its refusal too
        # Back to the shape the refusing workers run: the note names only the shape of
        # the one serving before, which workers started since would run.
        assert main(["models", "rollback", served, *flags]) == 0
        assert (
            capsys.readouterr()
            .err.strip()
            .startswith(
                f"attnlstm models: note: model {served} reads 20 values (window 20) and forecasts "
                f"1, where {second_version}, serving before, reads 10 values (window 10) and "
                "forecasts 3: workers that run another shape refuse it"
            )
        )
    # A `refused` event's `runs` that is no shape, or nested past what json reads (it was
    # a RecursionError, and the command a traceback), is passed over.
    planted = [
        "[" * 100_000 + "]" * 100_000,
        "[1, 2]",
        "nope",
        '["1", 2, 3]',
        "[-1, 0, 0]",
        "[99999999999, 1, 1]",
        "[1, 20, 1]",  # a window longer than the values read
        "[10, 10, 3]".encode("utf-16"),  # json.loads reads UTF-16 bytes
    ]
    store = ModelStore(redis_client, keys, keep=5, source="test")
    for runs in planted:
        store.event(served, "refused", reason="planted", runs=runs)
        assert main(["models", "rollback", served, *flags]) == 0
    assert "refuse it" not in capsys.readouterr().err  # (each says it served already)


def test_a_refusal_a_thousand_events_back_still_counts_in_the_shape_note(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The events are read back to the serving version's switch: the newest 1,000 alone
    missed a refusal that the fine-tunes' `trained` and `rejected` events had pushed
    further back."""
    flags = ["--redis-url", redis_url, "--models-stream", keys.models]
    served = save(tmp_path / "served.safetensors", trained_sines)
    assert main(["models", "promote", str(tmp_path / "served.safetensors"), *flags]) == 0
    store = ModelStore(redis_client, keys, keep=5, source="test")
    store.event(served, "refused", reason="planted", runs="[10, 10, 3]")
    pipe = redis_client.pipeline(transaction=False)
    for _ in range(2_500):
        pipe.xadd(keys.models, {"version": "0" * 16, "event": "trained", "by": "w", "ts": "1"})
    pipe.execute()
    other = tmp_path / "other.safetensors"
    save(other, other_model(trained_sines, 0.05))
    capsys.readouterr()
    assert main(["models", "promote", str(other), *flags]) == 0
    assert (
        f"where the workers that refused {served} run models that read 10 values (window 10) "
        "and forecast 3: " in capsys.readouterr().err
    )


def test_a_worker_whose_file_serves_alone_at_its_start_says_so(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Started with its own file while the store serves a version it refuses, a worker
    serves its file: the log said the file was "not served" and never that fine-tunes
    stop (a review)."""
    caplog.set_level(logging.WARNING, logger="attnlstm.worker")
    store = ModelStore(redis_client, keys, keep=5, source="test")
    other = AttentionLSTM(dataclasses.replace(trained_sines.config, window=10, horizon=3))
    blob, version = dumps(other, {})
    store.put(blob, version)
    store.set_serving(version, "promoted", reason="by hand")

    def fits(checkpoint: Checkpoint) -> None:
        if checkpoint.config.window != trained_sines.config.window:
            raise ValueError("the worker runs 20 (window 20) and 1")

    settings = settings_for(redis_url, keys, finetune_interval_s=60.0)
    tuner = Tuner(redis_client, settings=settings, store=store, metrics=Metrics(), fits=fits)
    file_model = loads(dumps(trained_sines, {})[0])
    assert cast(Checkpoint, tuner.start(file_model)).version == file_model.version
    assert "is not served" not in caplog.text
    said = [r.getMessage() for r in caplog.records if "here alone" in r.getMessage()]
    assert said == [
        f"serving --model PATH (model {file_model.version}) here alone: the store serves "
        f"{version}, refused above; no fine-tunes while it does. Serve one this worker can: "
        "attnlstm models rollback VERSION, or attnlstm models promote PATH"
    ]


def test_promoting_the_serving_model_again_says_so_and_mends_it_for_the_workers(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Promoted (or rolled back to) again, the serving version gets its event still: the
    event makes the workers load it again, which mends one they refused, stored damaged
    (dropping the event left them serving the version before: a review). The note says
    it served already, which the report alone did not."""
    flags = ["--redis-url", redis_url, "--models-stream", keys.models]
    path = tmp_path / "model.safetensors"
    version = save(path, trained_sines)
    assert main(["models", "promote", str(path), *flags]) == 0
    redis_client.set(keys.model(version), b"damaged")  # the workers refuse it
    capsys.readouterr()
    assert main(["models", "promote", str(path), *flags]) == 0
    assert main(["models", "rollback", version, *flags]) == 0
    note = (
        f"attnlstm models: note: model {version} served already: the workers that serve "
        "it serve on, and those that refused it try it again"
    )
    assert capsys.readouterr().err.splitlines() == [note, note]
    assert [e["event"] for e in events(redis_client, keys.models)] == [
        "promoted",
        "promoted",
        "rolled_back",
    ]
    assert ModelStore(redis_client, keys, keep=5, source="t").get(version).version == version


def test_the_models_cli_promotes_a_file_signed_and_rolls_back_only_to_signed_ones(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = key_file(tmp_path)
    path = tmp_path / "model.safetensors"
    version = save(path, trained_sines)
    flags = ["--redis-url", redis_url, "--models-stream", keys.models, "--json"]
    assert main(["models", "promote", str(path), "--model-key-file", str(key), *flags]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report == {"serving": version, "previous": None, "signed": True}
    keyed = ModelStore(redis_client, keys, keep=5, source="test", key=key.read_bytes().strip())
    assert keyed.get(version).version == version
    blob, unsigned = dumps(other_model(trained_sines, 0.05))
    ModelStore(redis_client, keys, keep=5, source="test").put(blob, unsigned)
    assert main(["models", "rollback", unsigned, "--model-key-file", str(key), *flags]) == 1
    assert f"stored model {unsigned} is not signed" in capsys.readouterr().err
    assert redis_client.get(keys.serving) == version.encode()


def test_a_worker_or_the_cli_without_the_key_refuses_a_signed_store(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Its peers serve only what the key signed; without the key it would serve (or
    store) what anyone wrote: it stops at start, before it takes the lease, with what to
    fix. The command line says the same in one line."""
    keyed = settings_for(redis_url, keys, model_key_file=key_file(tmp_path))
    fill(redis_client, keys.input, sine_steps(3, 25, seed=18))
    new_worker(keyed, trained_sines, burst=True).run()
    published = redis_client.xlen(keys.output)
    fill(redis_client, keys.input, sine_steps(3, 5, seed=19))
    keyless = new_worker(settings_for(redis_url, keys), other_model(trained_sines, 1.0))
    with pytest.raises(ValueError, match=r"1 of the 1 models in the store \(.*\) are signed"):
        keyless.run()
    assert redis_client.xlen(keys.output) == published
    assert redis_client.get(keys.lease) is None
    path = tmp_path / "other.safetensors"
    save(path, other_model(trained_sines, 1.0))
    flags = ["--redis-url", redis_url, "--models-stream", keys.models]
    assert main(["models", "promote", str(path), *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "give it the key the other workers use" in err[0]
    assert redis_client.get(keys.serving) == version_of(trained_sines).encode()


def _of_an_older_release(model: AttentionLSTM) -> bytes:
    """``model`` as a checkpoint written before its config had the fields ``lags``,
    ``linear``, ``period`` and ``profile_weeks`` (its own values are their defaults)."""
    header = {
        "format": "attnlstm-checkpoint",
        "format_version": "1",
        "config": _older_config(model),
        "meta": "{}",
    }
    return st_save(_weights(model), metadata={**header, "sha256": _digest(header, _weights(model))})


def _older_config(model: AttentionLSTM) -> str:
    """The config text of :func:`_of_an_older_release`'s checkpoint."""
    config = model.config.to_dict()
    gone = ("lags", "linear", "period", "profile_weeks")
    return json.dumps(
        {name: value for name, value in config.items() if name not in gone}, sort_keys=True
    )


def _weights(model: AttentionLSTM) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def test_a_checkpoint_of_an_older_release_is_stored_as_the_version_it_loads_as(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    stream_prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A file of an older release loads with its config's new fields at their defaults.
    Its version was a hash of the file's own config text, which the bytes stored (this
    release's) do not have: each worker refused the stored model as another's, and the
    fleet stopped at the promoted file ("stored model A holds model B")."""
    config = ModelConfig(window=8, lags=(), linear=False, hidden_size=4, attention_size=4)
    model = new_model(config, seed=2)
    path = tmp_path / "old.safetensors"
    path.write_bytes(_of_an_older_release(model))
    version = load(path).version
    assert version == version_of(model)  # as the model would be written now
    flags = ["--redis-url", redis_url, "--models-stream", keys.models, "--json"]
    assert main(["models", "promote", str(path), *flags]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["serving"] == version
    stored = ModelStore(redis_client, keys, keep=5, source="test").get(version)
    assert stored.version == version
    # A worker's first start on an empty store stores its file as the promote does.
    fresh = Keys.prefixed(f"{stream_prefix}fresh:")
    fill(redis_client, fresh.input, sine_steps(2, 12, seed=4))
    burst_cli(worker_cmd(path, redis_url, fresh), tmp_path)
    assert redis_client.get(fresh.serving) == version.encode()
    assert ModelStore(redis_client, fresh, keep=5, source="test").get(version).version == version
    assert not [e for e in events(redis_client, fresh.models) if e["event"] == "refused"]


def test_a_model_an_older_release_stored_serves_under_the_version_it_was_stored_as(
    redis_client: redis.Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """Releases before 2026-12-06 named a stored model by a hash of its file's own config
    text; this one names a loaded model by its config with the fields added since. A
    store an older release filled was "stored model A holds model B" to every upgraded
    worker: with fine-tuning on, one with no model file then acked 2,000 entries of a
    review's upgrade as warming, and forecast none."""
    model = new_model(ModelConfig(window=20, linear=False, hidden_size=4, attention_size=4))
    old = _of_an_older_release(model)
    # As those releases computed it: the file's own config text, and its tensors.
    former = _digest({"config": _older_config(model)}, _weights(model))[:VERSION_HEX]
    assert former != version_of(model)
    store = ModelStore(redis_client, keys, keep=5, source="an older release")
    store.put(old, former)
    store.set_serving(former, "promoted", reason="model file")
    fill(redis_client, keys.input, sine_steps(2, 40, seed=4))
    store_settings = settings_for(redis_url, keys)
    totals = new_worker(store_settings, None, burst=True).run()
    assert (totals["forecasts"], totals["warming"]) == (2 * (40 - 19), 2 * 19)
    assert set(forecast_versions(redis_client, keys).values()) == {former}
    assert "refused" not in caplog.text
    # A fine-tune's parent, a rollback's target: the store's name for it goes on.
    served = store.get(former)
    assert (served.version, redis_client.get(keys.serving)) == (former, former.encode())
    # A worker given the older release's file as its model serves the store's name for it,
    # without a warning that its file is not what serves.
    tuner = Tuner(
        redis_client, settings=store_settings, store=store, metrics=Metrics(), fits=lambda _: None
    )
    file_model = loads(old)
    assert (file_model.version, file_model.former_version) == (version_of(model), former)
    assert cast(Checkpoint, tuner.start(file_model)).version == former
    assert "is not served" not in caplog.text
    # Served here as the store loses its keys (a Redis restarted without persistence), it
    # is stored again under the version of the bytes stored: under the former one, which
    # this release's bytes do not have, no worker would load it.
    redis_client.delete(keys.serving, keys.versions, keys.model(former))
    tuner = Tuner(
        redis_client, settings=store_settings, store=store, metrics=Metrics(), fits=lambda _: None
    )
    assert tuner.start(served) is not None
    assert tuner.version == version_of(model)
    assert redis_client.get(keys.serving) == version_of(model).encode()
    assert store.get(version_of(model)).version == version_of(model)


def test_of_two_workers_starting_on_an_empty_store_one_promotes_its_file(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both read "nothing serving"; the first promotes its file; the second's promotion
    finds a version there and it serves that one, not its own file."""
    first = version_of(trained_sines)
    settings = settings_for(redis_url, keys)
    fill(redis_client, keys.input, sine_steps(3, 25, seed=20))
    new_worker(settings, trained_sines, burst=True).run()
    looks = [None]  # the second worker's first look: before the first's promotion

    def serving(store: ModelStore) -> str | None:
        return looks.pop() if looks else cast(bytes, redis_client.get(keys.serving)).decode()

    monkeypatch.setattr(ModelStore, "serving", serving)
    fill(redis_client, keys.input, sine_steps(3, 10, seed=21))
    new_worker(settings, other_model(trained_sines, 1.0), burst=True).run()
    assert set(forecast_versions(redis_client, keys).values()) == {first}
    assert [e["event"] for e in events(redis_client, keys.models)] == ["promoted"]
    assert redis_client.get(keys.serving) == first.encode()


def test_a_rollback_never_points_the_workers_at_a_version_dropped_since_it_was_read(
    redis_client: redis.Redis, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """`models rollback X` reads X, then points every worker at it; a version stored in
    between pushes X out of the store (keep_models 2). The rollback fails, and the
    version that served still does. It used to succeed: serving named a model no longer
    stored, which every worker refused from then on, and no fine-tune could replace."""
    worker = ModelStore(redis_client, keys, keep=2, source="w")
    cli = ModelStore(redis_client, keys, keep=2, source="cli")
    earlier_blob, earlier = dumps(other_model(trained_sines, 0.05))
    worker.put(earlier_blob, earlier)
    blob, serving = dumps(trained_sines)
    worker.put(blob, serving)
    worker.set_serving(serving, "promoted")
    assert cli.get(earlier).version == earlier  # the rollback has read it
    worker.put(*dumps(other_model(trained_sines, 0.1)))  # it is pushed out
    with pytest.raises(CheckpointError, match=f"model {earlier} is not in the store"):
        cli.set_serving(earlier, "rolled_back", previous=serving)
    assert cli.serving() == serving
    assert [e["event"] for e in events(redis_client, keys.models)] == ["promoted"]


def test_a_keyed_promote_into_a_store_of_unsigned_models_is_refused_unless_asked_for(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The workers that stored unsigned models have no key; a signed one promoted among
    them stops each at its next start. It used to be promoted without a word."""
    blob, unsigned = dumps(trained_sines)
    store = ModelStore(redis_client, keys, keep=5, source="w")
    store.put(blob, unsigned)
    store.set_serving(unsigned, "promoted")
    path = tmp_path / "other.safetensors"
    version = save(path, other_model(trained_sines, 0.05))
    flags = ["--redis-url", redis_url, "--models-stream", keys.models, "--json"]
    promote = ["models", "promote", str(path), "--model-key-file", str(key_file(tmp_path))]
    assert main([*promote, *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"1 of the 1 models in the store ({keys.versions}) are unsigned ({unsigned}:" in err[0]
    assert "then promote with --sign-into-unsigned-store" in err[0]
    assert store.serving() == unsigned
    assert store.versions() == [unsigned]
    assert main([*promote, "--sign-into-unsigned-store", *flags]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report == {"serving": version, "previous": unsigned, "signed": True}


def test_a_running_worker_without_the_key_serves_on_when_a_signed_model_lands(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A keyed promotion into a keyless fleet: the worker serves the signed model, and at
    its next re-sync (a dropped connection) finds the store signed. It logs the error
    and serves on; it used to exit, and so did every worker of the fleet."""
    signed = other_model(trained_sines, 0.05)
    path = tmp_path / "signed.safetensors"
    save(path, signed)
    settings = settings_for(redis_url, keys, block_ms=100)
    values = sine_steps(5, 60, seed=22)
    flags = ["--redis-url", redis_url, "--models-stream", keys.models]
    key = ["--model-key-file", str(key_file(tmp_path)), "--sign-into-unsigned-store"]
    with WorkerThread(new_worker(settings, trained_sines)) as running:
        fill(redis_client, keys.input, values[:30])
        running.wait_for(lambda: redis_client.xlen(keys.output) >= 5 * 11)
        assert main(["models", "promote", str(path), *key, *flags]) == 0
        wait_for(lambda: running.worker.tuner.version == version_of(signed), what="the switch")
        kill_named(redis_client, "test-worker")
        after = fill(redis_client, keys.input, values[30:])
        running.wait_for(lambda: "this worker serves on" in caplog.text)
        running.wait_for(lambda: set(after) <= forecast_versions(redis_client, keys).keys())
    versions = forecast_versions(redis_client, keys)
    assert {versions[i] for i in after} == {version_of(signed)}
    assert caplog.text.count("are signed with a model key, and this process has none") == 1


def test_promoting_a_file_by_hand_prunes_none_of_the_workers_versions(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    """The workers keep 8 versions (ATTNLSTM_KEEP_MODELS=8); the command line cannot
    know it, and used to prune the store to its own default of 5, deleting their
    rollback targets. It prunes nothing: the workers do, at their next promotion."""
    workers = ModelStore(redis_client, keys, keep=8, source="w")
    for k in range(6):
        workers.put(*dumps(other_model(trained_sines, 0.01 * k)))
    kept = workers.versions()
    path = tmp_path / "model.safetensors"
    version = save(path, other_model(trained_sines, 0.5))
    flags = ["--redis-url", redis_url, "--models-stream", keys.models]
    assert main(["models", "promote", str(path), *flags]) == 0
    assert workers.versions() == [version, *kept]
