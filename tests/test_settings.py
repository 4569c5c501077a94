"""Settings: defaults, ATTNLSTM_* variables, a .env file, keyword overrides, the checks,
and a Redis URL that never reaches the logs with its password."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from pydantic import ValidationError

from worker.app import _say_where
from worker.settings import WORKER_ONLY, Settings, from_flags, redact
from worker.usage import UsageError


def _settings(**values: Any) -> Settings:
    """Settings from the environment and ``values``, never from a ``.env`` file. (The
    dict keeps mypy, which sees only the fields in ``__init__``, from refusing _env_file.)"""
    return Settings(**{"_env_file": None, **values})


def test_defaults() -> None:
    s = _settings()
    assert s.redis_url is None
    assert s.url() is None
    assert (s.input_stream, s.output_stream, s.dead_stream) == (
        "sensors",
        "forecasts",
        "sensors:dead",
    )
    assert s.group == "forecasters"
    assert s.max_batch == 1024
    assert s.output_maxlen == 1_000_000
    assert s.consumer.endswith(f"-{os.getpid()}")
    assert s.url_for_logs() == "(embedded)"


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNLSTM_INPUT_STREAM", "plant:in")
    monkeypatch.setenv("ATTNLSTM_MAX_BATCH", "64")
    monkeypatch.setenv("ATTNLSTM_MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("ATTNLSTM_REDIS_URL", "redis://redis.internal:6380/2")
    s = _settings()
    assert s.input_stream == "plant:in"
    assert s.max_batch == 64
    assert s.max_wait_ms == 2.5
    assert s.url() == "redis://redis.internal:6380/2"


def test_keyword_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNLSTM_GROUP", "from-env")
    monkeypatch.setenv("ATTNLSTM_MAX_BATCH", "64")
    s = _settings(group="from-flag")
    assert s.group == "from-flag"
    assert s.max_batch == 64  # the others still come from the environment


def test_dot_env_in_the_working_directory_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(
        "ATTNLSTM_OUTPUT_STREAM=plant:out\nATTNLSTM_MAX_SERIES=7\nATTNLSTM_GROUP=from-file\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATTNLSTM_GROUP", "from-env")
    s = Settings()
    assert s.output_stream == "plant:out"
    assert s.max_series == 7
    assert s.group == "from-env"  # the environment beats the file
    assert _settings().output_stream == "forecasts"


@pytest.mark.parametrize("url", ["http://host:6379", "host:6379", "redis+sentinel://host"])
def test_unknown_url_scheme_is_rejected(url: str) -> None:
    with pytest.raises(ValidationError, match="redis_url"):
        _settings(redis_url=url)


@pytest.mark.parametrize("coverage", [0.2, 0.49, 0.995, 0.999])
def test_a_coverage_no_spread_is_measured_at_is_refused(coverage: float) -> None:
    """0.999 took the 0.99 spread and 0.3 the 0.5 one: 99.75% and 32.5% inside, only
    the online multiplier left to make it up."""
    for fine in (0, 0.5, 0.9, 0.99):
        assert _settings(coverage=fine).coverage == fine
    with pytest.raises(ValidationError, match=r"must be 0 \(no intervals\) or from 0.5 to 0.99"):
        _settings(coverage=coverage)


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_a_drift_ratio_that_is_no_rise_is_refused(ratio: float) -> None:
    """The level settles on the rolling MAE after a drift fine-tune: at 1 or less, every
    batch was a drift, and fine-tunes ran back to back for ever (a review: ten a minute,
    on after the input stopped)."""
    for fine in (0, 1.01, 1.5):
        assert _settings(drift_ratio=fine).drift_ratio == fine
    with pytest.raises(ValidationError, match=r"must be 0 \(never\) or above 1"):
        _settings(drift_ratio=ratio)


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "rediss://h:6380",
        "redis://h:6379/",
        "unix:///tmp/redis.sock",
        "unix:///tmp/redis.sock?db=3",
    ],
)
def test_known_url_schemes_are_accepted(url: str) -> None:
    assert _settings(redis_url=url).url() == url


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("redis://:secret@redis:6379/l", "what follows the host must be a database number"),
        ("redis://redis:6379/0/", "what follows the host must be a database number"),
        ("rediss://redis:6379/?db=x", "its db= must be a database number"),
        ("redis://:secret@redis:63a9/0", "its port must be a number"),
    ],
)
def test_a_url_redis_py_would_misread_is_refused_without_its_password(url: str, said: str) -> None:
    """redis-py reads a database that is not a number as none: redis://redis:6379/l
    wrote to database 0."""
    with pytest.raises(ValueError, match=said) as refused:
        from_flags(redis_url=url)
    assert "secret" not in str(refused.value)


@pytest.mark.parametrize("url", [None, "unix:///tmp/redis.sock"])
def test_cluster_mode_needs_a_tcp_url(url: str | None) -> None:
    """redis-py reaches a cluster over TCP alone: with a unix socket or the embedded
    server, the worker retried for ever."""
    with pytest.raises(ValueError, match=r"cluster is set, and .* is no Redis Cluster"):
        from_flags(redis_url=url, cluster=True)
    assert from_flags(redis_url="redis://node:7000", cluster=True).cluster


def test_a_clash_is_a_usage_error_where_a_flag_is_in_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings that do not go together: the command line's fault (exit 2) where one of
    them was given as a flag, the environment's (exit 1) where none was."""
    monkeypatch.setenv("ATTNLSTM_DEAD_STREAM", "sensors")
    with pytest.raises(ValueError, match="dead_stream and input_stream") as refused:
        from_flags(max_batch=3)
    assert not isinstance(refused.value, UsageError)
    with pytest.raises(UsageError, match="dead_stream and input_stream"):
        from_flags(input_stream="sensors")
    monkeypatch.delenv("ATTNLSTM_DEAD_STREAM")
    with pytest.raises(UsageError, match=r"block_ms .* must be at most half of socket_timeout_s"):
        from_flags(socket_timeout_s=1.0)


