"""ONNX Runtime runs that a job's cancel or deadline can stop while they are in progress.

One `session.run` can take as long as the graph makes it (a long MatMul chain, a big Loop): the
job's progress checks are not reached until it returns. Every run made through `run()` carries
its own `RunOptions`; the job's watchdog (the runner's heartbeat thread) calls `RunStopper.stop`,
which sets `terminate` on every run in progress, and ONNX Runtime stops at its next node (also
inside Loop/Scan/If bodies). The run then raises what the stop was for (JobCancelled, a
time-limit EngineError) instead of the runtime's own error, and later runs raise it at once.

The stopper of the job being run is found through a context variable set by the runner
(`stopping_with`), so the engine's functions need no extra parameter. ORT's own tools that call
`session.run` themselves (the static-int8 calibrator) cannot take our RunOptions: their data
readers check between batches instead (static_int8's reader reports the job's progress, which
checks), which bounds them to one batch. Torch loops (training, AdaRound, statistics and gradient
passes) call `check()` once per batch or iteration for the same reason: a torch op cannot be
interrupted, so a stop waits at most for the batch in progress.
"""

import contextvars
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import onnxruntime as ort

StopReason = Callable[[], BaseException]


class RunStopper:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[ort.RunOptions] = set()
        self._reason: StopReason | None = None

    @property
    def stopped(self) -> bool:
        return self._reason is not None

    def stop(self, reason: StopReason) -> None:
        """Called from another thread: end the runs in progress; `reason()` is what they raise."""
        with self._lock:
            if self._reason is None:
                self._reason = reason
            for options in self._running:
                options.terminate = True

    def check(self) -> None:
        if self._reason is not None:
            raise self._reason()

    def run(self, session: ort.InferenceSession, output_names: list[str] | None, feed: dict) -> list:
        options = ort.RunOptions()
        with self._lock:
            self.check()
            self._running.add(options)
        try:
            return session.run(output_names, feed, options)
        except Exception:
            if self._reason is not None:  # ORT's "Exiting due to terminate flag being set to true"
                raise self._reason() from None
            raise
        finally:
            with self._lock:
                self._running.discard(options)


_current: contextvars.ContextVar[RunStopper | None] = contextvars.ContextVar("run_stopper", default=None)


@contextmanager
def stopping_with(stopper: RunStopper) -> Iterator[RunStopper]:
    """Runs made by this thread (this context) inside the block are stopped by `stopper`."""
    token = _current.set(stopper)
    try:
        yield stopper
    finally:
        _current.reset(token)


def run(session: ort.InferenceSession, feed: dict, output_names: list[str] | None = None) -> list:
    """session.run(output_names, feed), stoppable by the current job (a plain run outside a job)."""
    stopper = _current.get()
    if stopper is None:
        return session.run(output_names, feed)
    return stopper.run(session, output_names, feed)


def check() -> None:
    """Raise the current job's stop reason, if it was stopped (for loops around runs we do not make)."""
    stopper = _current.get()
    if stopper is not None:
        stopper.check()
