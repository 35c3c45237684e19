"""The layering rules of .importlinter hold (also checked by `make test` before pytest): the API
imports neither torch, onnxruntime nor the runner; the engine neither FastAPI, SQLAlchemy nor the
service."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    linter = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(linter), "--config", str(ROOT / ".importlinter")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout
