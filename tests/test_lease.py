"""Fenced ownership against a real server: the lease and its fence number, and the
publish that writes nothing unless its process holds the lease at that fence."""

from __future__ import annotations

import hashlib
import logging
from typing import cast

import pytest
import redis

from tests.helpers import entries, wait_for
from worker.contract import ANOMALY_FIELDS, FORECAST_FIELDS
from worker.embedded import EmbeddedServer
from worker.keys import Keys
from worker.lease import (
    LIBRARY,
    VERSION,
    Fence,
    FencedError,
    Lease,
    ensure_library,
    fenced,
)
from worker.streams import Command, ensure_group, entries_of, round_trip


@pytest.fixture
def client(redis_client: redis.Redis) -> redis.Redis:
    ensure_library(redis_client)
    return redis_client


def lease(client: redis.Redis, keys: Keys, owner: str, ttl_ms: int = 5000) -> Lease:
    return Lease(client, key=keys.lease, fence_key=keys.fence, owner=owner, ttl_ms=ttl_ms)


def test_one_holder_at_a_time_and_the_fence_grows_with_every_takeover(
    client: redis.Redis, keys: Keys
) -> None:
    a, b = lease(client, keys, "a"), lease(client, keys, "b")
    assert a.acquire() == (a.token, 1)
    assert b.acquire() == (a.token, 1)  # b is told who holds it
    assert a.acquire() == (a.token, 1)  # renewing: the same fence
    b.release()  # not b's to release
    assert client.get(keys.lease) == a.token.encode()
    a.release()
    assert b.acquire() == (b.token, 2)  # a new holder: the fence grows
    b.release()
    assert a.acquire() == (a.token, 3)  # again, even for a holder from before


def test_one_consumer_name_in_two_processes_is_two_holders(client: redis.Redis, keys: Keys) -> None:
    first, second = lease(client, keys, "w"), lease(client, keys, "w")
    assert first.token != second.token
    assert first.token.startswith("w#")
    assert first.acquire()[0] == first.token
    assert second.acquire()[0] == first.token  # the same name does not share the lease


def test_a_lease_not_renewed_expires(client: redis.Redis, keys: Keys) -> None:
    a, b = lease(client, keys, "a", ttl_ms=200), lease(client, keys, "b")
    a.acquire()
    wait_for(lambda: b.acquire() == (b.token, 2), timeout=10, what="a's lease to expire")


def test_a_publish_writes_only_while_its_lease_holds(client: redis.Redis, keys: Keys) -> None:
    ensure_group(client, keys)
    entry = cast(bytes, client.xadd(keys.input, {"series": "s", "value": "1"}))
    client.xreadgroup(keys.group, "w", {keys.input: ">"})  # pending, as the worker reads
    a, b = lease(client, keys, "a"), lease(client, keys, "b")
    fence = Fence(keys, a.token, a.acquire()[1], 5000)
    forecast = (b"s", entry, b"1", b"[1.0]", b"[1.0]", b"v1", b"[0.5]", b"[1.5]")

    a.release()
    b.acquire()  # a lost its lease (a pause past its TTL), and b took it
    with pytest.raises(redis.ResponseError) as refused:
        round_trip(client, [fence.publish(forecasts=[forecast], dead=[], acks=[entry])])
    error = fenced(refused.value)
    assert isinstance(error, FencedError)
    assert f"held by {b.token} at fence 2, not by {a.token} at fence 1" in str(error)
    assert client.xlen(keys.output) == 0  # nothing written, nothing acked
    assert client.xpending(keys.input, keys.group)["pending"] == 1

    b.release()
    assert a.acquire() == (a.token, 3)  # a has the lease again, but not at its old fence
    with pytest.raises(redis.ResponseError, match="FENCED"):
        round_trip(client, [fence.publish(forecasts=[forecast], dead=[], acks=[entry])])
    now = Fence(keys, a.token, 3, 5000)
    dead = [[b"series", b"x y", b"src", b"9-9", b"error", b"series has characters"]]
    state = {b"meta": b"\x00state\xff", b"chunk:0": b"c"}
    plain = (b"s", entry, b"2", b"[2.0]", b"[1.0]", b"v1", b"", b"")  # intervals off
    event = (b"s", entry, b"1", b"9.5", b"1.0", b"0.5", b"1.5", b"17.000", b"v1")
    client.pexpire(keys.lease, 50)  # about to lapse: the publish renews it
    call = now.publish(
        forecasts=[forecast, plain],
        anomalies=[event],
        dead=dead,
        acks=[entry],
        state=state,
        maxlen=100,
    )
    assert round_trip(client, [call]) == [2]
    (_, written), (_, unbounded) = entries(client, keys.output)
    assert written == dict(zip(FORECAST_FIELDS, forecast, strict=True))
    assert unbounded == dict(zip(FORECAST_FIELDS[:6], plain[:6], strict=True))  # no lo, hi
    assert entries(client, keys.anomalies)[0][1] == dict(zip(ANOMALY_FIELDS, event, strict=True))
    assert entries(client, keys.dead)[0][1][b"series"] == b"x y"
    assert client.xpending(keys.input, keys.group)["pending"] == 0
    assert client.hgetall(keys.state) == state
    assert client.pttl(keys.lease) > 1000  # renewed with the writes, to its 5 s


