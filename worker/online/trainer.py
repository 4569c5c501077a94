"""The fine-tuning process: one child process that runs fine-tunes sent over a pipe, for
as long as the worker runs, at a lower priority and with few threads
(:func:`worker.online.finetune.init_process`). (A multiprocessing Pool terminated in
the middle of a job leaks a semaphore and says so at exit; a pipe has none.)

A new process imports torch for seconds before it can read a job, and the serving
thread must not spend them waiting: the process says READY once it has started, and
:class:`Trainer` is asked, between batches, whether it has.
"""

from __future__ import annotations

from multiprocessing import get_context
from multiprocessing.connection import Connection

from worker.online.finetune import Job, Outcome, init_process, run_job

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
                target=serve, args=(child, threads), name="attnlstm-finetune", daemon=True
            )
            self._proc.start()
        except OSError:
            self._conn.close()
            raise
        finally:
            child.close()
        self._started = False

    def started(self) -> bool:
        """The process has started and waits for a job (asked, not waited for); EOFError
        or ConnectionResetError when it died on the way."""
        if not self._started and self._conn.poll():
            self._started = self._conn.recv() == READY
        return self._started

    def submit(self, job: Job) -> None:
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
        self._conn.close()


def serve(conn: Connection, threads: int) -> None:
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
        except EOFError:  # the worker has gone
            return


def _run(job: Job) -> tuple[bool, object]:
    try:
        return True, run_job(job)
    except Exception as e:  # sent back, to be logged by the worker
        return False, e
