"""What each entry of a read becomes, and the fenced call that publishes it (pure code:
the worker tests run the same through a real server, test_lease the call itself)."""

from __future__ import annotations

import numpy as np

from attnlstm.partition import partition_of
from worker.batch import Anomalies, Forecasts, batch_call, handled_before, triage
from worker.contract import DEAD_KINDS, reason_kind
from worker.keys import Keys
from worker.lease import VERSION, Fence

KEYS = Keys(input="in", output="out", dead="in:dead", anomalies="an", group="g", models="m")
FENCE = Fence(KEYS, "w#1a2b3c4d", 7, 10_000)
GOOD = {b"series": b"s1", b"value": b"1.5"}
BAD = {b"series": b"s1", b"value": b"abc"}


def test_a_live_read_acks_everything_and_dead_letters_the_bad() -> None:
    entries = [(b"5-0", GOOD), (b"6-0", BAD), (b"7-0", None), (b"8-0", {**GOOD, b"ts": b"42"})]
    known: dict[bytes, str] = {}
    batch = triage(entries, pending=None, series_ids=known, last_id=b"4-0", max_attempts=5)
    assert batch.acks == [b"5-0", b"6-0", b"7-0", b"8-0"]  # the deleted one too
    assert [(i, r) for i, _, r in batch.dead] == [(b"6-0", "value is not a decimal number: 'abc'")]
    assert batch.ids == [b"5-0", b"8-0"]
    assert batch.values == [1.5, 1.5]
    assert batch.ts == [5, 42]  # the entry id's time unless the producer gave one
    assert batch.publish == [True, True]
    assert known == {b"s1": "s1"}


def test_a_resync_replays_what_was_acked_and_handles_what_is_pending() -> None:
    entries = [(b"5-0", GOOD), (b"6-0", BAD), (b"7-0", GOOD), (b"8-0", GOOD), (b"9-0", GOOD)]
    pending = {b"7-0": 1, b"8-0": 5}  # handling 8-0 was cut short max_attempts times
    batch = triage(entries, pending=pending, series_ids={}, last_id=b"4-0", max_attempts=5)
    assert batch.acks == [b"7-0", b"8-0"]  # only what is pending
    assert [(i, r) for i, _, r in batch.dead] == [
        (b"8-0", "the worker stopped while handling it, 5 times")
    ]  # and not 6-0: it was dead-lettered when it was first handled
    assert batch.ids == [b"5-0", b"7-0", b"9-0"]
    assert batch.publish == [False, True, False]  # acked before: into the windows only


def test_entries_the_state_already_reflects_are_only_acked() -> None:
    entries = [(b"3-0", GOOD), (b"4-0", GOOD), (b"4-1", GOOD)]
    assert handled_before(entries, b"4-0") == 2
    assert handled_before(entries, b"2-5") == 0
    assert handled_before(entries, b"9-0") == 3
    batch = triage(entries, pending=None, series_ids={}, last_id=b"4-0", max_attempts=5)
    assert batch.acks == [b"3-0", b"4-0", b"4-1"]
    assert batch.ids == [b"4-1"]


def test_the_call_holds_the_forecasts_the_dead_letters_and_the_ack() -> None:
    entries = [(b"5-0", GOOD), (b"6-0", BAD), (b"7-0", {b"series": b"s2", b"value": b"2"})]
    batch = triage(entries, pending=None, series_ids={}, last_id=b"0-0", max_attempts=5)
    made = Forecasts(
        np.array([1]),  # only the second valid reading had a full window
        yhat=np.array([[2.25]]),
        attn=np.array([[0.25, 0.75]]),
        lo=np.array([[2.0]]),
        hi=np.array([[2.5]]),
    )
    # The first valid reading fell far outside the interval its forecast gave.
    found = Anomalies(np.array([0]), np.array([[1.0, 0.5, 1.25]]), np.array([4.0]))
    call, receipt = batch_call(
        batch, made, FENCE, maxlen=1000, version=b"v1", anomalies=found, handled=b"7-0"
    )
    assert call == (
        b"FCALL", b"attnlstm_publish", b"8",
        b"in:lease:g", b"in:fence:g", b"in", b"out", b"in:dead", b"in:windows:g",
        b"in:handling:g", b"an",
        VERSION.encode(),  # the functions' version it calls, refused by any other's
        b"w#1a2b3c4d", b"7", b"10000", b"g", b"1000",
        b"1", b"1", b"3", b"0",  # forecasts, dead letters, acks, no state
        b"7-0 + 0 w#1a2b3c4d",  # handled up to 7-0, by this token: the handling mark
        b"1",  # an anomaly event
        b"s2", b"7-0", b"7", b"[ 2.250000000000e+00]", b"[0.2500000,0.7500000]", b"v1",
        b"[ 2.000000e+00]", b"[ 2.500000e+00]",
        b"s1", b"5-0", b"5", b"1.5",
        b"1.000000000000e+00", b"5.000000e-01", b"1.250000e+00",  # as its forecast had them
        b"4.000", b"v1",
        b"8", b"series", b"s1", b"value", b"abc",
        b"src", b"6-0", b"error", b"value is not a decimal number: 'abc'",
        b"5-0", b"6-0", b"7-0",
    )  # fmt: skip
    assert receipt.entered_ms.tolist() == [7.0]  # the forecast's input entered at 7 ms
    assert receipt.dead_reasons == ["value is not a decimal number: 'abc'"]
    assert receipt.anomalies == 1


