"""The one settings class. Built once by the CLI; everything else takes keyword arguments.

Precedence, highest first: command-line flags, ``ATTNLSTM_*`` environment variables,
a ``.env`` file in the working directory, the defaults below.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import socket
import ssl
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.connection import FALSE_STRINGS

from attnlstm.device import DEVICE_PATTERN, MAX_THREADS
from attnlstm.files import check_regular, open_file
from attnlstm.intervals import LEVELS
from worker.keys import Keys
from worker.streams import cluster_of
from worker.usage import UsageError

URL_SCHEMES = ("redis", "rediss", "unix")
# The streams a worker writes, each apart from the input and from one another: a dead
# stream that is the input feeds each bad entry back in, for ever.
WRITTEN_STREAMS = ("output_stream", "dead_stream", "anomalies_stream", "models_stream")
# What the commands that only write or read streams (replay, plot --from-stream, models)
# read: the server, how to reach it, and the streams' names. Every other setting is the
# worker's alone (WORKER_ONLY, below Settings), left at its default for them (from_flags):
# a worker's setting in a shared .env, its model key file or a bad coverage, stopped them.
STREAM_SETTINGS = (
    "redis_url",
    "redis_ca_file",
    "redis_password_file",
    "socket_timeout_s",
    "cluster",
    "partitions",
    "input_stream",
    "output_stream",
    "dead_stream",
    "anomalies_stream",
    "group",
    "models_stream",
)
MIN_MODEL_KEY_CHARS = 32  # deploy/make-secrets.sh writes 64 hex digits (32 random bytes)
SECRET_BYTES_MAX = 4096  # a password's or a model key's, at most (its file's line end aside)
# Past it, a number sent to Redis's functions (Lua, in doubles) is no longer exact, and
# one past 2^63 is refused by Redis at every try: the worker retried for ever.
MAX_REDIS_INT = 2**53
MAX_HISTORY_LEN = 1_000_000  # 8 MB a series: 10^8 asked numpy for 763 GiB at the start
# The fields a command never reads (from_flags' ``unused``): left at their defaults, and
# block_ms and max_wait_ms not checked against the socket timeout it does read (a
# worker's ATTNLSTM_SOCKET_TIMEOUT_S=1 made the default block_ms, 1,000, too long, and
# stopped `replay`).
_UNUSED: ContextVar[tuple[str, ...]] = ContextVar("unused", default=())


class ClashError(ValueError):
    """Settings that each validate and do not go together: a usage error where one of
    ``fields`` was given as a flag (:func:`from_flags`), as the parser's refusals are."""

    def __init__(self, message: str, *fields: str) -> None:
        super().__init__(message)
        self.fields = fields


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    # No inf or nan: every float here is a length of time, a rate or a ratio, and inf in
    # one ended in an OverflowError deep in the worker, or silently turned something off.
    model_config = SettingsConfigDict(
        env_prefix="ATTNLSTM_", env_file=".env", extra="ignore", allow_inf_nan=False
    )

    # Where Redis is: redis://[user:password@]host:port/db, rediss:// for TLS, or
    # unix:///path/to/socket. Unset: start the embedded server.
    redis_url: SecretStr | None = None
    # TLS (rediss://): the CA certificate(s) to verify the server with. Unset: the system's.
    redis_ca_file: Path | None = None
    # A file holding the password of the URL's user (a docker secret, say), for a URL
    # that has none. Like a password in the URL, it never reaches the logs.
    redis_password_file: Path | None = None
    input_stream: str = Field(default="sensors", min_length=1)
    output_stream: str = Field(default="forecasts", min_length=1)
    dead_stream: str = Field(default="sensors:dead", min_length=1)
    # values that fall far outside their interval
    anomalies_stream: str = Field(default="anomalies", min_length=1)
    group: str = Field(default="forecasters", min_length=1)
    # This worker's name in the group, and its connection's: printable ASCII without
    # spaces (what Redis takes as a client name), at most 128 characters (the marks that
    # count a poison entry's attempts carry it: worker/attempts.py).
    consumer: str = Field(default_factory=default_consumer)
    # P > 1: the input is P streams, INPUT{k} (attnlstm.partition_of), shared by a pool of
    # workers. Fixed for a deployment's life: a worker refuses data written with another.
    partitions: int = Field(default=1, ge=1, le=4096)
    # Whether Redis is a Redis Cluster (keys tagged, commands routed per node). Unset: ask
    # it (the mode HELLO replies with); set it when a cluster is down as the worker starts.
    cluster: bool | None = None

    # A checkpoint from `attnlstm train`. Unset: the store's serving version, else a
    # cold start (a first model trained from the stream; needs fine-tuning on).
    model: Path | None = None
    # A file holding the key that signs the models this worker stores and verifies the
    # ones it loads from the store (a docker secret; Redis never sees it). Unset: the
    # store is unauthenticated, as anyone who can write to the Redis may change the model.
    model_key_file: Path | None = None
    # auto (CUDA when present), cpu, cuda or cuda:N: the forms attnlstm.device.resolve_device
    # takes, checked here so that a misspelt one (ATTNLSTM_DEVICE=gpu) stops a worker at once.
    device: str = Field(default="auto", pattern=DEVICE_PATTERN)
    torch_threads: int | None = Field(default=None, ge=1, le=MAX_THREADS)  # for inference

    max_batch: int = Field(default=1024, ge=1)  # entries per model call, at most
    # Values a batch's windows hold, at most: a model that reads more than 512 values per
    # forecast is served in batches of fewer than max_batch (see worker.engine.batch_rows).
    batch_values: int = Field(default=2**19, ge=1)
    max_wait_ms: float = Field(default=5.0, ge=0)  # how long a batch may wait to fill
    block_ms: int = Field(default=1000, ge=1)  # one blocking read's longest wait
    # Must stay well above block_ms and max_wait_ms; past an hour it is no timeout.
    socket_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    output_maxlen: int = Field(default=1_000_000, ge=1, le=MAX_REDIS_INT)  # cap on `forecasts`
    # Prediction intervals' coverage (lo and hi in every forecast); 0: no intervals, no
    # anomaly events.
    coverage: float = Field(default=0.9, ge=0, lt=1)
    # A value this many interval half-widths from its one-step forecast is an anomaly: at
    # least 1, outside its interval (below 1, values inside it would be anomalies).
    anomaly_threshold: float = Field(default=5.0, ge=1)
    # An anomaly's value enters its window as the forecast it broke, held near the value
    # before it (only the first of a run): later forecasts and fine-tunes do not read it.
    stand_in_anomalies: bool = True
    max_series: int = Field(default=100_000, ge=1)  # bounds memory: series x window
    checkpoint_interval_s: float = Field(default=5.0, gt=0)  # window state to Redis
    # a dead consumer's entries, after
    claim_idle_ms: int = Field(default=30_000, ge=0, le=MAX_REDIS_INT)
    max_attempts: int = Field(default=5, ge=1)  # handlings cut short, then the dead stream
    # one worker per stream and group
    lease_ttl_ms: int = Field(default=10_000, ge=1000, le=MAX_REDIS_INT)
    metrics_port: int = Field(default=9108, ge=0, le=65535)  # /metrics, /healthz; 0: off
    metrics_host: str = "127.0.0.1"  # the address they listen on; 0.0.0.0: every interface

    # values kept per series, for fine-tuning
    history_len: int = Field(default=200, ge=2, le=MAX_HISTORY_LEN)
    # Series that keep history_len values, in all the partitions together (the first seen
    # in each); every other series keeps only its window.
    history_series: int = Field(default=10_000, ge=1)
    series_idle_s: float = Field(default=7 * 86400, ge=0)  # then its slot is freed; 0: never
    mae_halflife_s: float = Field(default=30.0, gt=0)  # the rolling MAE's half-life
    finetune_interval_s: float = Field(default=300.0, ge=0)  # between fine-tunes; 0: off
    drift_ratio: float = Field(default=1.5, ge=0)  # rolling MAE / its level: fine-tune now
    finetune_steps: int = Field(default=300, ge=1)  # optimiser steps per fine-tune
    finetune_lr: float = Field(default=1e-3, gt=0)  # peak learning rate of a fine-tune
    # The newest share of each history: the gate. Below 0.05, a day-ahead gate would keep
    # histories of thousands of values a series (horizon / holdout).
    finetune_holdout: float = Field(default=0.2, ge=0.05, lt=0.5)
    promote_margin: float = Field(default=0.02, ge=0, lt=1)  # MASE must drop this much
    finetune_threads: int = Field(default=1, ge=1, le=MAX_THREADS)  # of the fine-tuner
    # model events; versions are stored under this name
    models_stream: str = Field(default="models", min_length=1)
    keep_models: int = Field(default=5, ge=2, le=MAX_REDIS_INT)  # stored: one to roll back to

    @field_validator("redis_url")
    @classmethod
    def _known_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_url(value.get_secret_value())
        return value

    @field_validator("coverage")
    @classmethod
    def _calibrated(cls, value: float) -> float:
        # A spread is measured at LEVELS: past them it was the nearest one's (0.999 took
        # 0.99's spread, 0.3 took 0.5's), and only the online multiplier made up for it.
        if value and not LEVELS[0] <= value <= LEVELS[-1]:
            raise ValueError(
                f"must be 0 (no intervals) or from {LEVELS[0]} to {LEVELS[-1]}, the coverages "
                f"a model's spread is measured at, got {value}"
            )
        return value

    @field_validator("drift_ratio")
    @classmethod
    def _a_rise(cls, value: float) -> float:
        # The level settles on the rolling MAE after each drift fine-tune: at a ratio of 1
        # or less the MAE is always "over" it, and fine-tunes ran back to back for ever.
        if 0 < value <= 1:
            raise ValueError(
                f"must be 0 (never) or above 1 (how many times its usual level the rolling "
                f"MAE must reach), got {value}"
            )
        return value

    @field_validator("consumer")
    @classmethod
    def _client_name(cls, value: str) -> str:
        if not re.fullmatch(r"[!-~]{1,128}", value):
            raise ValueError(
                f"{value!r} is not 1-128 printable ASCII characters without spaces (what "
                "Redis takes as a client name)"
            )
        return value

    @field_validator("redis_ca_file")
    @classmethod
    def _usable_ca_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and "redis_url" in info.data:  # (else the URL's error alone)
            url = _given_url(info)
            if url is None or url.scheme != "rediss":
                raise ValueError("a CA file is for TLS: set a rediss:// redis_url")
            if any(key == "ssl_ca_certs" for key, _ in parse_qsl(url.query)):
                raise ValueError(  # redis-py took the URL's, and this one was said to fail
                    "the redis_url names a CA too (ssl_ca_certs=): keep one of the two"
                )
            try:
                check_regular(os.stat(value).st_mode)  # (a pipe held it for good)
                ssl.create_default_context(cafile=value)
            except FileNotFoundError:
                raise ValueError(f"no CA file at {value}") from None
            except ssl.SSLError as e:  # (an OSError)
                raise ValueError(f"{value} holds no usable CA certificate: {e}") from None
            except OSError as e:  # a folder, or a file this user may not read
                raise ValueError(f"cannot read {value}: {e.strerror or e}") from None
        return value

    @field_validator("redis_password_file")
    @classmethod
    def _usable_password_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        url = _given_url(info)
        if value is None:
            return value
        if url is None:
            raise ValueError("a password file needs a redis_url")
        if url.password is not None:
            raise ValueError("redis_url has a password already: keep one of the two")
        _read_secret(value, "password")
        return value

    @field_validator("model_key_file")
    @classmethod
    def _usable_model_key_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            _read_model_key(value)
        return value

    @model_validator(mode="after")
    def _block_below_timeout(self) -> Settings:
        # A read blocks for up to block_ms, and a batch's next reads for up to max_wait_ms.
        for name in ("block_ms", "max_wait_ms"):
            if name in _UNUSED.get():
                continue
            if getattr(self, name) / 1000 * 2 > self.socket_timeout_s:
                raise ClashError(
                    f"{name} ({getattr(self, name)}) must be at most half of socket_timeout_s "
                    f"({self.socket_timeout_s}), or a quiet stream looks like a dead server",
                    name,
                    "socket_timeout_s",
                )
        return self

    @model_validator(mode="after")
    def _wait_below_lease(self) -> Settings:
        """A batch fills for up to max_wait_ms with no lease renewed: past a third of a
        lease's life, those of partitions with nothing to publish lapsed batch after
        batch, each lapse a re-sync (and with other workers, a partition moved)."""
        if self.max_wait_ms * 3 > self.lease_ttl_ms:
            raise ClashError(
                f"max_wait_ms ({self.max_wait_ms}) must be at most a third of lease_ttl_ms "
                f"({self.lease_ttl_ms}), or the leases lapse while a batch fills",
                "max_wait_ms",
                "lease_ttl_ms",
            )
        return self

    @model_validator(mode="after")
    def _cluster_over_tcp(self) -> Settings:
        """redis-py reaches a cluster over TCP alone: set, with a unix socket or the
        embedded server, the worker retried for ever."""
        url = self.redis_url
        if self.cluster and (url is None or urlsplit(url.get_secret_value()).scheme == "unix"):
            where = "the embedded server" if url is None else "a unix socket"
            raise ClashError(
                f"cluster is set, and {where} is no Redis Cluster: give a redis:// or "
                "rediss:// redis_url of one of its nodes, or unset cluster",
                "cluster",
                "redis_url",
            )
        return self

    @model_validator(mode="after")
    def _distinct_streams(self) -> Settings:
        named = {"input_stream": self.input_stream}
        for name in WRITTEN_STREAMS:
            stream = getattr(self, name)
            same = next((other for other, given in named.items() if given == stream), None)
            if same is not None:
                raise ClashError(
                    f"{name} and {same} are both {stream!r}: name another stream", name, same
                )
            named[name] = stream
        return self

    @property
    def keys(self) -> Keys:
        keys = Keys(
            input=self.input_stream,
            output=self.output_stream,
            dead=self.dead_stream,
            anomalies=self.anomalies_stream,
            group=self.group,
            models=self.models_stream,
        )
        return keys.clustered() if self.cluster else keys

    def on(self, client: redis.Redis) -> Settings:
        """These settings for ``client``'s Redis (from :func:`worker.streams.connect`,
        given ``cluster``): a cluster's keys when it is one."""
        return self.model_copy(update={"cluster": cluster_of(client) is not None})

    def with_keys(self, keys: Keys) -> Settings:
        """These settings, reading and writing the streams of ``keys``."""
        return self.model_copy(
            update={
                "input_stream": keys.input,
                "output_stream": keys.output,
                "dead_stream": keys.dead,
                "anomalies_stream": keys.anomalies,
                "group": keys.group,
                "models_stream": keys.models,
                "cluster": True if keys.cluster else self.cluster,
            }
        )

    def model_key(self) -> bytes | None:
        """The model key in ``model_key_file``; None when there is none."""
        return None if self.model_key_file is None else _read_model_key(self.model_key_file)

    def url(self) -> str | None:
        """The URL to connect with (it holds the password): ``redis_url``, with the
        password of ``redis_password_file`` and the CA file (as redis-py's
        ``ssl_ca_certs`` option, which ``from_url`` takes from the query) put in."""
        if self.redis_url is None:
            return None
        url = self.redis_url.get_secret_value()
        if self.redis_password_file is None and self.redis_ca_file is None:
            return url
        if self.redis_password_file is not None:
            url = with_password(url, self.redis_password_file)
        parts = urlsplit(url)
        if self.redis_ca_file is not None:
            query = [
                *parse_qsl(parts.query, keep_blank_values=True),
                ("ssl_ca_certs", str(self.redis_ca_file)),
            ]
            parts = parts._replace(query=urlencode(query))
        return urlunsplit(parts)

    def unverified(self) -> list[str]:
        """The options of ``redis_url`` that turn off a check of the server's certificate
        (``ssl_cert_reqs=none``, ``ssl_check_hostname=false``): said in a warning, since
        any server on that address may then pose as Redis, and be given the password."""
        if self.redis_url is None:
            return []
        query = parse_qsl(urlsplit(self.redis_url.get_secret_value()).query)
        off = {"ssl_cert_reqs": ("NONE",), "ssl_check_hostname": FALSE_STRINGS}
        return [f"{key}={value}" for key, value in query if value.upper() in off.get(key, ())]

    def url_for_logs(self) -> str:
        return "(embedded)" if self.redis_url is None else redact(self.redis_url.get_secret_value())


