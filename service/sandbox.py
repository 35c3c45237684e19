"""Run a third-party parser in a child process that cannot take the server down with it.

A parser (the onnx protobuf reader and checker, zip and JSON readers) that loops or allocates
without bound would otherwise hold an API thread or the whole process' memory. The child gets:
an address-space and a CPU-time limit (setrlimit), a wall-clock timeout (killed with its process
group), an environment with nothing of ours in it (no keys, database or broker URLs), and an
empty temporary folder as its working directory. It answers with one JSON object on stdout.

What it does not get (a gap, documented in docs/ARCHITECTURE.md): a separate user or mount
namespace, so it could still read the files the server can read. It never gets torch or the
worker: the entry modules are torch-free, like the rest of the service.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# The only variables a child sees: enough for Python and the C libraries to start, nothing secret.
_SAFE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
             "OPENBLAS_NUM_THREADS": "1"}
MAX_ANSWER_BYTES = 16 * 1024 * 1024


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


def _limit_child(limits: Limits):
    def apply() -> None:  # runs in the child between fork and exec
        os.setsid()  # its own process group: a timeout kills the child and anything it started
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
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
    if returncode == 3:
        return True
    return b"bad_alloc" in err or b"MemoryError" in err or b"out of memory" in err.lower()


def python_module(module: str, *args: str) -> list[str]:
    """argv for `python -m module args` with this interpreter, isolated from the user's site and env."""
    return [sys.executable, "-I", "-m", module, *args]
