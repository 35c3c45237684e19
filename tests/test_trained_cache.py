"""The on-disk cache of trained test models (tests/trained.py): one build per key, shared by
processes that ask at once, never a half-built entry, a new key when the training code changes, and
private copies for the tests; and the long-files-first order of conftest names real files."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests import conftest, trained

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(trained, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def counting_build(log: Path):
    def build(folder: Path):
        with open(log, "a") as f:
            f.write("built\n")
        (folder / "model.bin").write_bytes(b"weights")
    return build


def test_an_entry_is_built_once_and_then_read(cache, tmp_path):
    log = tmp_path / "builds.log"
    first = trained.cached("model", "k1", counting_build(log))
    again = trained.cached("model", "k1", counting_build(log))
    assert first == again and (first / "model.bin").read_bytes() == b"weights"
    assert log.read_text() == "built\n"
    trained.cached("model", "k2", counting_build(log))  # another key: trained again
    assert log.read_text() == "built\nbuilt\n"


def test_an_interrupted_build_leaves_nothing_and_the_next_call_builds(cache, tmp_path):
    def failing(folder: Path):
        (folder / "model.bin").write_bytes(b"half")
        raise KeyboardInterrupt("stopped mid-training")

    with pytest.raises(KeyboardInterrupt):
        trained.cached("model", "k", failing)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    log = tmp_path / "builds.log"
    assert (trained.cached("model", "k", counting_build(log)) / "model.bin").read_bytes() == b"weights"


def test_two_processes_asking_at_once_build_once(cache, tmp_path):
    log = tmp_path / "builds.log"
    # Each asker says it started, then asks. A build waits for both to have started and a little
    # more, so without the lock the second asker finds no entry and builds too. With it, the second
    # waits on the lock: the result does not depend on how fast either runs.
    program = f"""
import sys, time
from pathlib import Path
from tests import conftest, trained
trained.CACHE = Path({str(cache)!r})
started = Path({str(tmp_path)!r})
def build(folder):
    with open({str(log)!r}, "a") as f:
        f.write("built\\n")
    deadline = time.monotonic() + 60
    while len(list(started.glob("started-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    (folder / "model.bin").write_bytes(b"weights")
(started / f"started-{{sys.argv[1]}}").touch()
print(trained.cached("model", "shared", build))
"""
    askers = [subprocess.Popen([sys.executable, "-c", program, str(n)], cwd=ROOT, stdout=subprocess.PIPE, text=True) for n in range(2)]
    folders = {asker.communicate(timeout=120)[0].strip() for asker in askers}
    assert all(asker.returncode == 0 for asker in askers)
    assert folders == {str(cache / "model-shared")}
    assert log.read_text() == "built\n"


def test_the_key_follows_the_training_code(tmp_path, monkeypatch):
    monkeypatch.setattr(trained, "ROOT", tmp_path)
    code = tmp_path / "train.py"
    code.write_text("epochs = 4\n")
    key = trained.code_key(code, extra="widths=(8, 16, 32)")
    assert trained.code_key(code, extra="widths=(8, 16, 32)") == key
    assert trained.code_key(code, extra="widths=(8, 16, 64)") != key
    code.write_text("epochs = 5\n")
    assert trained.code_key(code, extra="widths=(8, 16, 32)") != key


def test_a_copy_is_private(cache, tmp_path):
    entry = trained.cached("model", "k", counting_build(tmp_path / "builds.log"))
    copy = trained.copy_of(entry, tmp_path / "copy")
    (copy / "model.bin").write_bytes(b"changed by a test")
    (copy / "extra.npz").write_bytes(b"")
    assert (entry / "model.bin").read_bytes() == b"weights" and not (entry / "extra.npz").exists()
    assert not (copy / trained.COMPLETE).exists()



def test_the_long_files_that_start_first_exist():
    # A renamed file would silently drop out of the order: each name must still be a test file here.
    assert conftest.LONG_FILES, "the list is empty: every file would start in collection order"
    assert [name for name in conftest.LONG_FILES if not (ROOT / "tests" / name).is_file()] == []
    assert len(set(conftest.LONG_FILES)) == len(conftest.LONG_FILES)
