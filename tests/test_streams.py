"""Redis plumbing against a real server: reply shapes, the transaction."""

from __future__ import annotations

import ssl
import threading
from typing import cast

import hiredis
import pytest
import redis
from redis.cluster import RedisCluster

from tests.helpers import wait_for
from worker.contract import Repeated, dead_fields, parse
from worker.keys import Keys
from worker.streams import (
    CLIENT_CERT_HINT,
    Wire,
    _pack,
    connect,
    ensure_group,
    entries_of,
    group_info,
    id_key,
    pages,
    primaries,
    read_entries,
    read_group,
    read_streams,
    round_trip,
    routing_key,
    scheme_hint,
    tls_fix,
    transaction,
)


@pytest.mark.parametrize("protocol", [2, 3])
def test_read_replies_look_the_same_in_resp2_and_resp3(
    redis_url: str, stream_prefix: str, protocol: int
) -> None:
    sep = "&" if "?" in redis_url else "?"
    client = connect(f"{redis_url}{sep}protocol={protocol}", socket_timeout_s=5, client_name="t")
    keys = Keys(input=f"{stream_prefix}in")
    assert ensure_group(client, keys) is True
    assert ensure_group(client, keys) is False  # already there: no error
    first = client.xadd(keys.input, {"series": "a", "value": "1"})
    client.xadd(keys.input, {"series": "b", "value": "2"})
    got = entries_of(client.xreadgroup(keys.group, "c", {keys.input: ">"}, count=10))
    assert [fields for _, fields in got] == [
        {b"series": b"a", b"value": b"1"},
        {b"series": b"b", b"value": b"2"},
    ]
    assert got[0][0] == first
    assert entries_of(client.xreadgroup(keys.group, "c", {keys.input: ">"}, count=10)) == []
    client.xdel(keys.input, got[1][0])
    # What the re-sync reads: the cursor, the entries claimed, the ids deleted meanwhile.
    cursor, claimed, deleted = client.xautoclaim(keys.input, keys.group, "d", 0)
    assert (cursor, [i for i, _ in claimed], deleted) in [
        (b"0-0", [got[0][0]], [got[1][0]]),
        ("0-0", [got[0][0]], [got[1][0]]),
    ]
    assert group_info(client, keys)["last-delivered-id"] == got[1][0]
    client.close()


