"""The model store in Redis: versions, the serving pointer, and the ``models`` events.

Checkpoints are stored as their safetensors bytes (they cannot run code when loaded,
and carry a SHA-256 that is checked on every load) under ``models:v:<version>``; the
last ``keep`` versions stay, and the serving one is never deleted. A fine-tune's
candidate is kept only once promoted: a rejected one would push out of the store the
versions a rollback goes back to. The command line's store (``keep`` None) prunes
nothing: the workers prune to their own ``keep_models`` at their next promotion. The
serving pointer never names a version that is not stored: setting it and deleting a
version each check the other on the server, in one step. Every change is an event
on the ``models`` stream (``trained``, ``promoted``, ``rejected``, ``rolled_back``,
``refused``), which is also how other workers learn of it.

The SHA-256 catches damage, not forgery: anyone who can write to the store can store
a model with a hash that matches. A store with a model key (a secret file; Redis never
holds it) signs each version it stores with an HMAC-SHA256 over the version and its
exact bytes, under ``models:v:<version>:sig``, and refuses a version that is unsigned
or signed with another key before reading a byte of it as a checkpoint. A version
over :data:`MODEL_BYTES_MAX` is neither stored nor fetched: its length is asked first.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import replace
from typing import cast

import redis

from attnlstm.checkpoint import Checkpoint, CheckpointError, loads
from worker.keys import Keys
from worker.lease import VERSION
from worker.streams import (
    WRONG_TYPE,
    Command,
    Entry,
    exchange,
    raise_first_error,
    range_entries,
    refused_for,
    round_trip,
    transaction,
    xadd,
)

log = logging.getLogger("attnlstm.worker")

EVENTS_MAXLEN = 10_000  # approximate cap on the models stream
SWITCHES = (b"promoted", b"rolled_back")  # events that change the serving version
SIGNED = b"attnlstm model\0"  # what a signature is of, ahead of the version and the bytes
# The most bytes a stored model may take, stored or read: a value planted under a
# version's key (up to Redis's 512 MB) is refused before it is fetched whole. The default
# models take 19 KB (hourly data) to 163 KB (quarter-hourly), 1.4 MB for 5-minute data;
# `train --hidden 1100 --layers 2`, 60 MiB, and 1,150 is over.
MODEL_BYTES_MAX = 64 * 2**20
# The most of a model file the worker and `models promote` read: a float64 file is stored
# in float32, half its size, so a file past twice the cap could never be stored.
FILE_BYTES_MAX = 2 * MODEL_BYTES_MAX


def check_size(size: int, what: str) -> None:
    """CheckpointError when ``size``, the bytes of the checkpoint of ``what``, is over
    :data:`MODEL_BYTES_MAX`: no store would take it."""
    if size > MODEL_BYTES_MAX:
        raise CheckpointError(
            f"{what} takes {size:,} bytes, over the model store's cap of {MODEL_BYTES_MAX:,}: "
            "no worker can serve it; train a smaller one (--hidden, --layers, --window, "
            "--horizon)"
        )


class ModelStore:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        keep: int | None,
        source: str,
        key: bytes | None = None,
    ) -> None:
        """``keep`` None: nothing is pruned (the command line's: it cannot know the
        workers' ``keep_models``, and pruning to its own deleted their rollback targets)."""
        self.client, self.keys, self.keep = client, keys, keep
        self.source = source  # who writes the events (a consumer name, or the CLI)
        self.key = key  # signs what is stored, verifies what is read; None: unauthenticated
        self._key_checked = False  # check_key has run: a mismatch found later is logged
        self._key_logged: str | None = None  # the mismatch last logged

    def put(self, data: bytes, version: str) -> None:
        """Store a version (again: it becomes the newest), signed when the store has a
        key, dropping the oldest past ``keep`` (if any) unless it is serving."""
        self._store(data, version)
        self._prune()

    def _store(self, data: bytes, version: str) -> bool:
        """True when the version was not stored yet; CheckpointError when ``data`` is
        over :data:`MODEL_BYTES_MAX` (no worker would read it)."""
        check_size(len(data), f"model {version}")
        k = self.keys
        signature = k.model_signature(version).encode()
        replies = transaction(
            self.client,
            [
                (b"SET", k.model(version).encode(), data),
                (b"DEL", signature)
                if self.key is None
                else (b"SET", signature, self._sign(version, data)),
                (b"LREM", k.versions.encode(), b"0", version.encode()),
                (b"LPUSH", k.versions.encode(), version.encode()),
            ],
        )
        return not replies[2]  # LREM: none removed

    def _prune(self) -> None:
        if self.keep is None:
            return
        for old in cast(list[bytes], self.client.lrange(self.keys.versions, self.keep, -1)):
            self._drop(old.decode(errors="backslashreplace"))

    def _drop(self, version: str) -> None:
        """Delete ``version`` unless it serves (``FCALL attnlstm_drop``: a rollback to it
        that lands first keeps it)."""
        k = self.keys
        keys = (k.serving, k.versions, k.model(version), k.model_signature(version))
        self.client.fcall("attnlstm_drop", len(keys), *keys, VERSION, version)

    def get(self, version: str) -> Checkpoint:
        """The stored version, verified; CheckpointError when missing or not intact (its
        key, or its signature's, holds another type of value: anyone who can write to
        the store can make it so), over :data:`MODEL_BYTES_MAX` (no more is fetched),
        or (with a key) unsigned or signed with another key. A model that an older release
        stored, under the version it gave it (:attr:`Checkpoint.former_version`), comes
        back under that version: the one the store's serving key and events name."""
        k = self.keys
        model = k.model(version).encode()
        try:
            size, signature = round_trip(
                self.client, [(b"STRLEN", model), (b"GET", k.model_signature(version).encode())]
            )
            if size > MODEL_BYTES_MAX:
                raise CheckpointError(
                    f"stored model {version} takes {size:,} bytes, over the model store's "
                    f"cap of {MODEL_BYTES_MAX:,}: not read"
                )
            # At most the cap, should it have been replaced since: the hash refuses a cut.
            data = cast(bytes, self.client.getrange(model, 0, MODEL_BYTES_MAX - 1)) if size else b""
        except redis.ResponseError as e:
            if not refused_for(e, WRONG_TYPE):
                raise
            raise CheckpointError(f"stored model {version} is not a model: {e}") from None
        if not data:  # STRLEN and GETRANGE: 0 and "" for a missing key (or an empty value)
            raise CheckpointError(f"model {version} is not in the store (or empty)")
        self._verify(version, data, signature)
        checkpoint = loads(data, source=f"stored model {version}")
        if version == checkpoint.former_version:  # stored by an older release, served on
            return replace(checkpoint, version=version)  # by its name there
        if checkpoint.version != version:
            raise CheckpointError(f"stored model {version} holds model {checkpoint.version}")
        return checkpoint

    def _sign(self, version: str, data: bytes) -> bytes:
        assert self.key is not None
        mac = hmac.new(self.key, SIGNED + version.encode() + b"\0", hashlib.sha256)
        mac.update(data)
        return mac.hexdigest().encode()

    def _verify(self, version: str, data: bytes, signature: bytes | None) -> None:
        if self.key is None:
            return
        if signature is None:
            raise CheckpointError(f"stored model {version} is not signed (this store has a key)")
        if not hmac.compare_digest(signature, self._sign(version, data)):
            raise CheckpointError(
                f"stored model {version}: bad signature (another key signed it, or it was altered)"
            )

    def check_key(self) -> None:
        """ValueError when this store has no key and the stored versions are signed:
        the workers that hold the key serve only what it signed, and a worker without
        it would serve, or store, models that nobody signed. A misconfiguration to fix
        before it serves a batch: fatal at the process's first check only. At a later
        one (a worker re-syncing, after a keyed ``models promote``) it is an error in
        the log, once until it changes, and the worker goes on serving: raising there
        stopped every worker of the fleet at its next dropped connection."""
        if self.key is not None:
            return
        signed, unsigned = self.signatures()
        first, self._key_checked = not self._key_checked, True
        if not signed:
            self._key_logged = None
            return
        problem = (
            f"{len(signed)} of the {len(signed) + len(unsigned)} models in the store "
            f"({self.keys.versions}) are signed with a model key, and this process has none: "
            "give it the key the other workers use (--model-key-file, ATTNLSTM_MODEL_KEY_FILE)"
        )
        if first:
            raise ValueError(problem)
        if problem != self._key_logged:
            log.error(
                "%s; this worker serves on (restarted, it stops until it has the key)", problem
            )
            self._key_logged = problem

    def signatures(self) -> tuple[list[str], list[str]]:
        """The stored versions that are signed, and those that are not, newest first. A
        signature's key that holds another type of value (anyone who can write to the
        store can make one) signs nothing, as :meth:`get` finds: raised here, it stopped
        every worker without a key at its next re-sync."""
        versions = self.versions()
        commands = [(b"GET", self.keys.model_signature(v).encode()) for v in versions]
        replies = exchange(self.client, commands) if commands else []
        wrong = [refused_for(r, WRONG_TYPE) for r in replies]
        raise_first_error([r for r, bad in zip(replies, wrong, strict=True) if not bad])
        signed = [r is not None and not bad for r, bad in zip(replies, wrong, strict=True)]
        return (
            [v for v, ok in zip(versions, signed, strict=True) if ok],
            [v for v, ok in zip(versions, signed, strict=True) if not ok],
        )

    def versions(self) -> list[str]:
        """The stored versions, newest first; bytes that are not UTF-8 escaped, as in
        :meth:`serving`."""
        listed = cast(list[bytes], self.client.lrange(self.keys.versions, 0, -1))
        return [v.decode(errors="backslashreplace") for v in listed]

    def serving(self) -> str | None:
        """The serving version; bytes that are not UTF-8 (anyone who can write to the
        store can write them) come back escaped, a name no stored version has, so the
        workers refuse them instead of failing to read them."""
        version = cast(bytes | None, self.client.get(self.keys.serving))
        return version.decode(errors="backslashreplace") if version is not None else None

    def set_serving(self, version: str, event: str, **fields: object) -> None:
        """Point every worker at ``version``, with its event, only while it is stored,
        in one step on the server (``FCALL attnlstm_serve``); CheckpointError when it is
        not (a newer version pushed it out since it was read)."""
        keys = (self.keys.serving, self.keys.models, self.keys.model(version))
        args = (VERSION, version, EVENTS_MAXLEN, *self._fields(version, event, fields))
        if not self.client.fcall("attnlstm_serve", len(keys), *keys, *args):
            raise CheckpointError(f"model {version} is not in the store")

    def promote(
        self, data: bytes, version: str, parent: str | None, event: str, **fields: object
    ) -> bool:
        """Store ``version`` and point every worker at it, with its event, only while
        ``parent`` (None: no version) serves (``FCALL attnlstm_promote``); False when
        another version serves by now, and then it is not kept: what was not promoted
        takes no stored version's place."""
        new = self._store(data, version)
        args = (
            VERSION,
            version,
            parent or "",
            EVENTS_MAXLEN,
            *self._fields(version, event, fields),
        )
        keys = (self.keys.serving, self.keys.models, self.keys.model(version))
        if self.client.fcall("attnlstm_promote", len(keys), *keys, *args):
            self._prune()
            return True
        if new:
            self._drop(version)
        return False

    def event(self, version: str, event: str, **fields: object) -> None:
        transaction(self.client, [self._event(version, event, fields)])

    def _event(self, version: str, event: str, fields: dict[str, object]) -> tuple[bytes, ...]:
        return (
            *xadd(self.keys.models, maxlen=EVENTS_MAXLEN),
            *self._fields(version, event, fields),
        )

    def _fields(self, version: str, event: str, fields: dict[str, object]) -> list[bytes]:
        """An event's fields and values, flat."""
        body = {
            "version": version,
            "event": event,
            "by": self.source,
            "ts": int(time.time() * 1000),
        }
        body |= {k: v for k, v in fields.items() if v is not None}
        return [str(part).encode() for pair in body.items() for part in pair]

    def events_query(self, *, after: bytes = b"-", count: int = 100) -> Command:
        """The XRANGE of up to ``count`` events after ``after``, to send on a wire."""
        start = after if after == b"-" else b"(" + after
        return (b"XRANGE", self.keys.models.encode(), start, b"+", b"COUNT", b"%d" % count)

    def events(self, *, after: bytes = b"-", count: int = 100) -> list[Entry]:
        return range_entries(
            round_trip(self.client, [self.events_query(after=after, count=count)])[0]
        )

    def recent_events(self, count: int, before: bytes | None = None) -> list[Entry]:
        """The newest ``count`` events (before the event ``before``), newest first."""
        newest = b"(" + before if before else "+"
        return cast(list[Entry], self.client.xrevrange(self.keys.models, newest, count=count))

    def last_event_id(self) -> bytes:
        last = cast(list[Entry], self.client.xrevrange(self.keys.models, count=1))
        return last[0][0] if last else b"0-0"
