"""Stopping a run on SIGTERM (a scheduler's stop, `kill`) or Ctrl-C without breaking the store.

The run stops by raising SystemExit (KeyboardInterrupt for Ctrl-C) from the signal handler, so
every `with` block unwinds and the MLflow run ends KILLED. Raised at an arbitrary bytecode,
though, the exception can land inside MLflow's SQLAlchemy session in the middle of a write: the
interrupted SQLite connection keeps its lock, and the `end_run("KILLED")` that follows fails
with "database is locked", leaving the run RUNNING (seen once in ~20 SIGTERMs, 2026-11-29).
So while the main thread is inside MLflow or SQLAlchemy the exception waits: the frame that
called into them gets a trace function (the way a debugger stops at a line) that raises it as
soon as control is back in that frame.

Raised inside a finaliser (a `__del__` or weakref callback that TensorFlow runs between
steps), the exception is printed and ignored by Python, and training would go on for good:
`StopWhenSignalled`, among every training's callbacks, raises it again after the next batch.

While a `model.fit` with `StopWhenSignalled` runs, the handler raises nothing: the callback
stops the training after the batch (or validation batch) in progress, or, if the fit ends
first, the exception waits for the frame that called `fit`. Raised at an arbitrary
bytecode inside Keras' training loop, the SystemExit crashed the process in native code in 1 of
4 SIGTERMs on the AMX Xeon (`free(): invalid next size (fast)`), leaving the run RUNNING
(2026-12-03).
"""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any, NoReturn

import keras

# Modules that must not be interrupted halfway: MLflow (its stores, its active-run stack) and
# the database layer under it.
PROTECTED = ("mlflow", "sqlalchemy", "sqlite3")

_pending: dict[str, Any] = {}  # the signal that waits, and the trace function it displaced
_received: list[int] = []  # every signal handled: the process is stopping
# Whether a fit with StopWhenSignalled has started in this process (not the callback itself:
# it holds its model, which a multirun's next job must be able to free).
_watched: dict[str, bool] = {"fit": False}


def stop_on_signals() -> None:
    """Install the handlers for SIGTERM (SystemExit 143) and SIGINT (KeyboardInterrupt)."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def is_protected(frame: FrameType) -> bool:
    """True when the frame runs MLflow's or the database layer's code."""
    return str(frame.f_globals.get("__name__", "")).split(".", 1)[0] in PROTECTED


def protected_callers_frame(frame: FrameType | None) -> FrameType | None:
    """The frame that called into protected code, when the stack is in it (the caller of its
    outermost protected frame: protected code may call back into ours); None when it is not
    (or when nothing outside it called it)."""
    outermost = None
    while frame is not None:
        if is_protected(frame):
            outermost = frame
        frame = frame.f_back
    return None if outermost is None else outermost.f_back


def fit_callers_frame(frame: FrameType | None) -> FrameType | None:
    """The frame that called Keras' `fit`, when the stack is in it; None when it is not."""
    while frame is not None:
        if frame.f_code.co_name == "fit" and str(frame.f_globals.get("__name__", "")
                                                 ).startswith("keras."):
            return frame.f_back
        frame = frame.f_back
    return None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    # In a fit StopWhenSignalled watches, it raises after the batch in progress; if the fit
    # ends first, the exception waits for the frame that called it, like a store call's.
    caller = (fit_callers_frame(frame) if _watched["fit"] else None) or \
        protected_callers_frame(frame)
    if caller is None:
        _stop(signum)
    if "signum" in _pending:  # already waiting
        return
    _pending.update(signum=signum, previous=sys.gettrace())
    caller.f_trace = _raise_pending
    sys.settrace(_leave_new_frames_alone)  # tracing on; only `caller` has a trace function


def _leave_new_frames_alone(frame: FrameType, event: str, arg: object) -> None:
    return None


def _raise_pending(frame: FrameType, event: str, arg: object) -> None:
    """Back in the frame that called into the store (any event: next line, exception or
    return): stop now."""
    frame.f_trace = None
    sys.settrace(_pending.get("previous"))
    if "signum" in _pending:  # else StopWhenSignalled raised it already
        _stop(_pending["signum"])


def _stop(signum: int) -> NoReturn:
    _pending.clear()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)  # unwinds `with` blocks: the MLflow run ends KILLED


class StopWhenSignalled(keras.callbacks.Callback):
    """Stops training after the batch (training or validation) during which a SIGTERM or
    Ctrl-C arrived: the handler defers to it while the fit runs; also a signal whose exception
    was lost in a finaliser before the fit."""

    def on_train_begin(self, logs: dict | None = None) -> None:
        _watched["fit"] = True
        self._stop_if_signalled()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._stop_if_signalled()

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._stop_if_signalled()

    @staticmethod
    def _stop_if_signalled() -> None:
        if _received:
            _stop(_received[-1])
