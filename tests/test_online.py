"""Fine-tuning, the model store, rollback and cold start, with workers on a real server."""

from __future__ import annotations

import copy
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from attnlstm.checkpoint import dumps, load, loads
from attnlstm.model import AttentionLSTM
from tests.conftest import CLI
from tests.helpers import RunningWorker, entries, fill, sine_values, worker_cmd, worker_env
from worker.keys import Keys
from worker.metrics import Metrics
from worker.models import ModelStore
from worker.readback import errors_by_time, read_views
from worker.scoring import Scorer
from worker.settings import Settings
from worker.state import WindowState
from worker.tuner import Tuner


def keys_for(prefix: str) -> Keys:
    return Keys(
        input=f"{prefix}sensors",
        output=f"{prefix}forecasts",
        dead=f"{prefix}sensors:dead",
        models=f"{prefix}models",
    )


def other_model(model: AttentionLSTM, shift: float) -> AttentionLSTM:
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.head.bias.add_(shift)
    return twin


def events(client: redis.Redis, key: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries(client, key)]


def forecast_versions(client: redis.Redis, keys: Keys) -> dict[bytes, str]:
    """The model version of each forecast, by its input entry id."""
    return {f[b"src"]: f[b"model"].decode() for _, f in entries(client, keys.output)}


def test_the_store_keeps_the_last_versions_and_never_drops_the_serving_one(
    redis_client: redis.Redis, stream_prefix: str, trained_sines: AttentionLSTM
) -> None:
    keys = keys_for(stream_prefix)
    store = ModelStore(redis_client, keys, keep=3, source="test")
    versions = []
    for k in range(5):
        blob, version = dumps(other_model(trained_sines, 0.01 * k))
        store.put(blob, version)
        versions.append(version)
        if k == 0:
            store.switch(version, "promoted")
    assert store.versions() == [versions[4], versions[3], versions[2], versions[0]]
    assert store.get(versions[0]).version == versions[0]  # serving: kept
    assert redis_client.get(keys.model(versions[1])) is None  # dropped
    assert [e["event"] for e in events(redis_client, keys.models)] == ["promoted"]