def test_a_dot_env_that_is_not_utf8_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_bytes(b"ATTNLSTM_MAX_BATCH=\xff\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"cannot read {tmp_path / '.env'}: not UTF-8 text"):
        from_flags()


def test_a_command_leaves_the_settings_it_does_not_read_at_their_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's .env, shared with `replay`, named a model key file only the worker's
    machine has: "bad settings: model_key_file", and replay did not run."""
    (tmp_path / ".env").write_text(
        "ATTNLSTM_MODEL_KEY_FILE=/run/secrets/model_key\nATTNLSTM_CONSUMER=a b\n"
        "ATTNLSTM_INPUT_STREAM=plant:in\nATTNLSTM_COVERAGE=1.5\nATTNLSTM_MAX_BATCH=0\n"
        "ATTNLSTM_PARTITIONS=4\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"consumer.*model_key_file: cannot read"):
        from_flags()
    settings = from_flags(unused=WORKER_ONLY)  # a bad coverage or max_batch stopped replay
    assert (settings.model_key_file, settings.input_stream) == (None, "plant:in")
    assert (settings.coverage, settings.max_batch, settings.partitions) == (0.9, 1024, 4)
    assert settings.consumer.endswith(f"-{os.getpid()}")


def test_a_command_does_not_check_the_settings_it_does_not_read_against_those_it_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's .env with a 1 s socket timeout (and block_ms and max_wait_ms to match)
    stopped `replay`: block_ms's default, 1,000 ms, which it took, was too long for it."""
    (tmp_path / ".env").write_text(
        "ATTNLSTM_SOCKET_TIMEOUT_S=1\nATTNLSTM_BLOCK_MS=400\nATTNLSTM_MAX_WAIT_MS=300\n"
        "ATTNLSTM_LEASE_TTL_MS=1000\n"
    )
    monkeypatch.chdir(tmp_path)
    assert from_flags().block_ms == 400  # the worker's own: valid together
    settings = from_flags(unused=WORKER_ONLY)
    assert (settings.socket_timeout_s, settings.block_ms) == (1.0, 1000)
    with pytest.raises(ValueError, match="block_ms"):  # read: still checked
        from_flags(block_ms=1000, unused=tuple(n for n in WORKER_ONLY if n != "block_ms"))
    with pytest.raises(ValueError, match="max_wait_ms"):  # the next check sees none unused
        from_flags(max_wait_ms=600)


def test_block_ms_must_stay_at_most_half_the_socket_timeout() -> None:
    _settings(block_ms=5000, socket_timeout_s=10.0)  # exactly half: fine
    with pytest.raises(ValidationError, match="block_ms"):
        _settings(block_ms=5001, socket_timeout_s=10.0)
    with pytest.raises(ValidationError, match="block_ms"):
        _settings(socket_timeout_s=1.5)  # the default block_ms is 1000


def test_max_wait_ms_must_stay_at_most_half_the_socket_timeout() -> None:
    """A batch's further reads block up to max_wait_ms: a longer one timed out the socket
    (and 1e300 ended in a traceback)."""
    _settings(max_wait_ms=5000.0, socket_timeout_s=10.0, lease_ttl_ms=15_000)
    with pytest.raises(ValidationError, match=r"max_wait_ms \(5001\.0\) must be at most half"):
        _settings(max_wait_ms=5001.0, socket_timeout_s=10.0, lease_ttl_ms=15_003)


def test_max_wait_ms_must_stay_at_most_a_third_of_the_lease() -> None:
    """A batch fills with no lease renewed: 1.2 s of a 1.5 s lease let the leases of the
    partitions with nothing to publish lapse, 11 re-syncs in 15 s."""
    _settings(max_wait_ms=500.0, lease_ttl_ms=1500)
    with pytest.raises(ValidationError, match=r"max_wait_ms \(1200\.0\) must be at most a third"):
        _settings(max_wait_ms=1200.0, lease_ttl_ms=1500)


@pytest.mark.parametrize(
    "field",
    [
        "max_wait_ms",
        "socket_timeout_s",
        "series_idle_s",
        "checkpoint_interval_s",
        "finetune_interval_s",
        "drift_ratio",
        "anomaly_threshold",
        "mae_halflife_s",
        "finetune_lr",
    ],
)
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_no_setting_is_infinite_or_nan(
    field: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inf passed every lower bound, then ended in an OverflowError in the worker (a batch's
    deadline, a series' idle time in ms, the socket's timeout) or turned a check off."""
    monkeypatch.setenv(f"ATTNLSTM_{field.upper()}", value)
    with pytest.raises(ValidationError, match=f"{field}\n  Input should be a finite number"):
        _settings()


def test_the_socket_timeout_is_at_most_an_hour() -> None:
    _settings(socket_timeout_s=3600.0)
    with pytest.raises(ValidationError, match="socket_timeout_s\n  Input should be less than"):
        _settings(socket_timeout_s=1e300)  # redis-py's socket refused it: OverflowError


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ({"dead_stream": "sensors"}, "dead_stream and input_stream are both 'sensors'"),
        ({"output_stream": "sensors"}, "output_stream and input_stream are both 'sensors'"),
        ({"anomalies_stream": "sensors:dead"}, "anomalies_stream and dead_stream are both"),
        ({"dead_stream": "forecasts"}, "dead_stream and output_stream are both 'forecasts'"),
        ({"models_stream": "anomalies"}, "models_stream and anomalies_stream are both"),
        ({"input_stream": "models"}, "models_stream and input_stream are both 'models'"),
    ],
)
def test_the_streams_a_worker_writes_are_apart_from_its_input_and_each_other(
    given: dict[str, Any], said: str
) -> None:
    """A dead stream that is the input fed each bad entry back in: --burst never ended."""
    with pytest.raises(ValueError, match=f"{said}.*: name another stream"):
        from_flags(**given)


@pytest.mark.parametrize(
    "field",
    ["input_stream", "output_stream", "dead_stream", "anomalies_stream", "group", "models_stream"],
)
def test_an_empty_stream_or_group_name_is_refused(field: str) -> None:
    with pytest.raises(ValidationError, match=f"{field}\n  String should have at least 1"):
        _settings(**{field: ""})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch", 0),
        ("max_series", 0),
        ("block_ms", 0),
        ("lease_ttl_ms", 999),
        ("anomaly_threshold", 0.5),  # values inside their interval would be anomalies
        ("consumer", "edge worker"),  # its attempts' marks would not parse: never dead-lettered
        ("consumer", "w" * 129),
        ("consumer", "\u00fc"),  # no client name: the worker retried for ever
        ("consumer", "w\x01"),
        # Redis refused each past 2^63 at every try: retried for ever, --burst too
        ("output_maxlen", 10**20),
        ("lease_ttl_ms", 10**20),
        ("claim_idle_ms", 10**20),
        ("history_len", 10**8),  # numpy asked for 763 GiB at the start: a traceback
        ("torch_threads", 10**11),  # "Overflow when unpacking long", naming no flag
        ("finetune_threads", 10**11),
        ("finetune_holdout", 0.01),  # a day-ahead gate: 4,800 values kept a series
        ("keep_models", 1),  # nothing left to roll back to
        ("keep_models", 10**20),  # LRANGE refused it, after the first promotion
    ],
)
def test_out_of_range_values_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        _settings(**{field: value})


def test_redact_hides_the_password() -> None:
    assert redact("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("rediss://:secret@host") == "rediss://:***@host"
    assert redact("redis://u:p%40ss@host") == "redis://u:***@host"


@pytest.mark.parametrize(
    "url", ["redis://host:6379/0", "redis://user@host", "unix:///tmp/redis.sock"]
)
def test_redact_leaves_a_url_without_password_alone(url: str) -> None:
    assert redact(url) == url


def test_url_for_logs_never_holds_the_password() -> None:
    s = _settings(redis_url="rediss://admin:hunter2@cache.example:6380/1")
    assert s.url_for_logs() == "rediss://admin:***@cache.example:6380/1"
    assert "hunter2" not in repr(s)
    assert "hunter2" not in str(s.model_dump())
    assert s.url() == "rediss://admin:hunter2@cache.example:6380/1"


@pytest.mark.parametrize(
    "url", ["unix:///run/redis.sock?db=0&password=hunter2", "redis://host:6379/0?password=hunter2"]
)
def test_url_for_logs_hides_a_password_in_the_query_string(url: str) -> None:
    assert "hunter2" not in _settings(redis_url=url).url_for_logs()


def test_keys_follow_the_stream_and_group_names() -> None:
    s = _settings(input_stream="in", output_stream="out", dead_stream="bad")
    keys = _settings(input_stream="in", group="g").keys
    assert (s.keys.input, s.keys.output, s.keys.dead, s.keys.group) == (
        "in",
        "out",
        "bad",
        "forecasters",
    )
    assert keys.state == "in:windows:g"
    assert keys.lease == "in:lease:g"
    assert _settings().keys.state == "sensors:windows:forecasters"


def test_a_password_file_fills_in_the_urls_password(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("p@ss:/word\n")  # the trailing newline is not part of it
    s = _settings(redis_url="redis://worker@redis:6379/0", redis_password_file=secret)
    assert s.url() == "redis://worker:p%40ss%3A%2Fword@redis:6379/0"
    assert s.url_for_logs() == "redis://worker@redis:6379/0"
    assert "p@ss" not in repr(s)
    unix = _settings(redis_url="unix:///run/redis.sock", redis_password_file=secret)
    assert unix.url() == "unix://:p%40ss%3A%2Fword@/run/redis.sock"


def test_a_ca_file_goes_to_redis_py_with_the_url(tmp_path: Path) -> None:
    ca = _ca_file(tmp_path)
    s = _settings(redis_url="rediss://redis:6379/0?db=1", redis_ca_file=ca)
    assert s.url() == f"rediss://redis:6379/0?db=1&ssl_ca_certs={quote(str(ca), safe='')}"


@pytest.mark.parametrize(
    ("url", "ca", "password", "message"),
    [
        ("redis://h", "ca.pem", None, "a CA file is for TLS: set a rediss:// redis_url"),
        (None, "ca.pem", None, "a CA file is for TLS"),
        ("rediss://h", "missing.pem", None, "no CA file at missing.pem"),
        ("rediss://h", "password", None, "password holds no usable CA certificate"),
        ("rediss://h", "folder", None, "cannot read folder: it is a folder"),
        (None, None, "password", "a password file needs a redis_url"),
        ("redis://u:p@h", None, "password", "redis_url has a password already"),
        ("redis://u@h", None, "missing", "cannot read missing: No such file or directory"),
        ("redis://u@h", None, "empty", "empty holds no password"),
        ("redis://u@h", None, "crlf", "crlf holds a carriage return or a line break within"),
        # A pipe held the command until something wrote to it; /dev/zero, until memory ran
        # out (/dev/null stands in for it: read, it would only be empty).
        ("redis://u@h", None, "pipe", "pipe holds no password"),
        ("redis://u@h", None, "/dev/null", "cannot read /dev/null: it is no regular file (a"),
        ("redis://u@h", None, "long", "long is over 4,096 bytes: not a password"),
        ("rediss://h", "pipe", None, "cannot read pipe: it is no regular file (a device,"),
    ],
)
def test_unusable_tls_and_password_files_are_one_line_errors(
    url: str | None,
    ca: str | None,
    password: str | None,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    _ca_file(tmp_path)
    Path("password").write_text("secret\n")
    Path("empty").write_text("\n")
    Path("crlf").write_bytes(b"secret\r\n")  # the server's entrypoint refuses it too
    Path("folder").mkdir()
    os.mkfifo("pipe")
    Path("long").write_text("x" * 4097 + "\n")
    with pytest.raises(ValueError, match="bad settings: ") as raised:
        from_flags(redis_url=url, redis_ca_file=ca, redis_password_file=password)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_password_of_4096_bytes_is_read_with_its_line_end(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("p" * 4096 + "\n")
    s = _settings(redis_url="redis://worker@redis:6379/0", redis_password_file=secret)
    assert s.url() == f"redis://worker:{'p' * 4096}@redis:6379/0"


def test_a_model_key_file_holds_the_key_and_a_short_one_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "model-key"
    key.write_text("0123456789abcdef" * 4 + "\n")  # as make-secrets.sh writes it
    monkeypatch.setenv("ATTNLSTM_MODEL_KEY_FILE", str(key))
    assert _settings().model_key() == b"0123456789abcdef" * 4
    key.write_bytes(b"0123456789abcdef" * 4 + b"\r\n")  # only this program reads it
    assert _settings().model_key() == b"0123456789abcdef" * 4
    assert _settings(model_key_file=None).model_key() is None
    key.write_text("too short\n")
    with pytest.raises(ValueError, match="bad settings: ") as raised:
        from_flags()
    assert "holds a model key of 9 characters; it needs at least 32" in str(raised.value)
    with pytest.raises(ValueError, match="cannot read missing: No such file or directory"):
        from_flags(model_key_file="missing")


def _ca_file(directory: Path) -> Path:
    """A self-signed CA certificate, ca.pem (openssl makes it)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    ca = directory / "ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=test CA", "-keyout", str(directory / "ca.key"), "-out", str(ca)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return ca


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("ssl_ca_cert=ca.pem",
         "its ssl_ca_cert= is no option of redis-py's: did you mean ssl_ca_certs=?"),
        ("foo=bar", "its foo= is no option of redis-py's"),
        ("cache_config=x",
         "redis-py refuses its query: 'str' object has no attribute 'get_cache_class'"),
        ("ssl_cert_reqs=bogus",
         "redis-py refuses its query: Invalid SSL Certificate Requirements Flag: bogus"),
    ],
)  # fmt: skip
def test_an_option_redis_py_does_not_take_is_one_line_without_the_password(
    query: str, said: str
) -> None:
    """A typo (ssl_ca_cert for ssl_ca_certs) was redis-py's TypeError at the first
    connection: a traceback of 57 lines, from every command."""
    with pytest.raises(ValueError, match=re.escape(said) + "$") as refused:
        from_flags(redis_url=f"rediss://u:secret@h:1/0?{query}")
    assert "secret" not in str(refused.value)


