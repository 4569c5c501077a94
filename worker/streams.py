"""Redis plumbing: the connection, consumer-group setup, reply shapes, paging.

Reply shapes differ between RESP2 and RESP3; they are normalised here and nowhere else.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from worker.contract import Repeated
from worker.keys import Keys

Entry = tuple[bytes, dict[bytes, bytes] | None]  # fields None: deleted from the stream
Command = tuple[bytes, ...]

# What a server or a Redis Cluster raises when it is away, refuses, or moves: the worker
# retries after these (worker/loop.py). redis-py's cluster client raises the second kind
# (RedisClusterUnreachableError, for one) when no node answers a topology refresh: not
# a RedisError, it had left the loop and killed the worker over a short outage.
REDIS_ERRORS: tuple[type[redis.RedisError], type[RedisClusterException]] = (
    redis.RedisError,
    RedisClusterException,
)


# Redis's refusals of a key that holds a value of another making (anyone with the
# worker's password can plant one): another type, and text where a count goes.
WRONG_TYPE = "WRONGTYPE"
NOT_A_COUNT = "value is not an integer or out of range"

ACL_FIX = (
    "give the URL's user that right in the server's ACL (deploy/users.acl.template lists "
    "what each command needs)"
)
# What to fix when Redis refuses a command for a reason a user set: the kind of refusal,
# the start of what Redis said, and the fix. No retry mends one, but a replica's
# READONLY (a failover in progress) may.
_FIXES: tuple[tuple[type[redis.ResponseError], str, str], ...] = (
    (
        redis.ResponseError,
        "DB index is out of range",
        "the URL's database number (redis://HOST:PORT/DB or ?db=DB) must be below the "
        "server's `databases` setting, 16 unless changed",
    ),
    (
        redis.ResponseError,
        WRONG_TYPE,
        "a key this command uses holds another type: name other streams (the command's "
        "flags, or ATTNLSTM_*_STREAM) or delete that key",
    ),
    (redis.exceptions.NoPermissionError, "", ACL_FIX),
    # A command the attnlstm functions run, refused the URL's user (an ACL file older
    # than the functions): Valkey's and Redis 7.2's words, then Redis 7.0's. Not NOPERM,
    # it was retried for ever.
    (redis.ResponseError, "ACL failure in script", ACL_FIX),
    (redis.ResponseError, "The user executing the script can't run", ACL_FIX),
    (redis.exceptions.ReadOnlyError, "", "this server is a replica: use its primary's URL"),
    (  # a call of the attnlstm functions, refused as one of another release's worker
        redis.ResponseError,
        "ATTNLSTM_VERSION",
        "the workers of another release loaded theirs: run one release on every worker (a "
        "worker loads its own at start over an older release's, never over a newer one)",
    ),
    (  # the lease's function, counting on a fence planted as text
        redis.ResponseError,
        NOT_A_COUNT,
        "a key where the worker counts (a lease's fence: sensors:fence:forecasters, by "
        "default, or a partition's, sensors{k}:fence:forecasters) holds something else: "
        "delete it, and the count starts again from 1 (each worker's writes stay fenced by "
        "its own token)",
    ),
)
# A password missing or refused (redis-py's AuthenticationError, a ConnectionError that
# no retry mends: the worker retried it for ever, and said nothing of the password).
# (`bench` reads no ATTNLSTM_* variable: the URL alone.)
URL_CREDENTIALS = "give the URL's user and password (redis://USER:PASSWORD@HOST:PORT/DB)"
CREDENTIALS_FIX = (
    f"{URL_CREDENTIALS}, or the password in a file named by ATTNLSTM_REDIS_PASSWORD_FILE"
)


def credentials_fix(password_file: Path | str | None, *, fix: str = CREDENTIALS_FIX) -> str:
    """What to fix where Redis refused the password: the one in ``password_file`` when a
    password came from one (it said to give one in the URL, beside a file that held one);
    else ``fix``."""
    if password_file:
        return f"the password in {password_file} is not the one of the URL's user: check both"
    return fix


# Something other than Redis answered (an HTTP server's "<" or "H"): redis-py's
# InvalidResponse, "Protocol error, got ... as reply type byte", says no more.
NOT_REDIS_HINT = "is the server at the URL's host and port a Redis?"
# A TLS handshake that no retry mends (the worker retried it for ever): the server's
# certificate not trusted (signed by a CA other than ATTNLSTM_REDIS_CA_FILE's, expired,
# self-signed, issued for another host), or the client's refused or missing where the
# server asks for one. A handshake cut short (an EOF: a server restarting) is retried.
TLS_VERIFY_FIX = (
    "the server's TLS certificate must be signed by the CA in ATTNLSTM_REDIS_CA_FILE, be "
    "in date, and name the URL's host (on a Redis Cluster, each address its nodes "
    "announce too)"
)
# `bench` reads no ATTNLSTM_* variable: its CA goes in the URL.
URL_TLS_VERIFY_FIX = TLS_VERIFY_FIX.replace(
    "in ATTNLSTM_REDIS_CA_FILE", "the URL names (rediss://HOST:PORT/DB?ssl_ca_certs=CA_FILE)"
)
_CLIENT_CERT_REFUSALS = frozenset(
    {"TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA"}
)
CLIENT_CERT_FIX = (
    "the server asks for a client certificate signed by a CA it trusts: give one in the "
    "URL (rediss://...?ssl_certfile=CERT&ssl_keyfile=KEY)"
)


def tls_fix(e: BaseException) -> str | None:
    """What to fix for a TLS handshake that no retry mends, behind redis-py's
    ConnectionError; None for any other error."""
    for seen in _chain(e):
        if isinstance(seen, ssl.SSLCertVerificationError):
            return TLS_VERIFY_FIX
        if isinstance(seen, ssl.SSLError) and seen.reason in _CLIENT_CERT_REFUSALS:
            return CLIENT_CERT_FIX
    return None


# A URL of the wrong scheme was retried as any lost connection is (the server may be
# restarting), with nothing said of the scheme. A server with TLS on the port resets a
# plain connection at its first command (Redis 7.0); one without it never answers a TLS
# handshake, which times out (Redis 7.0, Valkey 8.1). Each has other causes: a hint.
PLAIN_TO_TLS_HINT = "if the server takes TLS on this port, the URL must begin rediss://"
TLS_TO_PLAIN_HINT = "if the server takes no TLS on this port, the URL must begin redis://"
# A server that asks for a client certificate refuses a client without one by an alert
# that a client writing first (AUTH, with a password) never reads: it sees an EOF, as
# from a server restarting mid-handshake.
CLIENT_CERT_HINT = (
    "if the server asks for a client certificate (tls-auth-clients), give one signed by a "
    "CA it trusts in the URL (rediss://...?ssl_certfile=CERT&ssl_keyfile=KEY)"
)


def scheme_hint(e: BaseException, url: str | None) -> str | None:
    """The hint for an error that a URL of the wrong scheme gives (:data:`PLAIN_TO_TLS_HINT`,
    :data:`TLS_TO_PLAIN_HINT`), or a client certificate missing (:data:`CLIENT_CERT_HINT`);
    None for any other error, or URL (None: the embedded server's)."""
    scheme = (url or "").partition("://")[0].lower()
    for seen in _chain(e):
        if scheme == "redis" and isinstance(seen, ConnectionResetError):
            return PLAIN_TO_TLS_HINT
        if scheme == "rediss" and isinstance(seen, TimeoutError) and "handshake" in str(seen):
            return TLS_TO_PLAIN_HINT
        if scheme == "rediss" and isinstance(seen, ssl.SSLEOFError):
            return CLIENT_CERT_HINT
    return None


def _chain(e: BaseException) -> Iterator[BaseException]:
    """The error and those it was raised from or while handling, in turn, each once
    (an error raised again in a handler of its own effect makes the chain a loop)."""
    seen: set[int] = set()
    at: BaseException | None = e
    while at is not None and id(at) not in seen:
        seen.add(id(at))
        yield at
        at = at.__cause__ or at.__context__


def unreachable(e: redis.RedisError, url: str | None) -> str:
    """A connection error's words, and what to fix where it is a TLS refusal, or a hint
    where the URL's scheme may be the wrong one."""
    fix = tls_fix(e) or scheme_hint(e, url)
    return f"{str(e).removesuffix('.')}; {fix}" if fix else str(e)


def what_to_fix(e: Exception, clustered: bool, password_file: Path | None) -> str | None:
    """What an operator must fix, for a refusal that no retry mends: a password (the one
    in ``password_file``, where the worker read it from one), a TLS
    handshake (:func:`tls_fix`), those of :data:`_FIXES` (an ACL that lacks a right, a
    key of another type where a stream should be, a database that does not exist), and
    a cluster's node served as one server (``clustered`` False). None for the errors a
    retry may mend: a dropped connection, a server still loading its data, a replica's
    READONLY in a failover."""
    if not clustered and isinstance(
        e, (redis.exceptions.MovedError, redis.exceptions.ClusterCrossSlotError)
    ):  # retried every 5 s for ever: a worker started while its cluster was down
        return (
            f"Redis refused this worker ({e}): the server is a node of a Redis Cluster, "
            "which the worker took for one server (it did not answer when the worker "
            "started, or ATTNLSTM_CLUSTER is false): set ATTNLSTM_CLUSTER=true"
        )
    if isinstance(e, redis.AuthenticationError):
        return f"Redis refused this worker ({e}); {credentials_fix(password_file)}"
    if isinstance(e, redis.ConnectionError) and (fix := tls_fix(e)) is not None:
        return f"no TLS connection to Redis ({e}): {fix}"
    if not isinstance(e, redis.ResponseError) or isinstance(e, redis.exceptions.ReadOnlyError):
        return None
    if (fix := fix_for(e)) is None:
        return None
    who = "this worker's user a command" if fix == ACL_FIX else "this worker"
    return f"Redis refused {who} ({e}); {fix}"


# redis-py's words ahead of a pipeline's refusal: "Command # 1 (GET k) of pipeline caused
# error: WRONGTYPE ...". A refusal of :data:`_FIXES` so prefixed was retried for ever.
PIPELINE_ERROR = " of pipeline caused error: "


def fix_for(e: redis.ResponseError) -> str | None:
    """What to fix for a refusal of :data:`_FIXES`; None for any other."""
    for kind, start, fix in _FIXES:
        if isinstance(e, kind) and refused_for(e, start):
            return fix
    return None


def refused_for(e: object, *starts: str) -> bool:
    """True where ``e`` is a refusal by Redis whose words start with one of ``starts``
    (:data:`WRONG_TYPE`, :data:`NOT_A_COUNT`), in a pipeline's reply or alone."""
    if not isinstance(e, redis.ResponseError):
        return False
    said = str(e).partition(PIPELINE_ERROR)[2] or str(e)
    return said.startswith(starts)


class OutOfStepError(Exception):
    """The worker's windows no longer match the consumer group (a lost reply, a reset
    group, a lost lease, entries pending outside any batch): re-sync before going on."""


def connect(
    url: str, *, socket_timeout_s: float, client_name: str, cluster: bool | None = None
) -> redis.Redis:
    """A client that never retries behind our back.

    redis-py retries a command silently after a connection error; for XREADGROUP ``>``
    that hands the first reply's entries to this consumer and throws them away. The
    worker handles every connection error itself and then re-syncs with the group.

    A Redis Cluster (``cluster``: True; None: ask the server, ``HELLO``) gets
    redis-py's cluster client, found from the one node in ``url``. It has the same
    commands, each routed to its key's node, and is typed here as the plain client
    (redis-py leaves its own class untyped); :func:`cluster_of` tells them apart.
    """
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": min(socket_timeout_s, 5.0),
        "retry": Retry(NoBackoff(), 0),
        "client_name": client_name,
    }
    if cluster is None:
        cluster = _cluster_enabled(redis.Redis.from_url(url, **options))
    if not cluster:
        return redis.Redis.from_url(url, **options)
    try:
        return cast(redis.Redis, RedisCluster.from_url(url, **options))
    except redis.exceptions.RedisClusterException as e:
        failure = _cluster_failure(e)
    # Raised here, not in the handler: there, the cause raised again took the handler's
    # error for its context, whose cause it is, and lost the SSL error it came from. The
    # TLS check went round that loop for ever, at full CPU (even SIGTERM did not end it).
    raise failure


