"""`python -m service.models.inspect_entry PATH MAX_UNPACKED_BYTES`: inspect one upload and print JSON.

Runs inside service.sandbox (a limited child process): the parsers of service.models.inspect
(protobuf, onnx.checker, zip, JSON) touch untrusted bytes here, never in the API process.
Answer: {"info": ModelInfo} or {"invalid": {"code", "message", "extra"}}; exit 3 when memory ran out.
"""

import dataclasses
import json
import sys
from pathlib import Path

OUT_OF_MEMORY_EXIT = 3


def preload() -> None:
    """The imports main needs, done by a warm child (service.sandbox_child) before any upload arrives."""
    import onnx  # noqa: F401  (onnx and its checker: the bulk of a cold start)
    import onnx.checker  # noqa: F401
    from google.protobuf.message import EncodeError  # noqa: F401

    import service.models.inspect  # noqa: F401


def main(argv: list[str]) -> int:
    from google.protobuf.message import EncodeError

    from modelpress.spec.errors import Invalid
    from service.models.inspect import inspect_model

    path, max_unpacked_bytes = Path(argv[0]), int(argv[1])
    try:
        answer = {"info": dataclasses.asdict(inspect_model(path, max_unpacked_bytes=max_unpacked_bytes))}
    except Invalid as exc:
        answer = {"invalid": {"code": exc.code, "message": exc.message, "extra": exc.extra}}
    except (MemoryError, EncodeError):
        # protobuf reports a failed allocation as "Failed to serialize proto" (onnx.checker re-serialises
        # the model it was given): under our address-space limit that is memory running out.
        return OUT_OF_MEMORY_EXIT
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