WORKER_ONLY = tuple(name for name in Settings.model_fields if name not in STREAM_SETTINGS)


def _problem(error: ErrorDetails) -> str:
    """One of pydantic's refusals, as a user reads it: the setting, and what is wrong
    (pydantic's own "Value error, " left out; none named where the settings clash)."""
    where = ".".join(map(str, error["loc"]))
    said = error["msg"].removeprefix("Value error, ")
    return f"{where}: {said}" if where else said


def from_flags(*, unused: tuple[str, ...] = (), **given: Any) -> Settings:
    """Settings from the environment and .env, with the given (not None) values on top;
    a ValueError with every problem in one line when they do not validate (a UsageError
    where each value refused was given). The fields ``unused`` (a command that never
    reads them) keep their defaults, whatever the environment says, and are not checked
    against the others: a worker's ATTNLSTM_MODEL_KEY_FILE in a shared .env, naming a
    file only the worker's machine has, stopped `replay`."""
    given = {k: v for k, v in given.items() if v is not None}
    values = dict(given)
    fields = Settings.model_fields
    values |= {name: fields[name].get_default(call_default_factory=True) for name in unused}
    token = _UNUSED.set(unused)
    try:
        return Settings(**values)
    except UnicodeDecodeError as e:  # the only text read here that is not checked below
        raise ValueError(
            f"cannot read {Path('.env').resolve()}: not UTF-8 text (byte {e.start})"
        ) from None
    except ValidationError as e:
        problems = "; ".join(map(_problem, e.errors()))
        # Each refused value given (a flag), or clashing with one: a usage error, as the
        # parser's refusals are.
        flagged = all(_flagged(err, given) for err in e.errors())
        raise (UsageError if flagged else ValueError)(f"bad settings: {problems}") from None
    finally:
        _UNUSED.reset(token)


