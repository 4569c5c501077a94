"""One read's entries sorted out, and the commands that publish them: pure, no I/O.

The loop in worker/service.py reads, forecasts and sends; this decides what each entry
becomes (a forecast, a dead letter, only an ack, or nothing at all) and spells out the
commands of the batch's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from worker.contract import (
    Fields,
    dead_fields,
    forecast_fields,
    fraction_rows,
    json_rows,
    parse,
)
from worker.keys import Keys
from worker.streams import Command, Entry, id_key


@dataclass
class Batch:
    """One read's entries, sorted out: what to ack, dead-letter, and forecast."""

    acks: list[bytes] = field(default_factory=list)
    dead: list[tuple[bytes, Fields, str]] = field(default_factory=list)  # id, fields, reason
    # The valid readings, in stream order:
    ids: list[bytes] = field(default_factory=list)
    fields: list[Fields] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    publish: list[bool] = field(default_factory=list)  # False: acked before, replay only


def sort_out(
    entries: Sequence[Entry],
    *,
    pending: dict[bytes, int] | None,
    known: dict[bytes, str],
    last_id: bytes,
    max_deliveries: int,
) -> Batch:
    """``pending`` None: a live read, every entry new to us. Otherwise the entries
    still pending, with their delivery counts: the others were acked before and only go
    back into the windows. Entries at or before ``last_id`` (the windows' state) are
    acked and nothing else; ``known`` caches series ids already validated."""
    batch = Batch()
    handled = handled_before(entries, last_id)
    for k, (entry_id, fields) in enumerate(entries):
        ours = pending is None or entry_id in pending
        if ours:
            batch.acks.append(entry_id)
        if fields is None or k < handled:
            continue  # deleted, or handled before the state was saved
        if pending is not None and pending.get(entry_id, 0) > max_deliveries:
            reason = f"delivered {pending[entry_id]} times without being handled"
            batch.dead.append((entry_id, fields, reason))
            continue
        reading = parse(entry_id, fields, known)
        if isinstance(reading, str):
            if ours:
                batch.dead.append((entry_id, fields, reading))
            continue
        batch.ids.append(entry_id)
        batch.fields.append(fields)
        batch.names.append(reading.series)
        batch.values.append(reading.value)
        batch.ts.append(reading.ts)
        batch.publish.append(ours)
    return batch


def handled_before(entries: Sequence[Entry], last_id: bytes) -> int:
    """How many leading entries the state at ``last_id`` already reflects (reads come
    in id order, so only a batch that starts at or before it needs looking at)."""
    last = id_key(last_id)
    if not entries or id_key(entries[0][0]) > last:
        return 0
    return next(
        (k for k, (entry_id, _) in enumerate(entries) if id_key(entry_id) > last),
        len(entries),
    )


def batch_commands(
    batch: Batch,
    rows: np.ndarray,
    yhat: np.ndarray,
    attn: np.ndarray,
    keys: Keys,
    *,
    maxlen: int,
    version: bytes,
) -> list[Command]:
    """The forecasts of the batch positions ``rows`` (with their ``yhat`` and ``attn``),
    the dead letters and the ack, as the commands of one transaction."""
    output = (b"XADD", keys.output.encode(), b"MAXLEN", b"~", b"%d" % maxlen, b"*")
    commands: list[Command] = [
        (*output, *forecast_fields(batch.names[i], batch.ids[i], batch.ts[i], y, a, version))
        for i, y, a in zip(rows.tolist(), json_rows(yhat), fraction_rows(attn), strict=True)
    ]
    dead = (b"XADD", keys.dead.encode(), b"MAXLEN", b"~", b"%d" % maxlen, b"*")
    for entry_id, fields, reason in batch.dead:
        flat = [part for pair in dead_fields(fields, entry_id, reason).items() for part in pair]
        commands.append((*dead, *flat))
    if batch.acks:
        commands.append((b"XACK", keys.input.encode(), keys.group.encode(), *batch.acks))
    return commands
