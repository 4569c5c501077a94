"""What each entry of a read becomes, and the commands of its transaction (pure code:
the worker tests run the same through a real server)."""

from __future__ import annotations

import numpy as np

from worker.batch import batch_commands, handled_before, triage
from worker.keys import Keys

GOOD = {b"series": b"s1", b"value": b"1.5"}
BAD = {b"series": b"s1", b"value": b"abc"}


def test_a_live_read_acks_everything_and_dead_letters_the_bad() -> None:
    entries = [(b"5-0", GOOD), (b"6-0", BAD), (b"7-0", None), (b"8-0", {**GOOD, b"ts": b"42"})]
    known: dict[bytes, str] = {}
    batch = triage(entries, pending=None, series_ids=known, last_id=b"4-0", max_deliveries=5)
    assert batch.acks == [b"5-0", b"6-0", b"7-0", b"8-0"]  # the deleted one too
    assert [(i, r) for i, _, r in batch.dead] == [(b"6-0", "value is not a decimal number: 'abc'")]
    assert batch.ids == [b"5-0", b"8-0"]
    assert batch.values == [1.5, 1.5]
    assert batch.ts == [5, 42]  # the entry id's time unless the producer gave one
    assert batch.publish == [True, True]
    assert known == {b"s1": "s1"}


def test_a_resync_replays_what_was_acked_and_handles_what_is_pending() -> None:
    entries = [(b"5-0", GOOD), (b"6-0", BAD), (b"7-0", GOOD), (b"8-0", GOOD), (b"9-0", GOOD)]
    pending = {b"7-0": 1, b"8-0": 6}  # 8-0 has been delivered more than max_deliveries
    batch = triage(entries, pending=pending, series_ids={}, last_id=b"4-0", max_deliveries=5)
    assert batch.acks == [b"7-0", b"8-0"]  # only what is pending
    assert [(i, r) for i, _, r in batch.dead] == [
        (b"8-0", "delivered 6 times without being handled")
    ]  # and not 6-0: it was dead-lettered when it was first handled
    assert batch.ids == [b"5-0", b"7-0", b"9-0"]
    assert batch.publish == [False, True, False]  # acked before: into the windows only


def test_entries_the_state_already_reflects_are_only_acked() -> None:
    entries = [(b"3-0", GOOD), (b"4-0", GOOD), (b"4-1", GOOD)]
    assert handled_before(entries, b"4-0") == 2
    assert handled_before(entries, b"2-5") == 0
    assert handled_before(entries, b"9-0") == 3
    batch = triage(entries, pending=None, series_ids={}, last_id=b"4-0", max_deliveries=5)
    assert batch.acks == [b"3-0", b"4-0", b"4-1"]
    assert batch.ids == [b"4-1"]


def test_the_transaction_holds_the_forecasts_the_dead_letters_and_the_ack() -> None:
    entries = [(b"5-0", GOOD), (b"6-0", BAD), (b"7-0", {b"series": b"s2", b"value": b"2"})]
    batch = triage(entries, pending=None, series_ids={}, last_id=b"0-0", max_deliveries=5)
    keys = Keys(input="in", output="out", dead="in:dead", group="g", models="m")
    yhat = np.array([[2.25]])
    attn = np.array([[0.25, 0.75]])
    rows = np.array([1])  # only the second valid reading had a full window
    commands, receipt = batch_commands(batch, rows, yhat, attn, keys, maxlen=1000, version=b"v1")
    forecast, dead, ack = commands
    assert forecast == (
        b"XADD", b"out", b"MAXLEN", b"~", b"1000", b"*",
        b"series", b"s2", b"src", b"7-0", b"ts", b"7",
        b"yhat", b"[2.25]", b"attn", b"[0.2500000, 0.7500000]", b"model", b"v1",
    )  # fmt: skip
    assert dead == (
        b"XADD", b"in:dead", b"MAXLEN", b"~", b"1000", b"*",
        b"series", b"s1", b"value", b"abc",
        b"src", b"6-0", b"error", b"value is not a decimal number: 'abc'",
    )  # fmt: skip
    assert ack == (b"XACK", b"in", b"g", b"5-0", b"6-0", b"7-0")
    assert receipt.entered_ms.tolist() == [7.0]  # the forecast's input entered at 7 ms
    assert receipt.dead_reasons == ["value is not a decimal number: 'abc'"]


def test_a_forecast_that_is_not_finite_is_dead_lettered_instead() -> None:
    entries = [(b"5-0", GOOD), (b"7-0", {b"series": b"s2", b"value": b"2"})]
    batch = triage(entries, pending=None, series_ids={}, last_id=b"0-0", max_deliveries=5)
    keys = Keys(input="in", output="out", dead="in:dead", group="g", models="m")
    yhat = np.array([[np.nan], [1.5]])
    attn = np.array([[0.5, 0.5], [0.5, 0.5]])
    commands, receipt = batch_commands(
        batch, np.array([0, 1]), yhat, attn, keys, maxlen=10, version=b"v1"
    )
    forecast, dead, ack = commands
    assert forecast[forecast.index(b"src") + 1] == b"7-0"
    assert dead[dead.index(b"src") + 1] == b"5-0"
    assert dead[dead.index(b"error") + 1] == b"the model's forecast is not finite"
    assert ack == (b"XACK", b"in", b"g", b"5-0", b"7-0")
    assert receipt.entered_ms.tolist() == [7.0]
    assert receipt.dead_reasons == ["the model's forecast is not finite"]