def test_anomalies_of_replayed_entries_are_not_published_again() -> None:
    entries = [(b"5-0", GOOD), (b"7-0", GOOD)]
    batch = triage(entries, pending={b"7-0": 1}, series_ids={}, last_id=b"0-0", max_attempts=5)
    none = Forecasts(np.empty(0, dtype=np.int64), np.empty((0, 1)), np.empty((0, 2)))
    both = Anomalies(np.array([0, 1]), np.ones((2, 3)), np.array([5.0, 6.0]))
    call, receipt = batch_call(
        batch, none, FENCE, maxlen=10, version=b"v", anomalies=both, handled=b"7-0"
    )
    assert call is not None
    assert receipt.anomalies == 1  # 5-0 was acked before: its event, if any, went out then
    assert call[22] == b"1"
    assert call[23:25] == (b"s1", b"7-0")


def test_the_state_rides_last_and_an_empty_batch_has_no_call() -> None:
    batch = triage([(b"5-0", GOOD)], pending={}, series_ids={}, last_id=b"9-0", max_attempts=5)
    none = Forecasts(np.empty(0, dtype=np.int64), np.empty((0, 1)), np.empty((0, 2)))
    call, _ = batch_call(batch, none, FENCE, maxlen=10, version=b"v1", handled=b"9-0")
    assert call is None  # replayed only: nothing to write
    call, _ = batch_call(
        batch,
        none,
        FENCE,
        maxlen=10,
        version=b"v1",
        state={b"meta": b"STATE"},
        handled=b"9-0",
    )
    assert call is not None
    assert call[-8:] == (b"0", b"0", b"0", b"1", b"", b"0", b"meta", b"STATE")  # no mark


def test_a_forecast_that_is_not_finite_is_dead_lettered_instead() -> None:
    entries = [(b"5-0", GOOD), (b"7-0", {b"series": b"s2", b"value": b"2"})]
    batch = triage(entries, pending=None, series_ids={}, last_id=b"0-0", max_attempts=5)
    made = Forecasts(
        np.array([0, 1]),
        yhat=np.array([[1.0], [1.5]]),
        attn=np.array([[0.5, 0.5], [0.5, 0.5]]),
        lo=np.array([[np.nan], [1.0]]),  # an interval that is not finite: so is the forecast
        hi=np.array([[2.0], [2.0]]),
    )
    call, receipt = batch_call(batch, made, FENCE, maxlen=10, version=b"v", handled=b"7-0")
    assert call is not None
    assert call[17:21] == (b"1", b"1", b"2", b"0")  # a forecast, a dead letter, two acks
    assert call[21] == b"7-0 + 0 " + FENCE.token.encode()  # handled up to 7-0: the mark moves
    assert call[22] == b"0"  # no anomalies
    assert call[23:25] == (b"s2", b"7-0")
    dead = call[32 : 32 + int(call[31])]
    assert dead[dead.index(b"error") + 1] == b"the model's forecast is not finite"
    assert dead[dead.index(b"src") + 1] == b"5-0"
    assert call[-2:] == (b"5-0", b"7-0")
    assert receipt.entered_ms.tolist() == [7.0]
    assert receipt.dead_reasons == ["the model's forecast is not finite"]


def test_entries_put_aside_are_not_replayed_into_the_windows() -> None:
    """Put aside at max_attempts (dead-lettered and acked), an entry was never in the
    windows: a re-read that meets it skips it, where it took it in, and handled it."""
    entries = [(b"5-0", GOOD), (b"6-0", GOOD), (b"7-0", GOOD)]
    pending = {b"7-0": 5}
    batch = triage(entries, pending=pending, series_ids={}, last_id=b"4-0", max_attempts=5)
    assert batch.aside == [b"7-0"]
    batch = triage(
        entries, pending={}, series_ids={}, last_id=b"4-0", max_attempts=5, put_aside={b"7-0"}
    )
    assert (batch.ids, batch.dead, batch.acks) == ([b"5-0", b"6-0"], [], [])


def test_an_entry_id_past_int64_is_bad_input() -> None:
    """Redis takes ids of two unsigned 64-bit numbers; the windows hold them as int64,
    whose conversion raised OverflowError and stopped the worker for good."""
    big = [b"1700000000000-9223372036854775808", b"9223372036854775808-0"]
    entries = [(b"1700000000000-9223372036854775807", GOOD), *((i, GOOD) for i in big)]
    batch = triage(entries, pending=None, series_ids={}, last_id=b"0-0", max_attempts=5)
    assert batch.ids == [b"1700000000000-9223372036854775807"]  # the largest that fits
    reasons = [f"id has a part past 2**63-1 (the worker keeps ids as int64): {i.decode()!r}"
               for i in big]  # fmt: skip
    assert [(i, r) for i, _, r in batch.dead] == list(zip(big, reasons, strict=True))
    assert batch.acks == [i for i, _ in entries]
    assert {reason_kind(r) for r in reasons} == {"id"}
    assert "id" in DEAD_KINDS


def test_an_entry_of_another_partition_s_series_is_dead_lettered_naming_its_own() -> None:
    entries = [
        (b"5-0", {b"series": b"sensor-7", b"value": b"1"}),
        (b"6-0", {**GOOD, b"series": b"sensor-8"}),
    ]
    assert (partition_of("sensor-7", 2), partition_of("sensor-8", 2)) == (0, 1)
    batch = triage(
        entries, pending=None, series_ids={}, last_id=b"0-0", max_attempts=5, partition=(1, 2)
    )
    reason = (
        "partition is not the series': sensor-7 belongs to partition 0 of 2 "
        "(crc32(series) mod P), not 1"
    )
    assert [(i, r) for i, _, r in batch.dead] == [(b"5-0", reason)]
    assert reason_kind(reason) == "partition"
    assert "partition" in DEAD_KINDS
    assert batch.ids == [b"6-0"]
    alone = triage(entries, pending=None, series_ids={}, last_id=b"0-0", max_attempts=5)
    assert alone.ids == [b"5-0", b"6-0"]  # one partition: every series is its own