def _cluster_failure(e: RedisClusterException) -> BaseException:
    """What the cluster client's failure to start is raised as: its cause where no retry
    mends that (a password, a TLS certificate), a ConnectionError where no node
    answered, else a ValueError."""
    cause = e.__cause__
    if isinstance(cause, redis.AuthenticationError) or (cause and tls_fix(cause)):
        return cause
    if cause is None or isinstance(cause, (redis.ConnectionError, redis.TimeoutError, OSError)):
        return redis.ConnectionError(f"no node of the Redis Cluster answered: {e}")
    # A user who may not ask for the slots, or a node of no cluster: it was retried for
    # ever, as if no node answered. redis-py says "Cluster mode is not enabled" of both.
    if any(isinstance(seen, redis.exceptions.NoPermissionError) for seen in _chain(e)):
        return ValueError(f"Redis refused the URL's user CLUSTER SLOTS; {ACL_FIX}")
    return ValueError(
        f"{e}: the URL's server is no node of a Redis Cluster (unset ATTNLSTM_CLUSTER "
        "for one server)"
    )


def _cluster_enabled(client: redis.Redis) -> bool:
    """What HELLO says the server's mode is (a command every user may run, unlike INFO),
    on a connection of its own (HELLO 2 sets the protocol it speaks), closed after."""
    try:
        reply = client.execute_command("HELLO", "2")  # type: ignore[no-untyped-call]
    except redis.ConnectionError:
        return False  # not up yet (the worker waits for it): one server, unless told
    except redis.ResponseError:
        return False  # no HELLO: older than Redis 6, so no cluster the worker could use
    finally:
        client.close()
    pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
    mode = {as_str(k): v for k, v in pairs}.get("mode")
    return as_str(mode) == "cluster" if mode is not None else False