def _flagged(err: ErrorDetails, given: dict[str, Any]) -> bool:
    """Whether a refusal is of a value given, or of a clash with one."""
    clash = err.get("ctx", {}).get("error")
    named = clash.fields if isinstance(clash, ClashError) else err["loc"][:1]
    return any(name in given for name in named)


# The options of a URL's query that hold a secret, hidden in logs.
SECRET_OPTIONS = ("password", "ssl_password")
# What a URL's query names a file (or, the last, a folder) with, for redis-py.
URL_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")


def check_url(url: str) -> None:
    """A ValueError unless redis-py reads ``url`` as it is written (it reads a database
    that is not a number, redis://redis:6379/l, as none, and used database 0), and the
    files it names exist. The message never holds the URL (its password)."""
    parts = urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        raise ValueError(f"must start with one of {', '.join(s + '://' for s in URL_SCHEMES)}")
    try:
        parts.port  # noqa: B018 (it parses the port)
    except ValueError:
        raise ValueError("its port must be a number from 0 to 65535") from None
    # redis-py takes redis:// with no host for localhost:6379: a server no one named.
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"it names no host ({parts.scheme}://HOST:PORT)")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError("it names no socket (unix:///PATH/TO/redis.sock)")
    if parts.scheme != "unix" and not re.fullmatch(r"/?|/\d+", parts.path):
        raise ValueError("what follows the host must be a database number (/0)")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "db" and not value.isdigit() for key, value in query):
        raise ValueError("its db= must be a database number")
    _check_files(query)
    _check_options(url)
    options: dict[str, str] = {}
    for key, value in query:  # the first of a key given twice, as redis-py reads them
        options.setdefault(key, value)
    if "ssl_keyfile" in options and "ssl_certfile" not in options:  # (a traceback)
        raise ValueError("its ssl_keyfile= needs the certificate of that key, as ssl_certfile=")
    if "ssl_certfile" in options:
        _check_client_certificate(options)


