"""The layering rules of .importlinter hold (also checked by `make test` before pytest): the API
imports neither torch, onnxruntime nor the worker; the engine neither FastAPI, SQLAlchemy nor the
service; the shared job language none of them."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    linter = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(linter), "--config", str(ROOT / ".importlinter")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_the_api_alone_has_no_embedded_worker(tmp_path):
    """Without a broker, the API needs its composition root (`worker.serve`) to hand it the
    in-process worker; on its own it refuses to start and says what to run instead."""
    import pytest

    from service.config import Settings
    from service.dispatch import EmbeddedWorkerMissing
    from service.main import create_app

    with pytest.raises(EmbeddedWorkerMissing, match="python -m worker.serve"):
        create_app(Settings(data_dir=tmp_path))


def test_loading_the_api_loads_no_worker_module():
    """The rule as the interpreter sees it, hidden imports (importlib) included."""
    code = ("import sys, service.main, service.__main__; "
            "print(sorted(m for m in sys.modules if m == 'worker' or m.startswith(('worker.', 'torch', 'onnxruntime'))))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_a_celery_worker_process_loads_no_web_stack(tmp_path):
    """What a Celery worker imports (`celery -A worker.celery_app`) holds no FastAPI or Starlette,
    and of the service only its job-state door (runner_api) and the plumbing it stands on; hidden
    imports (importlib, plug-ins) included."""
    code = ("import sys, worker.celery_app; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette'))); "
            "print(sorted(m for m in sys.modules if m.startswith('service.')))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "BROKER_URL": "", "MODELPRESS_DATA_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-4000:]
    web, service_modules = run.stdout.strip().splitlines()
    assert web == "[]"
    loaded = set(ast.literal_eval(service_modules))
    assert "service.jobs.runner_api" in loaded  # the check sees the worker's imports at all
    assert not loaded & {"service.jobs.service", "service.models.service", "service.datasets.service", "service.errors",
                         "service.main", "service.deps", "service.auth"}
