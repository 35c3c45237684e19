"""Models the tests train, kept on disk between pytest processes and sessions: trained once per
version of the code that trains them, then copied for each session.

An entry is a folder `<cache>/<name>-<key>`, where the key hashes the files that decide the result
(the training and model code, the fixture building it) and the library versions; a change to any of
them trains again. The two pytest processes of `make test` share an entry: the first builds it under
a lock, the second waits and reads it. `MODELPRESS_TEST_CACHE` moves the cache (default: .cache/tests,
git-ignored); deleting the folder is always safe."""

import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MODELPRESS_TEST_CACHE", ROOT / ".cache" / "tests"))
# The libraries whose version can change a trained model or its exported files.
LIBRARIES = ("torch", "numpy", "scikit-learn", "onnx", "onnxscript")
COMPLETE = ".complete"  # written last: a folder without it was interrupted and is rebuilt


def code_key(*files: Path, extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for path in sorted(files):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    for library in LIBRARIES:
        try:
            version = metadata.version(library)
        except metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{library}={version}\0".encode())
    return digest.hexdigest()[:16]


def cached(name: str, key: str, build: Callable[[Path], None]) -> Path:
    """The folder of entry `name` at `key`, built by `build(folder)` when missing. Read-only by
    agreement: copy it (`copy_of`) before a test may write beside its files."""
    folder = CACHE / f"{name}-{key}"
    if (folder / COMPLETE).is_file():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other pytest process waits here while this one trains
        if not (folder / COMPLETE).is_file():
            shutil.rmtree(folder, ignore_errors=True)
            building = CACHE / f".{name}-{key}-{uuid.uuid4().hex[:8]}"
            building.mkdir()
            try:
                build(building)
                (building / COMPLETE).touch()
                building.rename(folder)
            finally:
                shutil.rmtree(building, ignore_errors=True)
    return folder


def copy_of(entry: Path, destination: Path) -> Path:
    """A private copy of a cache entry: a test writing into it cannot change another session's model."""
    shutil.copytree(entry, destination, dirs_exist_ok=True, ignore=shutil.ignore_patterns(COMPLETE))
    return destination