def _check_files(query: list[tuple[str, str]]) -> None:
    """A ValueError unless each file the query names is there: one that is not was a
    lost connection to retry, for ever."""
    for key, value in query:
        if key in URL_FILES and not Path(value).exists():
            raise ValueError(f"its {key}= names {value}, which does not exist")
        if key in URL_FILES and key != "ssl_ca_path" and not Path(value).is_file():  # a pipe
            raise ValueError(f"its {key}= names {value}, which is no regular file")


def _check_options(url: str) -> None:
    """A ValueError where redis-py would refuse the URL's query at the first connection:
    an option it does not take (``ssl_ca_cert`` for ``ssl_ca_certs``: a traceback from
    every command), or a value it cannot read. A connection is made, not opened."""
    try:
        redis.ConnectionPool.from_url(url).make_connection()
    except TypeError as e:  # "__init__() got an unexpected keyword argument 'NAME'"
        found = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if found is None:  # (connection_class=x)
            raise ValueError(f"redis-py refuses its query: {e}") from None
        name, scheme, known = found.group(1), urlsplit(url).scheme, _connection_options()
        if name in known:  # (ssl_ca_certs in a redis:// URL)
            raise ValueError(f"its {name}= is no option of a {scheme}:// URL") from None
        near = difflib.get_close_matches(name, known, n=1)
        hint = f": did you mean {near[0]}=?" if near else ""
        raise ValueError(f"its {name}= is no option of redis-py's{hint}") from None
    except Exception as e:  # a value it cannot read, or takes for an object (cache_config):
        raise ValueError(f"redis-py refuses its query: {e}") from None  # (no password)