def as_str(value: bytes | str) -> str:
    """A reply's string, as bytes (the worker's clients) or str (decoding clients)."""
    return value.decode() if isinstance(value, bytes) else value


def cluster_of(client: redis.Redis) -> RedisCluster | None:
    """The cluster client ``client`` is (see :func:`connect`), or None: one server."""
    some: object = client
    return some if isinstance(some, RedisCluster) else None


def keys_on(client: redis.Redis, keys: Keys) -> Keys:
    """``keys`` as named on ``client``'s Redis: :meth:`Keys.clustered` on a cluster."""
    return keys.clustered() if cluster_of(client) else keys


def primaries(client: RedisCluster) -> list[ClusterNode]:
    """Every primary; ``node.redis_connection`` is a plain :class:`redis.Redis` to it."""
    nodes: list[ClusterNode] = client.get_primaries()  # type: ignore[no-untyped-call]
    return nodes


def id_key(entry_id: bytes) -> tuple[int, int]:
    """An entry id as a tuple that sorts like the stream."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def entries_of(reply: Any) -> list[Entry]:
    """The entries of an XREAD/XREADGROUP reply for one stream, RESP2 or RESP3."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {stream: [[entries]]}
        (value,) = reply.values()
        return list(value[0]) if value and isinstance(value[0], list) else list(value)
    return list(reply[0][1])  # RESP2: [[stream, [entries]]]


