"""``attnlstm worker``: wire the settings, Redis, the model and the loop together."""

from __future__ import annotations

import errno
import logging
import sys
import time

import redis
import torch

from attnlstm.checkpoint import Checkpoint, dumps, open_checkpoint
from attnlstm.device import resolve_device
from worker.embedded import EmbeddedServerError, url_or_embedded
from worker.engine import Engine, batch_rows
from worker.loop import Worker
from worker.metrics import Metrics, serve
from worker.online.store import FILE_BYTES_MAX, check_size
from worker.settings import Settings, redact
from worker.signals import StopRequest
from worker.streams import cluster_of, connect, primaries, tls_fix, unreachable

log = logging.getLogger("attnlstm.worker")


def build_engine(settings: Settings) -> Engine | None:
    """The model file's engine on its device (CheckpointError when the file is
    missing, or over the model store's cap: the workers could not share it); None when no
    file is set: the model comes from the store, or a cold start."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.model is None:
        return None
    checkpoint = open_checkpoint(settings.model, FILE_BYTES_MAX)
    blob, _ = dumps(checkpoint.model, checkpoint.meta)  # as the store would hold it
    check_size(len(blob), f"model {checkpoint.version} ({settings.model})")
    return _engine(checkpoint, settings, str(settings.model))


def _say_where(settings: Settings) -> None:
    """The log's line of the Redis the worker uses; a warning where its URL, holding a
    password, is on the command line (the process list shows it to every user of the
    machine: redis-cli warns of its -a alike), and one where it turns off a check of the
    server's certificate."""
    if settings.redis_url is not None:
        log.info("Redis at %s", settings.url_for_logs())
        url = settings.redis_url.get_secret_value()
        if redact(url) != url and any(url in arg for arg in sys.argv):
            log.warning(
                "the password in --redis-url shows in the process list (ps) to every user "
                "of this machine: give it in a file (--redis-password-file), or the URL in "
                "ATTNLSTM_REDIS_URL"
            )
    if off := settings.unverified():
        log.warning(
            "the Redis URL's %s turns off a check of the server's TLS certificate: any "
            "server on that address may pose as Redis, and is given the password",
            " and ".join(off),
        )


def _engine(checkpoint: Checkpoint, settings: Settings, source: str) -> Engine:
    device = resolve_device(settings.device)
    batch = batch_rows(settings.max_batch, settings.batch_values, checkpoint.config.context)
    engine = Engine(checkpoint, device=device, max_batch=batch)
    log.info(
        "model %s (%d values, window %d, horizon %d) from %s on %s",
        engine.version,
        engine.context,
        engine.window,
        engine.horizon,
        source,
        device,
    )
    return engine


def _connected(url: str, settings: Settings, stop: StopRequest) -> redis.Redis | None:
    """A client for ``url``. A Redis Cluster (ATTNLSTM_CLUSTER=true) none of whose nodes
    answers yet is waited for, with backoff, as the loop waits for a server: its client
    needs a node as it is made (it used to end the worker with a traceback). So is a
    server that takes the connection and does not answer the question whether it is a
    cluster's node (a frozen server: redis-py's TimeoutError, which ended the worker).
    None: stopped while it waited."""
    delay = 0.2
    while True:
        try:
            return connect(
                url,
                socket_timeout_s=settings.socket_timeout_s,
                client_name=settings.consumer,
                cluster=settings.cluster,
            )
        except (redis.ConnectionError, redis.TimeoutError) as e:
            frozen = isinstance(e, redis.TimeoutError)
            if isinstance(e, redis.AuthenticationError) or not (settings.cluster or frozen):
                raise
            if tls_fix(e):  # no retry mends it (commands.run says what to fix)
                raise
            what = "Redis Cluster" if settings.cluster else "Redis"
            if stop.asked:  # a stop as any other (exit 0): it was an error, exit 1
                log.info("stopped while waiting for the %s: %s", what, e)
                return None
            log.warning("%s: %s; retrying in %.1f s", what, unreachable(e, url), delay)
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