def _connection_options() -> list[str]:
    """The options redis-py's connections take, by name: what a URL's query may set."""
    classes = (
        redis.connection.AbstractConnection,
        redis.connection.Connection,
        redis.connection.SSLConnection,
        redis.connection.UnixDomainSocketConnection,
    )
    names = {name for c in classes for name in inspect.signature(c.__init__).parameters}
    return sorted(names - {"self", "args", "kwargs"})


def _check_client_certificate(options: dict[str, str]) -> None:
    """A ValueError unless the URL's client certificate and key load, as the first TLS
    connection loads them: a key of another certificate, or a file that is not PEM, was a
    lost connection retried for ever; an encrypted key without its ``ssl_password=``
    asked for a passphrase on the terminal, and waited."""

    def no_passphrase() -> str:
        raise ValueError(
            f"its ssl_keyfile= ({options.get('ssl_keyfile', options['ssl_certfile'])}) is "
            "encrypted: give its passphrase as ssl_password=, or a key without one"
        )

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(
            options["ssl_certfile"],
            options.get("ssl_keyfile"),
            password=options.get("ssl_password") or no_passphrase,
        )
    except ssl.SSLError as e:
        raise ValueError(
            f"its client certificate (ssl_certfile={options['ssl_certfile']}, ssl_keyfile="
            f"{options.get('ssl_keyfile', 'none')}) does not load: {e.reason or e} (both "
            "PEM, the key that of the certificate; its passphrase, if any, as ssl_password=)"
        ) from None
    except OSError as e:
        raise ValueError(f"cannot read its client certificate: {e.strerror or e}") from None


