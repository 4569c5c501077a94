"""Handling attempts, counted by the worker rather than by Redis's delivery count.

Redis counts a delivery each time an entry is read or claimed, so a worker whose
connection keeps dropping sees valid entries "delivered" again and again without ever
having failed to handle them. What marks a poison entry is different: handling it was
started and never finished, because the process died in the middle.

So the worker keeps one mark in Redis (``Keys.handling``): the process holding the
lease (its token) handles the entries after an id, and how many earlier attempts at
them ended without an ack. Every publish moves the mark past the entries it acks
(attempts 0), in the same atomic step as the acks. A process that re-syncs and finds
another process's mark knows that one stopped while handling the pending entries after
its id: one more attempt each. Before it handles them it writes the mark with that
count, so an attempt counts only once handling has started: a worker killed while it
starts up, or a dropped connection (the same process re-syncs; same token), adds
nothing. From the second attempt the suspects are handled one at a time, so a poison
entry is caught alone; at ``max_attempts`` it goes to the dead stream unhandled.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from worker.streams import Entry, id_key

ALONE_FROM = 2  # from this attempt on, a suspect entry is handled alone
_ID = rb"\d{1,20}-\d{1,20}"
_MARK = re.compile(rb"(%s) (%s|\+) (\d{1,9}) (\S{1,200})" % (_ID, _ID))


@dataclass(frozen=True)
class Mark:
    """Process ``token`` handles the entries after ``after`` (up to ``until``, when
    one is handled alone; None: all); ``attempts`` earlier attempts at them ended
    without an ack."""

    after: bytes
    attempts: int
    token: str
    until: bytes | None = None

    def encode(self) -> bytes:
        until = self.until or b"+"
        return b"%s %s %d %s" % (self.after, until, self.attempts, self.token.encode())

    @classmethod
    def decode(cls, raw: bytes | None) -> Mark | None:
        """The mark, or None when there is none (or it is not one: tampered)."""
        match = _MARK.fullmatch(raw) if raw is not None else None
        if match is None:
            return None
        until = None if match[2] == b"+" else match[2]
        return cls(match[1], int(match[3]), match[4].decode(errors="replace"), until)


def attempts_of(mark: Mark | None, pending: list[bytes], token: str) -> dict[bytes, int]:
    """Each pending entry's attempts so far. Those the mark covers were being handled
    when its process stopped, which counts as one more when that was another process;
    those after an entry handled alone are still suspects, to be handled alone."""
    if mark is None:
        return dict.fromkeys(pending, 0)
    tries = mark.attempts + (mark.token != token)
    after = id_key(mark.after)
    until = id_key(mark.until) if mark.until is not None else None
    out = {}
    for entry_id in pending:
        k = id_key(entry_id)
        out[entry_id] = 0 if k <= after else tries if until is None or k <= until else ALONE_FROM
    return out


def chunks(page: list[Entry], attempts: dict[bytes, int]) -> Iterator[tuple[list[Entry], int]]:
    """The page in the pieces to handle, each with the most attempts of an entry in it:
    the whole page, except that an entry with ``ALONE_FROM`` attempts or more is a
    piece of its own."""
    start = 0
    for k, (entry_id, _) in enumerate(page):
        if attempts.get(entry_id, 0) >= ALONE_FROM:
            if k > start:
                yield page[start:k], max(attempts.get(i, 0) for i, _ in page[start:k])
            yield page[k : k + 1], attempts[entry_id]
            start = k + 1
    if start < len(page):
        yield page[start:], max(attempts.get(i, 0) for i, _ in page[start:])
