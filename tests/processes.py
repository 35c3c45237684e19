"""Start and stop the real processes the integration tests talk to."""

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

VENV_BIN = Path(sys.executable).parent
PR_SET_PDEATHSIG = 1
_started: set["Process"] = set()


def _die_with_the_test_run() -> None:
    """In the child before exec: the kernel SIGKILLs it when the test process dies, even by SIGKILL,
    so a killed run never leaves a worker behind that would take another run's tasks."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@atexit.register
def stop_all() -> None:
    """Whatever a test left running (a fixture cut short by SIGTERM or an error) ends with the run."""
    for process in list(_started):
        process.stop(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    def __init__(self, name: str, args: list[str], env: dict, log_dir: Path, cwd: Path | None = None):
        self.name, self.args, self.env, self.log_dir, self.cwd = name, args, env, log_dir, cwd
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=cwd, start_new_session=True, preexec_fn=_die_with_the_test_run)
        _started.add(self)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15) -> None:
        if self.alive():
            # The whole process group: `make run` and its server, a Celery worker and its children.
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Children that outlived their parent (a pool process) still belong to the group: end them too.
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.log.close()
        _started.discard(self)

    def restarted(self, name: str) -> "Process":
        return Process(name, self.args, self.env, self.log_dir, self.cwd)

    def kill(self) -> None:
        """SIGKILL the whole process group (a Celery worker's children too)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        _started.discard(self)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass  # nothing of the group is left


def wait_http(url: str, process: Process, timeout: float = 300.0, expect: int = 200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited:\n{process.output()}")
        try:
            if httpx.get(url, timeout=2).status_code == expect:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s:\n{process.output()}")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@contextmanager
def cpu_load(log_dir: Path):
    """A CPU-bound process running beside the test (as on a shared, busy machine): timing-based
    choices flip under it, so a result that must not depend on timing is checked under it."""
    burner = Process("cpu-burner", [sys.executable, "-c", "while True: pass"], {}, log_dir)
    try:
        yield burner
    finally:
        burner.stop()