def read_group(keys: Keys, consumer: str, count: int, block_ms: int | None) -> Command:
    """XREADGROUP of up to ``count`` new entries for ``consumer``, waiting up to
    ``block_ms`` for one (None: not at all), to send on a :class:`Wire`."""
    return read_groups(keys.group, consumer, [keys.input], count, block_ms)


def read_groups(
    group: str, consumer: str, inputs: Sequence[str], count: int, block_ms: int | None
) -> Command:
    """:func:`read_group` on several streams at once (one server's, or one slot's in a
    cluster): up to ``count`` entries from each, and a blocked read returns once any
    of them has one."""
    block = () if block_ms is None else (b"BLOCK", b"%d" % block_ms)
    return (b"XREADGROUP", b"GROUP", group.encode(), consumer.encode(), b"COUNT",
            b"%d" % count, *block, b"STREAMS", *(name.encode() for name in inputs),
            *(b">" for _ in inputs))  # fmt: skip


def _entry(raw: Any) -> Entry:
    entry_id, flat = raw
    if flat is None:
        return entry_id, None
    pairs = iter(flat)
    fields = dict(zip(pairs, pairs, strict=True))
    return entry_id, fields if 2 * len(fields) == len(flat) else Repeated(flat)


def range_entries(reply: Any) -> list[Entry]:
    """The entries of an XRANGE reply read straight off a connection (a :class:`Wire`)."""
    return [_entry(raw) for raw in reply or ()]


