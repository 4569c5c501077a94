"""The model store in Redis: versions, the serving pointer, and the ``models`` events.

Checkpoints are stored as their safetensors bytes (they cannot run code when loaded,
and carry a SHA-256 that is checked on every load) under ``models:v:<version>``; the
last ``keep`` versions stay, and the serving one is never deleted. Every change is an
event on the ``models`` stream (``trained``, ``promoted``, ``rejected``,
``rolled_back``, ``refused``), which is also how other workers learn of it.
"""

from __future__ import annotations

import time
from typing import cast

import redis

from attnlstm.checkpoint import Checkpoint, CheckpointError, loads
from worker.keys import Keys
from worker.streams import Command, Entry, range_entries, round_trip, transaction, xadd

EVENTS_MAXLEN = 10_000  # approximate cap on the models stream
SWITCHES = (b"promoted", b"rolled_back")  # events that change the serving version


class ModelStore:
    def __init__(self, client: redis.Redis, keys: Keys, *, keep: int, source: str) -> None:
        self.client, self.keys, self.keep = client, keys, keep
        self.source = source  # who writes the events (a consumer name, or the CLI)

    def put(self, data: bytes, version: str) -> None:
        """Store a version (again: it becomes the newest), dropping the oldest past
        ``keep`` unless it is serving."""
        k = self.keys
        transaction(
            self.client,
            [
                (b"SET", k.model(version).encode(), data),
                (b"LREM", k.versions.encode(), b"0", version.encode()),
                (b"LPUSH", k.versions.encode(), version.encode()),
            ],
        )
        serving = self.serving()
        for old in cast(list[bytes], self.client.lrange(k.versions, self.keep, -1)):
            if old.decode() != serving:
                self.client.delete(k.model(old.decode()))
                self.client.lrem(k.versions, 0, old.decode())

    def get(self, version: str) -> Checkpoint:
        """The stored version, verified; CheckpointError when missing or not intact."""
        data = cast(bytes | None, self.client.get(self.keys.model(version)))
        if data is None:
            raise CheckpointError(f"model {version} is not in the store")
        checkpoint = loads(data, source=f"stored model {version}")
        if checkpoint.version != version:
            raise CheckpointError(f"stored model {version} holds model {checkpoint.version}")
        return checkpoint

    def versions(self) -> list[str]:
        return [
            v.decode() for v in cast(list[bytes], self.client.lrange(self.keys.versions, 0, -1))
        ]

    def serving(self) -> str | None:
        version = cast(bytes | None, self.client.get(self.keys.serving))
        return version.decode() if version is not None else None

    def set_serving(self, version: str, event: str, **fields: object) -> None:
        """Point every worker at ``version``, with its event, in one transaction."""
        transaction(
            self.client,
            [
                (b"SET", self.keys.serving.encode(), version.encode()),
                self._event(version, event, fields),
            ],
        )

    def event(self, version: str, event: str, **fields: object) -> None:
        transaction(self.client, [self._event(version, event, fields)])

    def _event(self, version: str, event: str, fields: dict[str, object]) -> tuple[bytes, ...]:
        body = {
            "version": version,
            "event": event,
            "by": self.source,
            "ts": int(time.time() * 1000),
        }
        body |= {k: v for k, v in fields.items() if v is not None}
        flat = [str(part).encode() for pair in body.items() for part in pair]
        return (*xadd(self.keys.models, maxlen=EVENTS_MAXLEN), *flat)

    def events_query(self, *, after: bytes = b"-", count: int = 100) -> Command:
        """The XRANGE of up to ``count`` events after ``after``, to send on a wire."""
        start = after if after == b"-" else b"(" + after
        return (b"XRANGE", self.keys.models.encode(), start, b"+", b"COUNT", b"%d" % count)

    def events(self, *, after: bytes = b"-", count: int = 100) -> list[Entry]:
        return range_entries(
            round_trip(self.client, [self.events_query(after=after, count=count)])[0]
        )

    def recent_events(self, count: int) -> list[Entry]:
        """The newest ``count`` events, newest first."""
        return cast(list[Entry], self.client.xrevrange(self.keys.models, count=count))

    def last_event_id(self) -> bytes:
        last = cast(list[Entry], self.client.xrevrange(self.keys.models, count=1))
        return last[0][0] if last else b"0-0"