def test_rollback_takes_effect_on_the_next_batch(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    keys = keys_for(stream_prefix)
    first = load(model_file).version
    earlier_blob, earlier = dumps(other_model(trained_sines, 0.05))
    ModelStore(redis_client, keys, keep=5, source="test").put(earlier_blob, earlier)
    values = sine_values(5, 60, seed=6)
    cmd = worker_cmd(model_file, redis_url, stream_prefix, "--block-ms", "100")
    with RunningWorker(cmd, tmp_path) as worker:
        before = fill(redis_client, keys.input, values[:30])
        worker.wait_for(lambda: redis_client.xlen(keys.output) >= 5 * 11)
        flags = ["--redis-url", redis_url, "--models-stream", keys.models, "--json"]
        back = subprocess.run(
            [*CLI, "models", "rollback", earlier, *flags],
            capture_output=True,
            text=True,
            env=worker_env(),
            check=False,
        )
        assert back.returncode == 0, back.stderr
        assert json.loads(back.stdout.splitlines()[-1]) == {"serving": earlier, "previous": first}
        after = fill(redis_client, keys.input, values[30:])
        worker.wait_for(lambda: redis_client.xlen(keys.output) >= 5 * 41)
    versions = forecast_versions(redis_client, keys)
    assert {versions[i] for i in before if i in versions} == {first}
    assert {versions[i] for i in after} == {earlier}  # every batch after the rollback
    listing = subprocess.run(
        [*CLI, "models", "list", *flags],
        capture_output=True,
        text=True,
        env=worker_env(),
        check=False,
    )
    report = json.loads(listing.stdout.splitlines()[-1])
    assert report["serving"] == earlier
    assert [e["event"] for e in report["events"]] == ["promoted", "rolled_back"]  # oldest first


def test_a_tampered_stored_model_is_refused_and_the_serving_one_stays(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    keys = keys_for(stream_prefix)
    first = load(model_file).version
    blob, version = dumps(other_model(trained_sines, 0.05))
    tampered = bytearray(blob)
    tampered[-7] ^= 0x01  # one bit of one weight
    values = sine_values(5, 60, seed=7)
    cmd = worker_cmd(model_file, redis_url, stream_prefix, "--block-ms", "100")
    with RunningWorker(cmd, tmp_path) as worker:
        fill(redis_client, keys.input, values[:30])
        worker.wait_for(lambda: redis_client.xlen(keys.output) >= 5 * 11)
        redis_client.set(keys.model(version), bytes(tampered))
        ModelStore(redis_client, keys, keep=5, source="another-worker").switch(version, "promoted")
        after = fill(redis_client, keys.input, values[30:])
        worker.wait_for(lambda: redis_client.xlen(keys.output) >= 5 * 41)
        assert worker.proc.poll() is None
    versions = forecast_versions(redis_client, keys)
    assert {versions[i] for i in after} == {first}
    refused = [e for e in events(redis_client, keys.models) if e["event"] == "refused"]
    assert len(refused) == 1
    assert refused[0]["version"] == version
    assert "content hash mismatch" in refused[0]["reason"]
    assert f"refused model {version}" in worker.stderr


def test_from_no_model_at_all_forecasts_begin_on_their_own_and_beat_naive(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str, tmp_path: Path
) -> None:
    keys = keys_for(stream_prefix)
    cmd = worker_cmd(Path("unused"), redis_url, stream_prefix, "--finetune-interval-s", "60")
    at = cmd.index("--model")
    del cmd[at : at + 2]  # no model: a cold start
    values = sine_values(20, 200, seed=8)
    with RunningWorker(cmd, tmp_path) as worker:
        fill(redis_client, keys.input, values[:150])  # 3,000 values, no forecasts
        worker.wait_for(lambda: redis_client.exists(keys.serving), timeout=120)
        fill(redis_client, keys.input, values[150:])
        worker.wait_for(lambda: redis_client.xlen(keys.output) >= 20 * 50)
    assert "no model yet: keeping values" in worker.stderr
    kinds = [(e["event"], e["version"]) for e in events(redis_client, keys.models)]
    assert [k for k, _ in kinds] == ["trained", "promoted"]
    assert kinds[0][1] == kinds[1][1]
    assert set(forecast_versions(redis_client, keys).values()) == {kinds[1][1]}
    views = read_views(redis_client, keys)
    model_mae, naive_mae = np.mean([v.mae() for v in views.values()], axis=0)
    assert model_mae < naive_mae / 3


@pytest.mark.parametrize("finetune", [True, False])
def test_after_a_drift_fine_tuning_brings_the_error_back_and_without_it_it_stays(
    finetune: bool,
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    tmp_path: Path,
) -> None:
    """20 noisy sines at 500 entries/s (25 steps a second); at step 200 (8 s in) every
    frequency changes by 1.5-2.5x. Fine-tuning every 4 s on the last 100 values."""
    keys = keys_for(stream_prefix)
    interval = "4" if finetune else "0"
    cmd = worker_cmd(model_file, redis_url, stream_prefix, "--finetune-interval-s", interval)
    cmd += ["--history-len", "100", "--block-ms", "100"]
    replay = [*CLI, "replay", "--redis-url", redis_url, "--stream", keys.input, "--rate", "500"]
    replay += ["--series", "20", "--points", "600", "--noise", "0.05", "--drift-at", "200"]
    with RunningWorker(cmd, tmp_path) as worker:
        subprocess.run(replay, env=worker_env(), check=True, capture_output=True, timeout=120)
        worker.wait_for(lambda: redis_client.xlen(keys.output) >= 20 * 580)
    errors = errors_by_time(read_views(redis_client, keys), bucket_ms=1000.0)
    mae = errors["mae"]
    before, worst, last = float(mae[4:7].mean()), float(mae[8:12].max()), float(mae[-4:].mean())
    promoted = [e for e in events(redis_client, keys.models) if e["event"] == "promoted"]
    assert worst > 1.5 * before  # the drift hurts
    if finetune:
        assert len(promoted) >= 2, worker.stderr  # the model file, then fine-tuned ones
        assert last <= 1.5 * before, (before, worst, last)
    else:
        assert len(promoted) == 1  # the model file only
        assert last > 1.5 * before, (before, worst, last)


def test_one_worker_fine_tunes_at_a_time(
    redis_client: redis.Redis, stream_prefix: str, trained_sines: AttentionLSTM
) -> None:
    """While another worker holds the fine-tune lock, a due fine-tune is skipped."""

    def tuner(consumer: str) -> Tuner:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            models_stream=f"{stream_prefix}models",
            consumer=consumer,
            finetune_interval_s=1e-3,
        )
        store = ModelStore(redis_client, settings.keys, keep=5, source=consumer)
        return Tuner(redis_client, settings=settings, store=store, metrics=Metrics())

    first, second = tuner("first"), tuner("second")
    checkpoint = loads(dumps(trained_sines)[0])
    assert first.start(checkpoint) is not None
    assert second.start(None) is not None  # the store's serving version
    assert first.lock.acquire() == "first"  # first is fine-tuning
    state = WindowState(window=20, length=200, max_series=10)
    state.push(np.zeros(200, dtype=np.int64), np.sin(np.arange(200.0)), gather=False)
    time.sleep(0.01)
    assert second.tick(state, Scorer(halflife_s=30)) is None
    assert not second.running  # due, but not its turn
    first.lock.release()
    assert redis_client.get(second.settings.keys.finetune_lock) is None