def test_a_skip_records_the_loss_always_and_moves_the_counter_only_where_it_was(
    client: redis.Redis, keys: Keys
) -> None:
    """attnlstm_skip: the dead letter of entries lost unread, and the group's read
    counter set past them only while its last delivered entry is the one the worker saw;
    nothing at all into a dead stream that is not a stream, nor while fenced."""
    ensure_group(client, keys)
    ids = [cast(bytes, client.xadd(keys.input, {"series": "s", "value": "1"})) for _ in range(3)]
    client.xreadgroup(keys.group, "w", {keys.input: ">"}, count=2)
    a = lease(client, keys, "a")
    fence = Fence(keys, a.token, a.acquire()[1], 5000)
    record = [b"lost", b"5", b"reason", b"unread", b"src", ids[1], b"error", b"e"]
    fields = dict(zip(record[::2], record[1::2], strict=True))

    def skip(last: bytes) -> Command:
        return fence.skip(last_delivered=last, entries_read=7, dead=record, maxlen=100)

    assert round_trip(client, [skip(ids[0])]) == [0]  # the group read on since: 2 read
    assert [f for _, f in entries(client, keys.dead)] == [fields]
    assert client.xinfo_groups(keys.input)[0]["entries-read"] == 2
    assert round_trip(client, [skip(ids[1])]) == [1]
    assert client.xinfo_groups(keys.input)[0]["entries-read"] == 7
    assert client.xlen(keys.dead) == 2
    client.delete(keys.dead)
    client.set(keys.dead, "not a stream")
    client.xgroup_setid(keys.input, keys.group, ids[1], entries_read=2)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        round_trip(client, [skip(ids[1])])
    assert client.xinfo_groups(keys.input)[0]["entries-read"] == 2  # checked before a write
    client.delete(keys.dead)
    a.release()
    with pytest.raises(redis.ResponseError, match="FENCED"):
        round_trip(client, [skip(ids[1])])
    assert (client.exists(keys.dead), client.xinfo_groups(keys.input)[0]["entries-read"]) == (0, 2)


def test_a_new_term_refuses_what_the_holder_sent_before_it(client: redis.Redis, keys: Keys) -> None:
    """A worker that lost its connection re-syncs on a new one: a publish it sent on the
    old one may still wait in the server's buffer for that connection, and land after
    the re-sync published the same entries again. The re-sync takes the lease for a new
    term, whose fence number refuses the old publish; with the same number, it was
    written, and each of its forecasts was published twice."""
    ensure_group(client, keys)
    entry = cast(bytes, client.xadd(keys.input, {"series": "s", "value": "1"}))
    client.xreadgroup(keys.group, "w", {keys.input: ">"})
    a = lease(client, keys, "a")
    assert a.acquire() == (a.token, 1)
    forecast = (b"s", entry, b"1", b"[1.0]", b"[1.0]", b"v1", b"", b"")
    sent_before = Fence(keys, a.token, 1, 5000).publish(forecasts=[forecast], acks=[entry])
    assert a.acquire() == (a.token, 1)  # a renewal keeps the term
    assert a.acquire(new_term=True) == (a.token, 2)
    assert round_trip(
        client, [Fence(keys, a.token, 2, 5000).publish(forecasts=[forecast], maxlen=9)]
    )
    with pytest.raises(redis.ResponseError, match="FENCED"):
        round_trip(client, [sent_before])
    assert client.xlen(keys.output) == 1


def test_a_deleted_fence_number_starts_a_new_term(client: redis.Redis, keys: Keys) -> None:
    """The fence key deleted under a held lease (someone "resetting" a counter): every
    write at the old number is refused, and the holder's renewals used to keep the lease
    alive at fence 0, which no write matched: no forecast, and no takeover, for as long
    as the worker ran. The holder's next call starts a new term that writes again."""
    a = lease(client, keys, "a")
    assert a.acquire() == (a.token, 1)
    client.delete(keys.fence)
    with pytest.raises(redis.ResponseError, match="FENCED"):  # the old term's number
        round_trip(client, [Fence(keys, a.token, 1, 5000).publish()])
    token, number = a.acquire()
    assert (token, number) == (a.token, 1)  # counted again from 1
    assert round_trip(client, [Fence(keys, a.token, number, 5000).publish()]) == [0]


def test_a_publish_acks_more_ids_than_one_command_takes(client: redis.Redis, keys: Keys) -> None:
    ensure_group(client, keys)
    pipe = client.pipeline(transaction=False)
    for k in range(2500):
        pipe.xadd(keys.input, {"series": "s", "value": str(k)})
    pipe.execute()
    read = entries_of(client.xreadgroup(keys.group, "w", {keys.input: ">"}, count=2500))
    ids = [entry_id for entry_id, _ in read]
    a = lease(client, keys, "a")
    _, number = a.acquire()
    round_trip(
        client, [Fence(keys, a.token, number, 5000).publish(forecasts=[], dead=[], acks=ids)]
    )
    assert client.xpending(keys.input, keys.group)["pending"] == 0


