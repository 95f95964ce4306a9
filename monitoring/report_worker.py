"""The Evidently part of ``noisewise monitor`` in a child process, overlapped with the rest of the command.

Importing Evidently costs seconds of CPU, and so do the parent's own imports (MLflow for the model, torch and
scipy for the noise-rate estimates) and its store reads; none of them needs the others. A cold ``noisewise
monitor`` therefore forks a :class:`ReportWorker` before it imports anything heavy: the child imports Evidently
(and nothing that needs torch or MLflow) on the second core while the parent loads the model and reads the
window, then computes the reports from the frames the parent sends it (:class:`DriftJob`), with the same code
the parent would run (:func:`compute_drift`), and sends the numbers back.

This module imports the standard library only, so that the fork happens before the parent's heavy imports.

A failure in the child surfaces in the parent: an expected error of the report (``ValueError``: bad frames or
class names) is raised again as itself, with the same one-line message it has in-process; anything else,
and a child that dies without answering, raises :class:`ReportWorkerError` with one line saying what
happened. The parent never waits on a dead child, and closing the worker stops a child that is still running.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

__all__ = ["KEEP_SNAPSHOTS", "DriftJob", "ReportWorker", "ReportWorkerError", "compute_drift"]

#: Evidently snapshots kept per workspace project (the newest): bounds the time to open the workspace, which
#: reads them all (about 25 ms each for a 10,000-row window). 50 hourly runs are two days of history in the
#: Evidently UI; the long history of the same numbers is Prometheus's (the noisewise_drift_* gauges).
KEEP_SNAPSHOTS = 50

#: How often the parent, waiting for the answer, checks that the child is still alive (seconds).
_POLL_S = 0.2
#: How long closing waits for the child to exit on its own before it is terminated (seconds).
_JOIN_S = 5.0
#: Longest error message carried back from the child (one line).
_MESSAGE_CHARS = 500


class ReportWorkerError(RuntimeError):
    """The report process failed (an unexpected error, or it exited before answering); the message is one line."""


@dataclass(frozen=True)
class DriftJob:
    """What the Evidently reports of ``noisewise monitor`` are computed from (picklable: frames and plain values).

    ``reference``, ``predictions``, ``feedback``, ``class_names``, ``workspace``, ``model`` and ``keep_snapshots``
    are the arguments of :func:`noisewise.monitoring.drift.drift_report`; ``state``, ``calibration_noise`` and ``above`` those of
    :func:`noisewise.monitoring.operator_view.operator_numbers`, whose result is the report's summary card.
    """

    reference: Any
    predictions: Any
    feedback: Any
    class_names: list[str]
    workspace: Path
    model: str | None
    state: dict[str, Any]
    calibration_noise: dict[str, Any]
    above: bool | None
    keep_snapshots: int | None = KEEP_SNAPSHOTS


def compute_drift(job: DriftJob) -> dict[str, Any]:
    """The drift report of ``job`` (:func:`noisewise.monitoring.drift.drift_report`'s result), in this process.

    Imports Evidently (seconds, the first time).
    """
    from noisewise.monitoring.drift import drift_report
    from noisewise.monitoring.operator_view import operator_numbers

    return drift_report(job.reference, job.predictions, job.feedback, job.class_names,
                        workspace=Path(job.workspace), model=job.model,
                        operator=operator_numbers(job.state, job.calibration_noise, job.above),
                        keep_snapshots=job.keep_snapshots)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no message"
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS - 3] + "..."


def _serve(conn) -> None:
    """The child: import Evidently, wait for one job, answer ``("ok", result)`` or ``("error", ...)``, exit."""
    # Ctrl-C reaches the whole process group: the parent handles it and stops this process (no second traceback).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    failure: tuple | None = None
    try:
        import noisewise.monitoring.drift  # noqa: F401 - the expensive import, overlapped with the parent's work
    except BaseException as err:  # noqa: BLE001 - reported when the parent asks, not here: it may never ask
        failure = ("error", None, f"cannot import the report's dependencies: {type(err).__name__}: {_one_line(err)}")
    try:
        job = conn.recv()
    except (EOFError, OSError):  # the parent stopped or gave up
        return
    if job is None:
        return
    if failure is None:
        try:
            answer: tuple = ("ok", compute_drift(job))
        except ValueError as err:  # the report's own checks: raised again in the parent as the same error
            answer = ("error", "ValueError", _one_line(err))
        except BaseException as err:  # noqa: BLE001 - whatever it is, the parent reports it in one line
            answer = ("error", None, f"{type(err).__name__}: {_one_line(err)}")
    else:
        answer = failure
    try:
        conn.send(answer)
    except (OSError, ValueError):  # the parent is gone
        pass


class ReportWorker:
    """A child process computing ``noisewise monitor``'s Evidently reports; start it before the heavy imports.

    Use it as a context manager (closing stops the child if it still runs); one report per worker
    (:meth:`submit`, then :meth:`result`, or :meth:`drift` for both).

    Raises
    ------
    ReportWorkerError
        From :meth:`result`, when the child failed or exited without answering.
    """

    def __init__(self) -> None:
        # fork: the child starts from this process's few imports, in milliseconds, and needs no pickled target
        context = multiprocessing.get_context("fork")
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(target=_serve, args=(child_conn,), name="noisewise-monitor-reports",
                                        daemon=True)
        self._process.start()
        child_conn.close()  # the child holds the only other end: its exit reads as end of file here
        self._sender: threading.Thread | None = None
        self._send_error: str | None = None  # "" when the child was gone, else what went wrong

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._process.pid

    def submit(self, job: DriftJob) -> None:
        """Send ``job`` to the child and return at once (a thread writes it while the child may still be
        importing); :meth:`result` waits for the answer."""
        if self._sender is not None:
            raise ReportWorkerError("the report process computes one report; start another worker")
        self._sender = threading.Thread(target=self._send, args=(job,), name="noisewise-monitor-send", daemon=True)
        self._sender.start()

    def _send(self, job: DriftJob) -> None:
        try:
            self._conn.send(job)
        except (OSError, ValueError):  # the child is gone (broken pipe): result() says how it ended
            self._send_error = ""
        except BaseException as err:  # noqa: BLE001 - the job does not pickle: nothing was written
            self._send_error = f"cannot send the window to the report process: {type(err).__name__}: {_one_line(err)}"

    def result(self) -> dict[str, Any]:
        """The drift report of the submitted job (as :func:`compute_drift` would return it).

        Raises
        ------
        ValueError
            The report's own checks refused the job (the message it has in-process).
        ReportWorkerError
            Any other failure of the child, or its exit before answering; one line.
        """
        if self._sender is None:
            raise ReportWorkerError("no report was submitted to the report process")
        while self._sender.is_alive():  # a dead child breaks the pipe, which ends the send
            self._sender.join(_POLL_S)
        if self._send_error is not None:
            raise ReportWorkerError(self._send_error or self._exited("before it received the window"))
        while not self._conn.poll(_POLL_S):
            if not self._process.is_alive():
                break
        try:
            answer = self._conn.recv()
        except (EOFError, OSError):
            raise ReportWorkerError(self._exited("before it returned the drift report")) from None
        if answer[0] == "ok":
            return answer[1]
        _, kind, message = answer
        if kind == "ValueError":
            raise ValueError(message)
        raise ReportWorkerError(f"the Evidently report process failed: {message}")

    def drift(self, job: DriftJob) -> dict[str, Any]:
        """:meth:`submit` then :meth:`result`."""
        self.submit(job)
        return self.result()

    def _exited(self, when: str) -> str:
        self._process.join(_JOIN_S)
        code = self._process.exitcode
        how = ("is still running" if code is None else f"was killed by signal {-code}" if code < 0
               else f"exited with status {code}")
        return f"the Evidently report process {how} {when}"

    def close(self) -> None:
        """Stop the child. Once it has a job it is left up to ``_JOIN_S`` seconds to finish on its own (a report
        cut short mid-write could leave a broken snapshot in the workspace); without one (the command failed
        before its reports) it has nothing left to do and is terminated at once, even mid-import."""
        if self._process.pid is None:
            return
        if self._sender is not None and not self._send_error:
            self._process.join(_JOIN_S)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(_JOIN_S)
        if self._process.is_alive():
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.join()
        if self._sender is not None:
            self._sender.join()  # the child is gone, so a send still under way has failed by now
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