def test_an_option_of_another_scheme_is_named_as_such(tmp_path: Path) -> None:
    """Not "did you mean" the very option given: ssl_ca_certs= with redis:// (the s of
    rediss:// forgotten)."""
    with pytest.raises(ValueError, match=r"its ssl_ca_certs= is no option of a redis:// URL$"):
        from_flags(redis_url=f"redis://h:1/0?ssl_ca_certs={_ca_file(tmp_path)}")


def test_a_client_certificate_that_would_not_load_is_refused_before_any_connection(
    tmp_path: Path,
) -> None:
    """A key of another certificate, or a certificate that is not PEM, was a connection
    error retried for ever; an encrypted key asked for its passphrase on the terminal,
    and waited; a key with no certificate was a traceback."""
    cert, key = _ca_file(tmp_path), tmp_path / "ca.key"
    (tmp_path / "other").mkdir()
    other = _ca_file(tmp_path / "other").with_name("ca.key")
    locked = tmp_path / "locked.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:abcd",
         "-out", str(locked)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    base = "rediss://u:secret@h:1/0?"
    refusals = {
        f"ssl_certfile={cert}&ssl_keyfile={other}": "does not load: KEY_VALUES_MISMATCH",
        f"ssl_certfile={key}": "does not load: [SSL] PEM lib",
        f"ssl_certfile={cert}&ssl_keyfile={locked}": f"its ssl_keyfile= ({locked}) is encrypted: "
        "give its passphrase as ssl_password=",
        f"ssl_certfile={cert}&ssl_keyfile={locked}&ssl_password=wrong": "does not load",
        # redis-py reads the first of a key given twice, and so does the check
        f"ssl_certfile={cert}&ssl_keyfile={locked}&ssl_password=wrong&ssl_password=abcd": (
            "does not load"
        ),
        f"ssl_keyfile={key}": "its ssl_keyfile= needs the certificate of that key",
    }
    for query, said in refusals.items():
        with pytest.raises(ValueError, match=re.escape(said)) as refused:
            from_flags(redis_url=base + query)
        assert "secret" not in str(refused.value)
    for query in (
        f"ssl_certfile={cert}&ssl_keyfile={key}",
        f"ssl_certfile={cert}&ssl_keyfile={locked}&ssl_password=abcd",
    ):
        settings = from_flags(redis_url=base + query)
        assert "abcd" not in settings.url_for_logs()


