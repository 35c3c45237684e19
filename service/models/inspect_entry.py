"""`python -m service.models.inspect_entry PATH MAX_UNPACKED_BYTES`: inspect one upload and print JSON.

Runs inside service.sandbox (a limited child process): the parsers of service.models.inspect
(protobuf, onnx.checker, zip, JSON) touch untrusted bytes here, never in the API process.
Answer: {"info": ModelInfo} or {"invalid": {"code", "message", "extra"}}; exit 3 when memory ran out.
"""

import sys
from pathlib import Path


def preload() -> None:
    """The imports main needs, done by a warm child (service.sandbox_child) before any upload arrives."""
    import onnx  # noqa: F401  (onnx and its checker: the bulk of a cold start)
    import onnx.checker  # noqa: F401
    from google.protobuf.message import EncodeError  # noqa: F401

    import service.models.inspect  # noqa: F401


def inspect(argv: list[str]):
    from service.models.inspect import inspect_model

    return inspect_model(Path(argv[0]), max_unpacked_bytes=int(argv[1]))


def main(argv: list[str]) -> int:
    from service.sandbox import entry_main

    return entry_main(inspect, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
