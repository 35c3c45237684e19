"""Run a third-party parser in a child process that cannot take the server down with it.

A parser (the onnx protobuf reader and checker, zip and JSON readers) that loops or allocates
without bound would otherwise hold an API thread or the whole process' memory. The child gets:
an address-space and a CPU-time limit (setrlimit), a wall-clock timeout (killed with its process
group), an environment with nothing of ours in it (no keys, database or broker URLs), and an
empty temporary folder as its working directory. It answers with one JSON object on stdout.

Where the kernel allows it, a warm child also runs in its own user, mount and network namespaces
(service/confine.py): no network, the data folder covered, the upload hard-linked into a folder of
its own. It never gets torch or the worker: the entry modules are torch-free, like the rest of the
service.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

from service import confine

# The only variables a child sees: enough for Python and the C libraries to start, nothing secret.
_SAFE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
             "OPENBLAS_NUM_THREADS": "1"}
MAX_ANSWER_BYTES = 16 * 1024 * 1024
OUT_OF_MEMORY_EXIT = 3  # an entry's exit status when Python ran out of memory


@dataclass(frozen=True)
class Limits:
    wall_s: float
    cpu_s: int
    memory_bytes: int


class SandboxTimeout(Exception):
    """The child ran past its wall-clock or CPU limit and was killed."""


class SandboxOutOfMemory(Exception):
    """The child needed more memory than its address-space limit."""


class SandboxFailed(Exception):
    """The child died or answered something that is not one JSON object."""


def _limit_child(limits: Limits, *, cpu_hard_s: int | None = None,
                 confinement: confine.Confinement | None = None, folder: str = ""):
    def apply() -> None:  # runs in the child between fork and exec
        os.setsid()  # its own process group: a timeout kills the child and anything it started
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, cpu_hard_s or limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if confinement is not None:
            confine.enter(confinement, folder)
    return apply


def run_json(argv: list[str], *, limits: Limits) -> dict:
    """Run argv (a Python entry module, usually) under limits; return the JSON object it printed."""
    with tempfile.TemporaryDirectory(prefix="modelpress-sandbox-") as empty_dir:
        child = subprocess.Popen(
            argv, cwd=empty_dir, env=dict(_SAFE_ENV), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, preexec_fn=_limit_child(limits), close_fds=True,
        )
        try:
            out, err = child.communicate(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            _kill_group(child)
            raise SandboxTimeout(f"the parser ran longer than {limits.wall_s:g} s") from None
    return _read_answer(child.returncode, out, err, limits)


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.communicate()


def _read_answer(returncode: int, out: bytes, err: bytes, limits: Limits) -> dict:
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        raise SandboxTimeout(f"the parser used more than {limits.cpu_s} s of CPU")
    # Python raises MemoryError (an entry reports it as exit 3); C++ code that cannot allocate aborts.
    if returncode != 0 and _looks_out_of_memory(returncode, err):
        raise SandboxOutOfMemory(f"the parser needed more than {limits.memory_bytes // 2**20} MiB")
    if returncode != 0 or len(out) > MAX_ANSWER_BYTES:
        raise SandboxFailed(f"the parser exited with status {returncode}: {err.decode(errors='replace')[-500:]}")
    try:
        answer = json.loads(out)
    except ValueError as exc:
        raise SandboxFailed(f"the parser's answer is not JSON: {exc}") from exc
    if not isinstance(answer, dict):
        raise SandboxFailed("the parser's answer is not a JSON object")
    return answer


def _looks_out_of_memory(returncode: int, err: bytes) -> bool:
    if returncode == OUT_OF_MEMORY_EXIT:
        return True
    return b"bad_alloc" in err or b"MemoryError" in err or b"out of memory" in err.lower()


# The folder that holds this process' `service` package: the child imports its entry from here, so
# it runs exactly the parent's code, whatever checkout the installed distribution points at.
_CODE_ROOT = str(Path(__file__).resolve().parent.parent)


def python_module(module: str, *args: str) -> list[str]:
    """argv for `python -m module args` with this interpreter, isolated from the user's site and env
    (-I: no PYTHON* variables, no user site, no current folder on the path)."""
    launch = f"import runpy, sys; sys.path.insert(0, {_CODE_ROOT!r}); runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    return [sys.executable, "-I", "-c", launch, *args]


class WarmSandbox:
    """run_json for one entry module, served by a child started (and its imports done) in advance.

    Each child serves ONE request and exits, so nothing an upload did to a parser's state survives
    into the next upload; its replacement is started on a background thread once it has answered. A child
    runs `python -I -m service.sandbox_child ENTRY CPU_S` under the same RLIMIT_AS, clean
    environment and empty folder as run_json; its CPU limit is re-armed when the request arrives
    (service/sandbox_child.py), so the request gets `limits.cpu_s` of CPU of its own, the imports
    before it at most as much again. The wall-clock limit counts from the request. With `spares=0`,
    or when every spare is taken (concurrent uploads), a child is started for the request: the
    cold start run_json always pays.
    """

    def __init__(self, entry: str, *, limits: Limits, spares: int = 1, confinement: confine.Confinement | None = None):
        """confinement: the namespaces each child enters (None: rlimits only; see confine.available)."""
        self.entry, self.limits, self.spares, self.confinement = entry, limits, spares, confinement
        self._lock = threading.Lock()
        self._idle: list[_Child] = []
        self._closed = False
        # A sandbox dropped without close() (an app whose lifespan never ran) still ends its children.
        self._finalizer = weakref.finalize(self, _end_children, self._idle)

    def start(self) -> None:
        """Start the spares now (the app's start-up), not on the first request."""
        for _ in range(self.spares):
            self._refill()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._finalizer()

    def run_json(self, args: list[str], *, inputs: tuple[Path, ...] = ()) -> dict:
        """inputs: the files among args that the child reads; a confined child gets each as a
        name in its own folder (a hard link), the only path of ours it can open."""
        try:
            return self._take().serve(args, self.limits, inputs if self.confinement else ())
        finally:
            # After the answer, not before: the replacement's imports (~0.7 s of CPU) would compete
            # with this request's parse on a small machine (measured: 220 ms instead of 50 ms).
            threading.Thread(target=self._refill, name="sandbox-refill", daemon=True).start()

    def idle_pids(self) -> list[int]:
        """The pids of the children waiting for a request (tests and the bench look at them)."""
        with self._lock:
            return [child.process.pid for child in self._idle]

    def _take(self) -> "_Child":
        with self._lock:
            while self._idle:
                child = self._idle.pop(0)
                if child.process.poll() is None:
                    return child
                child.discard()  # died while idle (killed from outside): never hand it a request
        return _Child.start(self.entry, self.limits, self.confinement)

    def _refill(self) -> None:
        with self._lock:
            if self._closed or len(self._idle) >= self.spares:
                return
        child = _Child.start(self.entry, self.limits, self.confinement)  # outside the lock: a fork is not free
        with self._lock:
            if not self._closed and len(self._idle) < self.spares:
                self._idle.append(child)
                return
        child.discard()


def _end_children(children: list["_Child"]) -> None:
    while True:
        try:
            child = children.pop()
        except IndexError:  # empty (or emptied by a request taking the last one meanwhile)
            return
        child.discard()


@dataclass
class _Child:
    process: subprocess.Popen
    folder: str

    @classmethod
    def start(cls, entry: str, limits: Limits, confinement: confine.Confinement | None = None) -> "_Child":
        if confinement is not None:
            os.makedirs(confinement.inbox_root, exist_ok=True)
        folder = tempfile.mkdtemp(prefix="modelpress-sandbox-", dir=confinement.inbox_root if confinement else None)
        process = subprocess.Popen(
            python_module("service.sandbox_child", entry, str(limits.cpu_s)), cwd=folder, env=dict(_SAFE_ENV),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # Hard CPU limit: the imports (at most cpu_s, the soft limit until the request) plus the request's.
            preexec_fn=_limit_child(limits, cpu_hard_s=2 * limits.cpu_s + 1, confinement=confinement, folder=folder),
            close_fds=True,
        )
        return cls(process, folder)

    def serve(self, args: list[str], limits: Limits, inputs: tuple[Path, ...] = ()) -> dict:
        for number, source in enumerate(inputs):
            name = f"input-{number}{source.suffix[:16]}"
            try:
                os.link(source, os.path.join(self.folder, name))
            except OSError:  # another filesystem: a copy costs time, never access
                shutil.copyfile(source, os.path.join(self.folder, name))
            args = [name if arg in (str(source), str(source.resolve())) else arg for arg in args]
        request = json.dumps({"args": args}).encode() + b"\n"
        try:
            try:
                out, err = self.process.communicate(request, timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                _kill_group(self.process)
                raise SandboxTimeout(f"the parser ran longer than {limits.wall_s:g} s") from None
            return _read_answer(self.process.returncode, out, err, limits)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def discard(self) -> None:
        if self.process.poll() is None:
            _kill_group(self.process)
        shutil.rmtree(self.folder, ignore_errors=True)


def answer_or_refuse(run, *, subject: str, code_prefix: str) -> dict:
    """The `info` of an entry's answer, or the upload refused: `{code_prefix}_parse_timeout`,
    `_out_of_memory`, `_failed` for a child that ran out of its limits or crashed, or the entry's
    own refusal (`{"invalid": {"code", "message", "extra"}}`)."""
    from modelpress.spec.errors import Invalid  # not service.errors: this module stays free of FastAPI

    try:
        answer = run()
    except SandboxTimeout as exc:
        raise Invalid(f"reading the {subject} took too long: {exc}", code=f"{code_prefix}_parse_timeout") from exc
    except SandboxOutOfMemory as exc:
        raise Invalid(f"reading the {subject} needs too much memory: {exc}", code=f"{code_prefix}_parse_out_of_memory") from exc
    except SandboxFailed as exc:
        # The parser crashed on these bytes: the upload is what is wrong (the log keeps the details).
        raise Invalid(f"the {subject} cannot be read: its parser failed on it", code=f"{code_prefix}_parse_failed") from exc
    if "invalid" in answer:
        refused = answer["invalid"]
        raise Invalid(refused["message"], code=refused["code"], **refused.get("extra", {}))
    return answer["info"]


def entry_main(inspect, argv: list[str]) -> int:
    """The body of an entry module's main: print {"info": ...} or {"invalid": ...}; exit 3 when
    memory ran out (protobuf reports a failed allocation as an EncodeError)."""
    import dataclasses

    from modelpress.spec.errors import Invalid

    try:
        from google.protobuf.message import EncodeError
    except ImportError:  # pragma: no cover (protobuf comes with onnx)
        EncodeError = MemoryError  # noqa: N806
    try:
        answer = {"info": dataclasses.asdict(inspect(argv))}
    except Invalid as exc:
        answer = {"invalid": {"code": exc.code, "message": exc.message, "extra": exc.extra}}
    except (MemoryError, EncodeError):
        return OUT_OF_MEMORY_EXIT
    sys.stdout.write(json.dumps(answer))
    return 0