def test_a_ca_file_beside_a_urls_own_ca_is_refused(tmp_path: Path) -> None:
    """redis-py took the URL's CA, and a failure then named the CA file as the one that
    failed. A URL refused for itself is the only error (not "a CA file is for TLS")."""
    ca = _ca_file(tmp_path)
    with pytest.raises(ValueError, match=r"names a CA too \(ssl_ca_certs=\): keep one"):
        from_flags(redis_url=f"rediss://h:1/0?ssl_ca_certs={ca}", redis_ca_file=ca)
    with pytest.raises(ValueError, match="database number") as refused:
        from_flags(redis_url="rediss://h:1/0/x", redis_ca_file=ca)
    assert "a CA file is for TLS" not in str(refused.value)


def test_a_url_that_turns_off_the_certificate_check_is_said_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ssl_cert_reqs=none connected to a self-signed server, and gave it the worker's
    password, without a word."""
    url = "rediss://u:secret@h:1/0?ssl_cert_reqs=none&ssl_check_hostname=False"
    settings = _settings(redis_url=url)
    assert settings.unverified() == ["ssl_cert_reqs=none", "ssl_check_hostname=False"]
    with caplog.at_level(logging.WARNING, logger="attnlstm"):
        _say_where(settings)
    assert "ssl_cert_reqs=none and ssl_check_hostname=False turns off a check" in caplog.text
    assert "secret" not in caplog.text
    # (optional verifies a server's certificate as required does, on a client's socket)
    for url in ("rediss://h:1/0?ssl_cert_reqs=optional", "rediss://h:1/0", "redis://h:1/0"):
        assert _settings(redis_url=url).unverified() == []


def test_a_password_on_the_command_line_is_said_in_a_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process list shows a worker's arguments to every user of the machine, and the
    README's "never appears in logs" did not say so of --redis-url redis://u:PASSWORD@."""
    url = "redis://u:hunter2@h:1/0"
    monkeypatch.setattr(sys, "argv", ["attnlstm", "worker", f"--redis-url={url}"])
    with caplog.at_level(logging.WARNING, logger="attnlstm"):
        _say_where(_settings(redis_url=url))  # as the flag gives it
        assert "the password in --redis-url shows in the process list" in caplog.text
        caplog.clear()
        _say_where(_settings(redis_url="redis://u@h:1/0"))  # a file holds it
        monkeypatch.setattr(sys, "argv", ["attnlstm", "worker"])
        _say_where(_settings(redis_url=url))  # ATTNLSTM_REDIS_URL gives it
    assert "process list" not in caplog.text
    assert "hunter2" not in caplog.text
