"""Fenced ownership: one worker at a time may write, and Redis itself enforces it.

A lease is held by a token unique to the process (a consumer name identifies a role;
two processes started with one name still hold different tokens) and carries a fence
number that grows on every takeover. Every publish + ack is one call of a function on
the server (``worker/functions.lua``) that first checks the lease is still this token's
at this fence number, in the same atomic step as the writes. A worker that was frozen
past its lease, or that shares its name with the worker now holding it, can write
nothing: its call is refused with FENCED, and it steps back.

Functions need Redis 7.0 or newer (or Valkey). The worker loads the library itself when
its user may (FUNCTION LOAD); a deployment whose worker user may only FCALL loads it
beforehand (docker-compose's ``functions`` service runs ``deploy/load-functions.sh``).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files

import redis

from worker.attempts import Mark
from worker.keys import Keys
from worker.streams import Command, OutOfStepError, as_str, cluster_of, primaries

VERSION = "13"  # the library's, in functions.lua: every call but two names it (below)
_V = VERSION.encode()
LIBRARY = files("worker").joinpath("functions.lua").read_text()

log = logging.getLogger("attnlstm.worker")


class FencedError(OutOfStepError):
    """A write refused by Redis: another process holds the lease (or took it and gave
    it back) since this one took it. The worker drops what it was writing and steps
    back: re-syncs, or waits as a standby."""


def ensure_library(client: redis.Redis) -> None:
    """Make sure the server (each primary of a cluster) has this version of the
    functions, loading them if it may. A newer version is never replaced: the workers
    that loaded it call its functions as they are, and an older layout under their calls
    could write a batch wrong, or half of it."""
    try:
        on_nodes = _versions(client)
    except redis.ResponseError as e:
        if "unknown command" not in str(e).lower():
            raise  # a refusal (NOPERM) says what is missing itself
        raise ValueError(
            f"this Redis has no functions ({e}): the worker needs Redis 7.0 or newer, or Valkey"
        ) from None
    loaded = set(on_nodes.values())
    if loaded == {VERSION}:
        return
    if newer := sorted(v for v in loaded if v and v.isdigit() and int(v) > int(VERSION)):
        raise ValueError(
            f"Redis has version {newer[-1]} of the attnlstm functions, newer than this "
            f"worker's {VERSION}: run this worker's newer release (its workers loaded them; "
            "in the docker-compose deployment, `docker compose up -d --build` builds the "
            "image of the checkout whose functions were loaded)"
        )
    try:
        client.function_load(LIBRARY, replace=True)
        if older := sorted({v for v in loaded if v and v != VERSION}):
            _replaced(older)
    except redis.exceptions.NoPermissionError:
        clustered = cluster_of(client) is not None
        how = (  # on a cluster, the CLI's line loads one node
            "on every primary of the cluster (deploy/load-functions.sh, with each one's "
            "REDIS_HOST and REDIS_PORT)"
            if clustered
            else "(deploy/load-functions.sh, or redis-cli -x FUNCTION LOAD REPLACE < "
            "worker/functions.lua; in the docker-compose deployment, `docker compose up "
            "functions`)"
        )
        lacking = ", ".join(_holds(node, v) for node, v in on_nodes.items() if v != VERSION)
        where = f" ({lacking})" if clustered else ""  # which of the primaries
        raise ValueError(
            f"Redis lacks version {VERSION} of the attnlstm functions{where}, and this user "
            f"may not load them: load worker/functions.lua as a user that may (the `loader` "
            f"of deploy/users.acl.template) {how}"
        ) from None


def _holds(node: str, version: str | None) -> str:
    """What a primary holds of the library, in words."""
    return f"{node} has {'none' if version is None else 'version ' + version}"


def _replaced(older: list[str]) -> None:
    """The warning for versions this one replaced: the workers of their release that
    still run are refused from their next call (the functions check every caller's
    version, from version 12), and stop; but a release before version 8 of the
    functions loads its own over any other, this one included, at its next re-sync."""
    log.warning(
        "loaded version %s of the attnlstm functions over version %s: workers of that "
        "release still running are refused from their next call, and stop (workers of a "
        "release before version 8 load theirs again: stop those first)",
        VERSION,
        ", ".join(older),
    )


def _versions(client: redis.Redis) -> dict[str, str | None]:
    """The library's version on the server (named ""), or on each primary of a cluster
    by its address (a keyless FCALL goes to any one node); None where it has none."""
    if (cluster := cluster_of(client)) is None:
        return {"": _version(client)}
    return {node.name: _version(cluster.get_redis_connection(node)) for node in primaries(cluster)}


def _version(client: redis.Redis) -> str | None:
    try:
        return _text(client.fcall("attnlstm_version", 0))
    except redis.ResponseError as e:
        if "function not found" in str(e).lower():
            return None
        raise


def _text(reply: object) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def fenced(error: redis.ResponseError) -> FencedError | None:
    """The FencedError an error reply of attnlstm_publish stands for, if it is one."""
    text = str(error)
    return FencedError(text.removeprefix("FENCED ")) if text.startswith("FENCED") else None


@dataclass(frozen=True)
class Fence:
    """The lease as one process holds it: its token and the fence number it took it at.
    Writes made through it are refused once either has changed."""

    keys: Keys
    token: str
    number: int
    ttl_ms: int

    def publish(
        self,
        *,
        forecasts: Sequence[tuple[bytes, ...]] = (),
        anomalies: Sequence[tuple[bytes, ...]] = (),
        dead: Sequence[list[bytes]] = (),
        acks: Sequence[bytes] = (),
        state: Mapping[bytes, bytes] | None = None,
        mark: Mark | None = None,
        maxlen: int = 0,
    ) -> Command:
        """One ``FCALL attnlstm_publish``: the forecasts (series, src, ts, yhat, attn,
        model, lo, hi each; lo and hi empty when intervals are off), the anomaly events
        (ANOMALY_FIELDS' values each), the dead letters (their flat fields and values
        each), the acks,
        the state and the handling mark (:mod:`worker.attempts`), written only while
        this lease holds; the streams written to are capped at about ``maxlen``
        entries. The lease is renewed."""
        k = self.keys
        head = (b"FCALL", b"attnlstm_publish", b"8", k.lease.encode(), k.fence.encode(),
                k.input.encode(), k.output.encode(), k.dead.encode(), k.state.encode(),
                k.handling.encode(), k.anomalies.encode(), _V, self.token.encode(),
                b"%d" % self.number, b"%d" % self.ttl_ms, k.group.encode(), b"%d" % maxlen,
                b"%d" % len(forecasts), b"%d" % len(dead), b"%d" % len(acks),
                b"%d" % len(state or {}), mark.encode() if mark else b"",
                b"%d" % len(anomalies))  # fmt: skip
        flat_dead = [part for fields in dead for part in (b"%d" % len(fields), *fields)]
        tail = [part for pair in (state or {}).items() for part in pair]
        return (*head, *(v for f in forecasts for v in f), *(v for a in anomalies for v in a),
                *flat_dead, *acks, *tail)  # fmt: skip

    def skip(
        self, *, last_delivered: bytes, entries_read: int, dead: Sequence[bytes], maxlen: int
    ) -> Command:
        """``FCALL attnlstm_skip``: the dead letter ``dead`` (its fields and values)
        that records entries lost unread, in a dead stream capped at about ``maxlen``
        (none, where ``dead`` is empty), and the group's read counter set to
        ``entries_read`` while its last delivered entry is ``last_delivered``; only
        while this lease holds."""
        k = self.keys
        return (b"FCALL", b"attnlstm_skip", b"4", k.lease.encode(), k.fence.encode(),
                k.input.encode(), k.dead.encode(), _V, self.token.encode(),
                b"%d" % self.number, k.group.encode(), last_delivered, b"%d" % entries_read,
                b"%d" % maxlen, *dead)  # fmt: skip

    def claim(
        self, *, consumer: str, start: bytes, count: int, maxlen: int, reason: str, what: str
    ) -> Command:
        """``FCALL attnlstm_claim``: a page of ``count`` of the group's pending entries
        from ``start`` claimed for ``consumer``, and the dead letter of those deleted
        from the stream (``reason``, and ``what`` befell them in its error), in a dead
        stream capped at about ``maxlen``; only while this lease holds. Its reply is
        XAUTOCLAIM's."""
        k = self.keys
        return (b"FCALL", b"attnlstm_claim", b"4", k.lease.encode(), k.fence.encode(),
                k.input.encode(), k.dead.encode(), _V, self.token.encode(),
                b"%d" % self.number, k.group.encode(), consumer.encode(), start,
                b"%d" % count, b"%d" % maxlen, reason.encode(), what.encode())  # fmt: skip


