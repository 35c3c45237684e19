"""`python -I -m service.sandbox_child ENTRY CPU_S`: a warm child of service.sandbox.WarmSandbox.

Imports ENTRY and calls its `preload()` (the parser libraries: onnx alone is ~0.7 s of CPU) while
no request is waiting, then reads ONE request line `{"args": [...]}` from stdin, gives the
request CPU_S seconds of CPU from now, runs `ENTRY.main(args)` and exits with its status. The
untrusted bytes are only touched inside `main`, after the limit is set; the address-space limit,
environment and folder were set by the parent before this process started. An end of input
before a request (the API closed us or died) ends the child at once.
"""

import importlib
import json
import math
import os
import resource
import sys

MAX_REQUEST_BYTES = 1024 * 1024


def _cpu_used_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str]) -> int:
    entry_name, cpu_s = argv[0], int(argv[1])
    entry = importlib.import_module(entry_name)
    preload = getattr(entry, "preload", None)
    if preload is not None:
        preload()
    line = sys.stdin.buffer.readline(MAX_REQUEST_BYTES)
    if not line.endswith(b"\n"):
        return 0 if not line else 2  # closed while idle, or a request cut off: nothing to answer
    args = json.loads(line)["args"]
    # Lowering the hard limit is allowed; the parent set it high enough for imports + cpu_s.
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(_cpu_used_s()) + cpu_s
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard - 1)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
    return entry.main(args)


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Without the interpreter's tear-down (~0.2 s with onnx and protobuf loaded, measured): nothing
    # is left to clean, and the parent's wait for this exit is the upload's.
    os._exit(code)