def test_the_library_is_loaded_once_and_replaced_when_its_version_differs(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """An older version is replaced, with a warning for the workers of its release that
    may still run: it was replaced without a word."""
    caplog.set_level(logging.WARNING, logger="attnlstm.worker")
    ensure_library(redis_client)
    assert redis_client.fcall("attnlstm_version", 0) == VERSION.encode()
    older = LIBRARY.replace(f"local VERSION = '{VERSION}'", "local VERSION = '0'")
    redis_client.function_load(older, replace=True)
    assert redis_client.fcall("attnlstm_version", 0) == b"0"
    assert not caplog.records
    ensure_library(redis_client)
    assert redis_client.fcall("attnlstm_version", 0) == VERSION.encode()
    assert [r.getMessage() for r in caplog.records] == [
        f"loaded version {VERSION} of the attnlstm functions over version 0: workers of "
        "that release still running are refused from their next call, and stop (workers "
        "of a release before version 8 load theirs again: stop those first)"
    ]


def test_a_call_of_another_versions_worker_is_refused_before_anything_is_written(
    client: redis.Redis, keys: Keys
) -> None:
    """Each call names its worker's version first: a call of another release's worker,
    its arguments laid out for other functions (a rolling upgrade's older workers call
    the newer library until they stop), is refused before it reads or writes a key."""
    other = str(int(VERSION) - 1)
    refused = f"^ATTNLSTM_VERSION Redis has version {VERSION} of the attnlstm functions"
    with pytest.raises(
        redis.ResponseError, match=f"{refused}, and this worker calls version {other}$"
    ):
        client.fcall("attnlstm_lease", 2, keys.lease, keys.fence, other, "t", 1000)
    with pytest.raises(redis.ResponseError, match=f"{refused}, and this worker calls none "):
        client.fcall("attnlstm_lease", 2, keys.lease, keys.fence, "t", 1000)  # none named
    assert client.exists(keys.lease, keys.fence) == 0
    # The two that every release calls alike: any worker may ask, and hand a lease back.
    assert client.fcall("attnlstm_version", 0) == VERSION.encode()
    assert client.fcall("attnlstm_release", 1, keys.lease, "t") == 0


# worker/functions.lua's code (its comments and blank lines left out) for each VERSION.
# Three libraries with different arguments were all version 10: a worker could call one
# laid out for another, and the functions' version check cannot tell them apart.
LIBRARY_CODE_SHA256 = {
    "12": "d56eb79600a7e4cd296f42fea5b8835d17b8b006f35dbf143da1add059438eca",
    "13": "edcee379fc5cacf6b5f117b0f9acc1487fe13efde7bab1926e9756180b5c31ea",
}


def test_a_changed_library_comes_with_a_new_version() -> None:
    code = "\n".join(
        line for line in LIBRARY.splitlines() if line.strip() and not line.strip().startswith("--")
    )
    assert LIBRARY_CODE_SHA256.get(VERSION) == hashlib.sha256(code.encode()).hexdigest(), (
        "worker/functions.lua's code changed: raise VERSION there and in worker/lease.py, "
        "and add the new version's hash to LIBRARY_CODE_SHA256"
    )


def test_a_newer_library_is_never_replaced(redis_client: redis.Redis) -> None:
    """Workers of a newer release loaded their functions: this one stops with what to do
    instead of loading its own over them, under the calls of those workers (it used to
    replace them at every start and re-sync, each release undoing the other's)."""
    newer = str(int(VERSION) + 1)
    redis_client.function_load(
        LIBRARY.replace(f"local VERSION = '{VERSION}'", f"local VERSION = '{newer}'"), replace=True
    )
    try:
        with pytest.raises(ValueError, match=f"version {newer} of the attnlstm functions, newer"):
            ensure_library(redis_client)
        assert redis_client.fcall("attnlstm_version", 0) == newer.encode()
    finally:
        redis_client.function_load(LIBRARY, replace=True)


def test_a_full_server_still_answers_the_version_and_takes_a_lease_back() -> None:
    """At maxmemory (noeviction), functions registered without flags were refused: every
    start and re-sync failed on the version check, and a stopping worker's lease was left
    to lapse. Its own server: the others' are never made full."""
    keys = Keys(input="full:in")
    with EmbeddedServer() as server:
        client = redis.Redis.from_url(server.url)
        try:
            ensure_library(client)
            held = lease(client, keys, "w")
            held.acquire()
            client.config_set("maxmemory", 1)
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                lease(client, keys, "other").acquire()  # it is full: writes are refused
            ensure_library(client)
            held.release()
            assert client.exists(keys.lease) == 0
        finally:
            client.close()
