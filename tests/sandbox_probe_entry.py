"""A test-only parser entry (tests/test_sandbox.py): reports what a hostile parser in the sandbox
could reach. argv: the upload as given, a secret file of ours, a loopback port that listens, the
data folder."""

import json
import os
import socket
import sys


def _attempt(action) -> str:
    try:
        return action()
    except OSError as exc:
        return f"refused: {exc.__class__.__name__}"


def main(argv: list[str]) -> int:
    upload, secret, port, data_folder = argv[0], argv[1], int(argv[2]), argv[3]
    seen = {
        "upload": _attempt(lambda: open(upload).read()),
        "secret": _attempt(lambda: open(secret).read()),
        "network": _attempt(lambda: socket.create_connection(("127.0.0.1", port), timeout=5).close() or "connected"),
        "data_folder": _attempt(lambda: sorted(os.listdir(data_folder))),
    }
    sys.stdout.write(json.dumps({"info": seen}))
    return 0