def test_a_transaction_returns_every_reply_and_surfaces_errors(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str
) -> None:
    client = connect(redis_url, socket_timeout_s=5, client_name="t")
    key = f"{stream_prefix}s".encode()
    replies = transaction(client, [(b"XADD", key, b"*", b"f", b"1"), (b"XLEN", key)])
    assert replies[1] == 1
    with pytest.raises(redis.ResponseError):  # refused at queue time: nothing runs
        transaction(client, [(b"XADD", key, b"*", b"f", b"2"), (b"NOSUCHCOMMAND",)])
    assert redis_client.xlen(key) == 1
    redis_client.set(f"{stream_prefix}str", "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):  # fails when it runs
        transaction(client, [(b"XADD", f"{stream_prefix}str".encode(), b"*", b"f", b"3")])
    assert transaction(client, [(b"XLEN", key)]) == [1]  # the connection is still good
    client.close()


def test_entry_ids_sort_like_the_stream() -> None:
    ids = [b"10-2", b"9-5", b"10-10", b"100-0", b"10-0"]
    assert sorted(ids, key=id_key) == [b"9-5", b"10-0", b"10-2", b"10-10", b"100-0"]


def test_commands_are_packed_as_hiredis_packs_them_and_the_server_reads_them(
    redis_client: redis.Redis, stream_prefix: str
) -> None:
    key = f"{stream_prefix}packed".encode()
    values = [b"", b"a\r\nb", bytes(range(256)), b"x" * 100_000, "é".encode()]
    command = (b"RPUSH", key, *values)
    # hiredis's stub names a one-element tuple where it takes any length.
    assert _pack(command) == hiredis.pack_command(command)  # type: ignore[arg-type]
    wire = Wire(redis_client)
    wire.send([command, (b"LRANGE", key, b"0", b"-1")])
    assert wire.receive() == [len(values), values]
    wire.close()


@pytest.mark.parametrize("where", ["one server", "a cluster"])
def test_a_connection_dropped_under_a_command_is_an_error_not_a_silent_retry(
    request: pytest.FixtureRequest, redis_url: str, stream_prefix: str, where: str
) -> None:
    """redis-py's default client sends a command again on a new connection when the
    connection drops under it. For XREADGROUP ``>`` that hands the lost reply's entries
    to this consumer unseen, and a retried XAUTOCLAIM drops the deleted ids the server
    reports only once: the worker's client raises instead, and the worker re-syncs."""
    url = request.getfixturevalue("redis_cluster").url if where == "a cluster" else redis_url
    name = f"{stream_prefix.rstrip(':')}-no-retry"
    client = connect(url, socket_timeout_s=30, client_name=name)
    key = f"{{{stream_prefix}}}list"
    outcome: list[object] = []

    def blocked() -> None:  # a command in flight, its reply not come
        try:
            outcome.append(client.blpop([key], timeout=10))
        except redis.ConnectionError as e:
            outcome.append(e)

    waiting = threading.Thread(target=blocked)
    waiting.start()
    killer = connect(url, socket_timeout_s=5, client_name="killer")
    nodes = (
        [n.redis_connection for n in primaries(cast(RedisCluster, killer))]
        if where == "a cluster"
        else [killer]
    )

    def kill() -> bool:
        for node in nodes:
            for info in node.client_list():
                if info["name"] == name and info["cmd"] == "blpop":
                    return bool(node.client_kill_filter(_id=info["id"]))
        return False

    wait_for(kill, timeout=10)
    waiting.join(timeout=30)
    assert len(outcome) == 1, outcome
    assert isinstance(outcome[0], redis.ConnectionError), outcome
    client.lpush(key, b"1")  # the next command connects again
    assert client.lpop(key) == b"1"


def test_a_field_named_twice_is_a_bad_entry_read_live_or_in_a_resync(
    redis_client: redis.Redis, stream_prefix: str
) -> None:
    """Read into a dict, the last `value` and `series` won: the entry was forecast as
    series b, value 1, and its dead letter could not have kept what came."""
    keys = Keys(input=f"{stream_prefix}in")
    ensure_group(redis_client, keys)
    flat = [b"series", b"a", b"value", b"nan", b"value", b"1", b"series", b"b"]
    round_trip(redis_client, [(b"XADD", keys.input.encode(), b"*", *flat)])
    (live,) = read_entries(round_trip(redis_client, [read_group(keys, "c", 10, None)])[0])
    (again,) = next(pages(redis_client, keys.input))  # as a re-sync reads it
    for entry_id, fields in (live, again):
        assert isinstance(fields, Repeated)
        assert parse(entry_id, fields) == "field given more than once: 'series', 'value'"
        dead = dead_fields(fields, entry_id, "e")
        assert list(dead.items())[:4] == [
            (b"series", b"a"),
            (b"value", b"nan"),
            (b"value#2", b"1"),
            (b"series#2", b"b"),
        ]


def test_a_read_is_routed_by_its_stream_whatever_its_group_and_consumer_are_named() -> None:
    """A consumer (or group) named STREAMS: the read went to the node of the key named
    after it, on a cluster."""
    keys = Keys(input="in{3}", group="STREAMS")
    for consumer in ("STREAMS", "w"):
        assert routing_key(read_group(keys, consumer, 10, 100)) == b"in{3}"
    assert routing_key((b"XREAD", b"COUNT", b"5", b"STREAMS", b"s", b">")) == b"s"


def test_an_error_chain_that_loops_is_read_once_through() -> None:
    """An error raised again in a handler of an error it caused (the cluster client's
    start did so) has a chain that loops: the TLS check went round it for ever."""
    inner = redis.ConnectionError("reset")
    outer = redis.exceptions.RedisClusterException("no node answered")
    outer.__cause__ = inner
    inner.__context__ = outer
    assert tls_fix(inner) is None
    assert scheme_hint(inner, "redis://127.0.0.1:6380") is None
    inner.__context__ = ConnectionResetError(104, "Connection reset by peer")
    inner.__context__.__context__ = outer
    assert scheme_hint(outer, "redis://127.0.0.1:6380") is not None  # found in the loop


def test_a_refusal_in_a_read_s_place_is_raised_not_read_as_entries() -> None:
    """The bench's raw reads took a NOPERM reply for entries: a TypeError's traceback."""
    refused = redis.exceptions.NoPermissionError("User u has no permissions to run 'xreadgroup'")
    for read in (read_entries, read_streams):
        with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions"):
            read(refused)


def test_an_eof_in_a_tls_handshake_hints_at_a_client_certificate() -> None:
    """A server that asks for a client certificate refuses one without by an alert that
    a client writing first never reads: redis-py's error is an EOF, which said no more."""
    error = redis.ConnectionError("Error 8 while writing to socket.")
    error.__context__ = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    assert scheme_hint(error, "rediss://127.0.0.1:6380/0") == CLIENT_CERT_HINT
    assert scheme_hint(error, "redis://127.0.0.1:6380/0") is None  # no TLS asked for