def _given_url(info: ValidationInfo) -> SplitResult | None:
    """The redis_url validated before the field at hand, split into its parts."""
    url: SecretStr | None = info.data.get("redis_url")
    return None if url is None else urlsplit(url.get_secret_value())


def with_password(url: str, password_file: Path) -> str:
    """``url`` with the password in ``password_file`` put in, beside the URL's user."""
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    password = quote(_read_secret(password_file, "password"), safe="")
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def _read_secret(path: Path, what: str, *, line_ends: str = "\n") -> str:
    """A secret file's text without the trailing ``line_ends``; a carriage return or a
    line break left within it is refused. A password's file as its bytes are: read as
    text, a Windows line end came as a newline and was stripped, where the server's
    entrypoint (deploy/redis-entrypoint.sh) hashed the carriage return into the password,
    and Redis refused the worker a password its health check passed with."""
    try:
        with open_file(path) as f:  # not /dev/zero, read until memory ran out
            data = f.read(SECRET_BYTES_MAX + 3)  # and a line end
        secret = data.decode().rstrip(line_ends)
        if len(secret.encode()) > SECRET_BYTES_MAX:
            raise ValueError(f"{path} is over {SECRET_BYTES_MAX:,} bytes: not a {what}")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not secret:
        raise ValueError(f"{path} holds no {what}")
    if "\r" in secret or "\n" in secret:
        raise ValueError(
            f"{path} holds a carriage return or a line break within its {what} (a file "
            "saved with Windows line ends?): write it as one line"
        )
    return secret


def _read_model_key(path: Path) -> bytes:
    key = _read_secret(path, "model key", line_ends="\r\n")  # read by no one else
    if len(key) < MIN_MODEL_KEY_CHARS:
        raise ValueError(
            f"{path} holds a model key of {len(key)} characters; it needs at least "
            f"{MIN_MODEL_KEY_CHARS} (deploy/make-secrets.sh writes one)"
        )
    return key.encode()


def redact(url: str) -> str:
    """The URL with its passwords (in the user part or the query: the client key's
    ``ssl_password`` too) replaced, for logs."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if parts.password is None and all(key not in SECRET_OPTIONS for key, _ in query):
        return url  # urlunsplit would also turn unix:///path into unix:/path
    if parts.password is not None:
        user = f"{parts.username}:***@" if parts.username else ":***@"
        parts = parts._replace(netloc=user + parts.netloc.rsplit("@", 1)[1])
    if any(key in SECRET_OPTIONS for key, _ in query):
        hidden = [(key, "***" if key in SECRET_OPTIONS else value) for key, value in query]
        parts = parts._replace(query=urlencode(hidden, safe="*"))
    return urlunsplit(parts)
