"""The fine-tuning process: one child process that runs fine-tunes sent over a pipe, for
as long as the worker runs, at a lower priority and with few threads
(:func:`worker.online.finetune.init_process`). (A multiprocessing Pool terminated in
the middle of a job leaks a semaphore and says so at exit; a pipe has none.)

A new process imports torch for seconds before it can read a job, and the serving
thread must not spend them waiting: the process says READY once it has started, and
:class:`Trainer` is asked, between batches, whether it has.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from multiprocessing import get_context
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from worker.embedded import die_with_parent
from worker.signals import deaf_children

if TYPE_CHECKING:  # not imported at the process's start: they import torch
    from worker.online.finetune import Job, Outcome

NICE = 10  # how far below the serving path the process runs
READY = "ready"  # what the process sends once it has started
STOP_WAIT_S = 5.0  # how long stop() waits for the process to end, after each signal


class Trainer:
    """The fine-tuning process. Nothing here waits for it to start, or to finish a job:
    :meth:`started` and :meth:`done` ask; :meth:`submit` sends a job once it has started."""

    def __init__(self, threads: int) -> None:
        context = get_context("spawn")
        self._conn, child = context.Pipe()
        try:
            self._proc = context.Process(
                target=serve,
                args=(child, threads, os.getpid()),
                name="attnlstm-finetune",
                daemon=True,
            )
            with deaf_children():
                self._proc.start()
        except OSError:
            self._conn.close()
            raise
        finally:
            child.close()
        self._started = False
        self._sending: threading.Thread | None = None  # the last job's send

    def started(self) -> bool:
        """The process has started and waits for a job (asked, not waited for); EOFError
        or ConnectionResetError when it died on the way."""
        if not self._started and self._conn.poll():
            self._started = self._conn.recv() == READY
        return self._started

    def submit(self, job: Job) -> None:
        """``job`` sent from a thread of its own (its histories are copies: nothing the
        serving thread changes). Sent from the serving thread, the histories of 10,000
        series took it 0.1-0.7 s, and a process stopped (SIGSTOP, a cgroup freezer) held
        it for good: the job's timeout, checked there, never came. A send that fails
        finds the process dead or stopped, as :meth:`done` and :meth:`result` then do."""
        self._sending = threading.Thread(
            target=self._send, args=(job,), name="finetune-send", daemon=True
        )
        self._sending.start()

    def _send(self, job: Job) -> None:
        with contextlib.suppress(OSError):  # the process is gone: a broken pipe
            self._conn.send(job)

    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    def __str__(self) -> str:
        code = self._proc.exitcode
        return f"pid {self._proc.pid}, " + ("running" if code is None else f"exit code {code}")

    def done(self) -> bool:
        """A result is waiting (or the process died: then result() raises EOFError or
        ConnectionResetError)."""
        return self._conn.poll()

    def result(self) -> Outcome:
        ok, value = self._conn.recv()
        if not ok:
            raise value
        outcome: Outcome = value
        return outcome

    def stop(self) -> None:
        """The process ended: SIGTERM, then SIGKILL if it is still there after
        STOP_WAIT_S. A stopped process (SIGSTOP, a cgroup freezer, a debugger) leaves
        SIGTERM pending; waiting for it with no limit blocked the serving thread for as
        long as it stayed stopped."""
        self._proc.terminate()
        self._proc.join(STOP_WAIT_S)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(STOP_WAIT_S)
        if self._sending is not None:  # its pipe broken with the process: over at once
            self._sending.join(STOP_WAIT_S)
        self._conn.close()


def serve(conn: Connection, threads: int, parent: int) -> None:
    """The process's life: below the serving path and tied to the worker's life (an
    orphan of a worker killed -9 ran its job on beside the next worker) before torch is
    imported, which took a second of CPU at the serving path's priority; then its jobs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # see deaf_children: a thread may start it
    os.nice(NICE)
    die_with_parent(parent)
    from worker.online.finetune import init_process

    init_process(threads)
    conn.send(READY)
    run_jobs(conn)


def run_jobs(conn: Connection) -> None:
    """Each job received run and its outcome sent back, until the worker goes. Nothing
    of a job outlives its reply: between jobs the process holds none of the histories
    (those of every series served)."""
    while True:
        try:
            conn.send(_run(conn.recv()))
        except (EOFError, OSError):  # the worker has gone (a broken pipe, as it went)
            return


def _run(job: Job) -> tuple[bool, object]:
    from worker.online.finetune import run_job

    try:
        return True, run_job(job)
    except Exception as e:  # sent back, to be logged by the worker
        return False, e