class Lease:
    """One holder at a time for ``key``, with a fence number (in ``fence_key``) that
    grows on every takeover."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        key: str,
        fence_key: str,
        owner: str,
        ttl_ms: int,
        token: str | None = None,
    ) -> None:
        """``token``: this process's (:func:`process_token`), when it holds several."""
        self.client, self.key, self.fence_key, self.ttl_ms = client, key, fence_key, ttl_ms
        self.token = token or process_token(owner)

    def acquire(self, *, new_term: bool = False) -> tuple[str, int]:
        """Take the lease if it is free, renew it if it is ours: (its holder's token,
        the fence number). Ours when the holder is ``self.token``. ``new_term``: a
        lease already ours gets a new fence number, which refuses every write sent
        before at the old one (one still on its way from a dropped connection)."""
        args = (
            self.key,
            self.fence_key,
            VERSION,
            self.token,
            self.ttl_ms,
            "1" if new_term else "0",
        )
        fence, holder = self.client.fcall("attnlstm_lease", 2, *args)
        return as_str(holder), int(fence)

    def release(self) -> None:
        self.client.fcall("attnlstm_release", 1, self.key, self.token)

    def holder(self) -> str | None:
        """Who holds the lease now (a token), or None: one read, nothing taken."""
        held = self.client.get(self.key)
        return None if held is None else as_str(held)


def process_token(owner: str) -> str:
    """A token for this process: its name (a role) and a random part (not only its name)."""
    return f"{owner}#{secrets.token_hex(4)}"