def read_entries(reply: Any) -> list[Entry]:
    """The entries of an XREADGROUP reply for one stream read straight off a connection:
    ``[[stream, entries]]`` in RESP2, ``{stream: entries}`` in RESP3, nil when none came;
    an error reply (a refusal: a right the user lacks) raised."""
    raise_first_error([reply])
    if not reply:
        return []
    (raw,) = reply.values() if isinstance(reply, dict) else (reply[0][1],)
    return range_entries(raw)


def read_streams(reply: Any) -> dict[bytes, list[Entry]]:
    """The entries of an XREADGROUP reply for several streams read straight off a
    connection, by stream name: only the streams that had some; an error reply raised."""
    raise_first_error([reply])
    if not reply:
        return {}
    pairs = reply.items() if isinstance(reply, dict) else reply
    return {name: range_entries(raw) for name, raw in pairs}


def xadd(key: str, *, maxlen: int | None) -> Command:
    """The head of an XADD to ``key``, capped at about ``maxlen`` entries when given;
    the fields follow it."""
    cap = () if maxlen is None else (b"MAXLEN", b"~", b"%d" % maxlen)
    return (b"XADD", key.encode(), *cap, b"*")


def pages(
    client: redis.Redis,
    key: str,
    *,
    first: bytes = b"-",
    last: bytes = b"+",
    count: int = 10_000,
    newest_first: bool = False,
) -> Iterator[list[Entry]]:
    """The stream's entries from ``first`` to ``last`` (XRANGE bounds: an id, ``(id``
    to leave it out, ``-`` or ``+``), ``count`` at a time, oldest first; with
    ``newest_first``, from ``last`` back to ``first``. Read as the live path reads
    them (:func:`range_entries`): redis-py's own parsing keeps the last of a field named
    twice, so a re-sync would have forecast an entry the live read dead-lettered."""
    while True:
        bounds = (last, first) if newest_first else (first, last)
        query = (b"XREVRANGE" if newest_first else b"XRANGE", key.encode(), *bounds)
        page = range_entries(round_trip(client, [(*query, b"COUNT", b"%d" % count)])[0])
        if not page:
            return
        yield page
        if newest_first:
            last = b"(" + page[-1][0]
        else:
            first = b"(" + page[-1][0]


def _pack(command: Command) -> bytes:
    """The command in Redis's protocol (RESP): one join of its arguments and their
    headers. hiredis.pack_command copies large arguments at about 600 MB/s: 4.3 ms for
    the publish of a batch of 1,024 day-ahead forecasts (2.9 MB), where this takes 1.2
    (and 1.1 against 0.8 for 1,024 one-step forecasts)."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(parts)


class Wire:
    """One connection on which commands are sent now and their replies read later, in
    the order sent.

    Commands are packed in one join each, and the replies read straight off the
    connection (by hiredis), which is 2-3x faster than redis-py's pipeline with its
    per-command Python bookkeeping. The worker sends the next read before it forecasts
    the batch in hand, and reads a transaction's reply during the next batch, so that
    Redis works while the model does. Any error drops the connection, so nothing half-read is left
    on it; the next send takes a new one.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._conn: Any = None
        self._sent: deque[int] = deque()  # replies due, per send, oldest first

    @property
    def waiting(self) -> int:
        """Sends whose replies are not read yet."""
        return len(self._sent)

    def send(self, commands: Sequence[Command]) -> None:
        if self._conn is None:
            self._conn = self._pool.get_connection()
        try:
            self._conn.send_packed_command(
                [b"".join(_pack(c) for c in commands)], check_health=False
            )
        except BaseException:
            self.drop()
            raise
        self._sent.append(len(commands))

    def receive(self) -> list[Any]:
        """The replies to the oldest send not read yet; an error reply is returned in
        its place as a ResponseError, not raised."""
        due = self._sent.popleft()
        replies: list[Any] = []
        try:
            for _ in range(due):
                try:
                    replies.append(self._conn.read_response())
                except redis.ResponseError as e:
                    replies.append(e)
        except BaseException:
            self.drop()
            raise
        return replies

    def drop(self) -> None:
        """Disconnect, forgetting every reply still due."""
        self._sent.clear()
        if self._conn is not None:
            self._conn.disconnect()
            self._pool.release(self._conn)
            self._conn = None

    def close(self) -> None:
        """Give the connection back to the pool (dropped if replies are still due)."""
        if self._sent:
            self.drop()
        elif self._conn is not None:
            self._pool.release(self._conn)
            self._conn = None