def _address(settings: Settings) -> str:
    """The metrics' host:port, an IPv6 host in brackets."""
    host = settings.metrics_host
    return f"[{host}]:{settings.metrics_port}" if ":" in host else f"{host}:{settings.metrics_port}"


def _unservable(settings: Settings, error: OSError) -> str:
    """Why the metrics cannot be served, and which setting to change: the port where it
    is taken or reserved, else the host (no address of this machine, or no address)."""
    why = error.strerror or str(error)
    if error.errno in (errno.EADDRINUSE, errno.EACCES):
        fix = "choose another with --metrics-port (0 turns them off)"
    else:
        fix = "choose another with --metrics-host: an address of this machine"
        fix += " (--metrics-port 0 turns them off)"
    return f"cannot serve metrics on {_address(settings)}: {why}; {fix}"


def run_service(settings: Settings, *, burst: bool, stop: StopRequest) -> dict[str, float]:
    """The worker, with its metrics server, until a stop signal (``stop``: caught since
    the process began) or, with ``burst``, until the stream is drained; the counts of
    the run."""
    engine = build_engine(settings)
    metrics = Metrics()
    server = None
    if settings.metrics_port:
        stale_after_s = max(3 * settings.block_ms / 1000, 10.0)
        try:
            server = serve(
                metrics,
                host=settings.metrics_host,
                port=settings.metrics_port,
                stale_after_s=stale_after_s,
            )
        except OSError as e:
            raise ValueError(_unservable(settings, e)) from None
        where = _address(settings)
        log.info("metrics on %s/metrics, health on %s/healthz", where, where)
    _say_where(settings)
    gone: list[str] = []  # why the embedded server failed under the worker

    def server_gone(status: int, why: str) -> None:
        # Shut down (a stop signal sent to every process of a service, systemd's by
        # default, reaches the server too; or SHUTDOWN): a stop as any other, exit 0.
        if status == 0:
            log.warning("the embedded Redis server %s: stopping", why)
        else:
            log.error("the embedded Redis server %s: stopping", why)
            gone.append(why)
        stop.ask()

    try:
        with url_or_embedded(settings.url(), on_exit=server_gone) as url:
            client = _connected(url, settings, stop)
            if client is None:  # stopped before it had one
                _check_server(gone)
                return metrics.totals(0.0)
            worker = Worker(client, engine=engine, settings=settings, metrics=metrics, burst=burst)
            stop.route(worker.stop)
            if (nodes := cluster_of(client)) is not None:
                log.info("a Redis Cluster of %d primaries", len(primaries(nodes)))
            log.info(
                "consumer %s of group %s on %s -> %s (dead: %s)",
                settings.consumer,
                settings.group,
                settings.input_stream,
                settings.output_stream,
                settings.dead_stream,
            )
            started = time.monotonic()
            try:
                totals = worker.run()
                # With no model of its own, the store's of another shape: made again with
                # its shape, as a restart would be (its leases handed back, its windows
                # saved, what it read and did not handle pending for the next).
                while (checkpoint := worker.reshaped) is not None and not stop.asked:
                    engine = _engine(checkpoint, settings, "the model store")
                    worker = Worker(
                        client,
                        engine=engine,
                        settings=settings,
                        metrics=metrics,
                        burst=burst,
                        engine_from_store=True,
                    )
                    stop.route(worker.stop)
                    worker.run()
                    totals = metrics.totals(time.monotonic() - started)  # every worker's run
            finally:
                client.close()
            _check_server(gone)
            return totals
    finally:
        if server is not None:
            server.shutdown()


def _check_server(gone: list[str]) -> None:
    """EmbeddedServerError where the embedded server failed under the worker (killed,
    crashed): a stop, but no clean one (exit 1)."""
    if gone:
        raise EmbeddedServerError(
            f"the embedded Redis server {gone[0]}, and the worker stopped: its streams "
            "went with it (set ATTNLSTM_REDIS_URL to a Redis of your own to keep them)"
        )