def routing_key(command: Command) -> bytes | None:
    """The key that decides which cluster node runs ``command`` (all of its keys share
    one slot, or the node refuses it), or None: it has none (MULTI, EXEC, a function
    called with no keys)."""
    name = command[0].upper()
    if name in (b"FCALL", b"FCALL_RO", b"EVALSHA", b"EVAL"):
        return command[3] if int(command[2]) else None
    if name in (b"XREADGROUP", b"XREAD"):
        # Past GROUP, the group and the consumer: either may be named STREAMS.
        return command[command.index(b"STREAMS", 4 if name == b"XREADGROUP" else 1) + 1]
    if name in (b"MULTI", b"EXEC", b"PING", b"TIME") or len(command) < 2:
        return None
    return command[1]


class Wires:
    """:class:`Wire` for a single server or a Redis Cluster: commands sent now, their
    replies read later, in the order sent.

    In a cluster each command goes on a connection to the primary of its key's slot; a
    command with no key goes with its neighbours (MULTI with the command after it,
    EXEC with the one before), so a transaction stays on one node. Each node gets one
    send, and a send's replies are put back in the order of its commands. A MOVED or
    ASK reply (slots moved between nodes) refreshes the client's slot table for the
    next send; the reply itself stays an error, as every error does.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._cluster = cluster_of(client)
        self._single = None if self._cluster else Wire(client)
        self._nodes: dict[str, Wire] = {}
        self._plans: deque[list[tuple[Wire, list[int]]]] = deque()  # per send, oldest first

    @property
    def waiting(self) -> int:
        """Sends whose replies are not read yet."""
        return self._single.waiting if self._single else len(self._plans)

    def send(self, commands: Sequence[Command]) -> None:
        if self._single:
            self._single.send(commands)
            return
        plan: dict[int, tuple[Wire, list[int]]] = {}
        for index, wire in enumerate(self._route(commands)):
            plan.setdefault(id(wire), (wire, []))[1].append(index)
        try:
            for wire, indices in plan.values():
                wire.send([commands[i] for i in indices])
        except BaseException:
            self.drop()
            raise
        self._plans.append(list(plan.values()))

    def receive(self) -> list[Any]:
        """As :meth:`Wire.receive`."""
        if self._single:
            return self._single.receive()
        replies: list[Any] = []
        try:
            plan = self._plans.popleft()
            replies = [None] * sum(len(indices) for _, indices in plan)
            for wire, indices in plan:
                for index, reply in zip(indices, wire.receive(), strict=True):
                    replies[index] = reply
        except BaseException:
            self.drop()
            raise
        if any(redirected(reply) for reply in replies):
            self._refresh()
        return replies

    def drop(self) -> None:
        """Disconnect, forgetting every reply still due."""
        for wire in self._wires():
            wire.drop()
        self._plans.clear()

    def close(self) -> None:
        """Give the connections back (dropped if replies are still due)."""
        if self._plans:
            self.drop()
        for wire in self._wires():
            wire.close()

    def _wires(self) -> list[Wire]:
        return [self._single] if self._single else list(self._nodes.values())

    def _route(self, commands: Sequence[Command]) -> list[Wire]:
        assert self._cluster is not None
        keys = [routing_key(command) for command in commands]
        nodes: list[Wire | None] = [None if key is None else self._wire(key) for key in keys]
        for i, command in enumerate(commands):  # the keyless go with their neighbours
            if nodes[i] is None:
                before = [n for n in reversed(nodes[:i]) if n is not None]
                after = [n for n in nodes[i + 1 :] if n is not None]
                first, second = (
                    (after, before) if command[0].upper() == b"MULTI" else (before, after)
                )
                nodes[i] = (first or second or [self._default()])[0]
        return [node for node in nodes if node is not None]

    def _wire(self, key: bytes) -> Wire:
        assert self._cluster is not None
        node: ClusterNode = self._cluster.get_node_from_key(key)  # type: ignore[no-untyped-call]
        return self._node_wire(node)

    def _default(self) -> Wire:
        assert self._cluster is not None
        node: ClusterNode = self._cluster.get_default_node()  # type: ignore[no-untyped-call]
        return self._node_wire(node)

    def _node_wire(self, node: ClusterNode) -> Wire:
        wire = self._nodes.get(node.name)
        if wire is None:
            if node.redis_connection is None:
                assert self._cluster is not None
                self._cluster.nodes_manager.create_redis_connections([node])  # type: ignore[no-untyped-call]
            wire = self._nodes[node.name] = Wire(node.redis_connection)
        return wire

    def _refresh(self) -> None:
        assert self._cluster is not None
        ask_for_slots(self._cluster)


def ask_for_slots(cluster: RedisCluster) -> None:
    """Ask the cluster for its slot table again (from any node that answers): after a
    MOVED reply, or a node lost, whose replica may have taken its place."""
    cluster.nodes_manager.initialize()


def redirected(reply: Any) -> bool:
    """A MOVED or ASK reply (redis-py's MovedError is an AskError): a cluster's node
    that does not hold the key's slot (now: a failover, a resharding) ran nothing."""
    return isinstance(reply, redis.exceptions.AskError)


def words(e: Exception) -> str:
    """An error's text, a cluster's redirect named: redis-py leaves ``MOVED`` or ``ASK``
    out of it (``1584 127.0.0.1:7604``)."""
    if redirected(e):
        return f"{'MOVED' if isinstance(e, redis.exceptions.MovedError) else 'ASK'} {e}"
    return str(e)


def exchange(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    """Send the commands in one write (one per node, in a cluster) and read one reply
    each (see :class:`Wires`), a refusal in place of its command's reply."""
    wires = Wires(client)
    try:
        wires.send(commands)
        return wires.receive()
    finally:
        wires.close()


def raise_first_error(replies: Sequence[Any]) -> None:
    for reply in replies:
        if isinstance(reply, redis.ResponseError):
            raise reply


def round_trip(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    """The commands in one round trip, not atomic; their replies (the first error is
    raised, after every reply was read)."""
    replies = exchange(client, commands)
    raise_first_error(replies)
    return replies


def multi_exec(commands: Sequence[Command]) -> list[Command]:
    """The commands wrapped in MULTI and EXEC; :func:`executed` reads the replies."""
    return [(b"MULTI",), *commands, (b"EXEC",)]


def executed(replies: Sequence[Any]) -> list[Any]:
    """The EXEC reply of a :func:`multi_exec`'s replies. A command refused at queue
    time aborts the EXEC; either way the first error is raised."""
    raise_first_error(replies[:-1])  # +OK for MULTI, +QUEUED for each command
    result = replies[-1]
    if isinstance(result, redis.ResponseError):
        raise result
    raise_first_error(result)
    return cast(list[Any], result)


def transaction(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    """MULTI, the commands, EXEC, in one round trip; the EXEC reply."""
    return executed(exchange(client, multi_exec(commands)))


def ensure_group(client: redis.Redis, keys: Keys) -> bool:
    """Create the group from the start of the stream (and the stream) if missing.
    True when it was created."""
    try:
        client.xgroup_create(keys.input, keys.group, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" in str(e):
            return False
        raise
    return True


def stream_info(client: redis.Redis, key: str) -> dict[str, Any] | None:
    """XINFO STREAM of ``key``; None when there is no such stream."""
    try:
        info: dict[str, Any] = client.xinfo_stream(key)
    except redis.ResponseError as e:
        if "no such key" in str(e).lower():
            return None
        raise
    return info


def group_info(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    groups: list[dict[str, Any]] = client.xinfo_groups(keys.input)
    for info in groups:
        name = info["name"]
        if as_str(name) == keys.group:
            return info
    raise redis.ResponseError(f"NOGROUP no group {keys.group!r} on stream {keys.input!r}")
