import inspect
import os
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# The shared checks of a job's example images assert in a helper module: pytest explains their failures too.
pytest.register_assert_rewrite("tests.examples_check")

from tests.processes import VENV_BIN, Process, free_port, wait_for
from tests.stack import S3_ENV

PG_ADMIN_URL = os.environ.get("MODELPRESS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MODELPRESS_TEST_REDIS", "redis://127.0.0.1:6379/15")


def service_environment_names() -> set[str]:
    """Every environment variable `Settings` reads, lower-cased (pydantic-settings matches names
    case-insensitively): each field's aliases, and the field's own name where it has none."""
    from service.config import Settings

    names = set()
    for field_name, field in Settings.model_fields.items():
        aliases = getattr(field.validation_alias, "choices", None) or [field.validation_alias or field_name]
        names.update(alias.lower() for alias in aliases if isinstance(alias, str))
    return names


def _forget_service_environment() -> None:
    # A test's settings and the servers it starts are built only from what the test gives: an
    # exported production environment (DATABASE_URL, BROKER_URL, MODELPRESS_AUTH=on ...) would
    # otherwise turn an embedded test into one against that database, or change its limits. The test
    # harness's own variables (MODELPRESS_TEST_PG, MODELPRESS_TEST_REDIS) are no setting, so stay.
    names = service_environment_names()
    for key in [key for key in os.environ if key.lower() in names]:
        del os.environ[key]


_forget_service_environment()


def _terminated(signum, frame):
    # SIGTERM (a CI timeout, `kill`) ends the run as Ctrl-C does: pytest runs the fixtures' teardown,
    # and tests.processes stops what is still running, so no worker outlives the run.
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _terminated)


# The test files that take longest in one pytest process, longest first (LONG_FILES_MEASURED). `make
# test` hands out whole files (`--dist loadfile`) in collection order (`--no-loadscope-reorder`):
# these start first, so the last file to finish is a short one and neither process idles long at
# the end. xdist's default order (most tests first) left the few-test, slow fault files for last.
LONG_FILES_MEASURED = ("2026-12-07, a full `pytest -n 2 --dist loadfile` run, 2-core Intel Xeon at load 12-18 "
                       "(7,961 s summed; an idle run is about 3 times faster)")
LONG_FILES = (
    "test_stack.py",  # 679 s summed at that load: two worker kills inside real training
    "test_formats.py",  # 656 s: the MobileNet-style reference alone 547 s
    "test_distill.py",  # 622 s
    "test_jobs_embedded.py",  # 484 s
    "test_client_cli.py",  # 443 s: an embedded server and a production stack
    "test_prune.py",  # 329 s
    "test_quantize_methods.py",  # 273 s
    "test_hostile_inputs.py",  # 222 s
    "test_qat_training.py",  # 210 s
    "test_error_codes_jobs.py",  # 188 s
    "test_webhooks.py",  # 186 s
    "test_label_uploads.py",  # 169 s
    "test_image_datasets.py",  # 165 s
    "test_api_keys.py",  # 162 s
    "test_floor_jobs.py",  # 154 s
    "test_resumable_uploads.py",  # 153 s
    "test_real_faults.py",  # 3 tests, each long: cancel, deadline and kill inside real library calls
    "test_worker_faults.py",  # 102 s
    "test_reference_task_models.py",  # 527 s, 439 s of it training the task models: cached since
)


@pytest.hookimpl(trylast=True)  # after pytest's own grouping by fixture: a stable sort keeps it within each file
def pytest_collection_modifyitems(session, config, items):
    rank = {name: place for place, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@dataclass
class Reference:
    """A small ResNet-style CNN trained on scikit-learn digits, in every upload format, and data."""

    onnx: Path
    pt2: Path
    torchscript: Path
    eval_npz: Path  # labelled, NCHW uint8
    calib_npz: Path  # unlabelled
    train_npz: Path  # the labelled training split
    train_unlabelled_npz: Path  # the same images without labels
    nhwc_npz: Path  # the eval images as N,H,W,C
    nhw_npz: Path  # the eval images as N,H,W
    wrong_size_npz: Path  # 12x12 images: do not fit the 8x8 model
    eval_images: np.ndarray
    eval_labels: np.ndarray
    module: object  # the trained torch module


REFERENCE_WIDTHS = (8, 16, 32)


def _train_reference(out: Path) -> None:
    """Train and export the reference CNN, and write its data sets, into `out`."""
    import torch

    from bench.reference import ResNetSmall, export_all, load_digits_split, train

    train_split, test_split = load_digits_split()
    torch.manual_seed(0)  # the initial weights too: every session tests the same model
    model = train(ResNetSmall(widths=REFERENCE_WIDTHS), train_split, epochs=4)
    export_all(model, test_split.images, out, "resnet")
    torch.save(model.state_dict(), out / "resnet.state.pt")
    images, labels = test_split.images, test_split.labels
    np.savez(out / "eval.npz", images=images, labels=labels)
    np.savez(out / "calib.npz", images=train_split.images[:200])
    np.savez(out / "train.npz", images=train_split.images, labels=train_split.labels)
    np.savez(out / "train-unlabelled.npz", images=train_split.images)
    np.savez(out / "nhwc.npz", images=images.transpose(0, 2, 3, 1), labels=labels)
    np.savez(out / "nhw.npz", images=images[:, 0], labels=labels)
    np.savez(out / "wrong.npz", images=np.zeros((20, 1, 12, 12), np.uint8))


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Reference:
    import torch

    from bench.reference import ResNetSmall
    from tests.trained import ROOT, cached, code_key, copy_of

    # Trained once per version of the code that decides it (bench/reference.py, `_train_reference`),
    # shared by both pytest processes and later sessions; each session works on its own copy.
    key = code_key(ROOT / "bench" / "reference.py", extra=inspect.getsource(_train_reference) + repr(REFERENCE_WIDTHS))
    out = copy_of(cached("reference", key, _train_reference), tmp_path_factory.mktemp("reference"))
    model = ResNetSmall(widths=REFERENCE_WIDTHS)
    model.load_state_dict(torch.load(out / "resnet.state.pt"))
    with np.load(out / "eval.npz") as archive:
        images, labels = archive["images"], archive["labels"]
    return Reference(out / "resnet.onnx", out / "resnet.pt2", out / "resnet.ts.pt", out / "eval.npz", out / "calib.npz",
                     out / "train.npz", out / "train-unlabelled.npz", out / "nhwc.npz", out / "nhw.npz", out / "wrong.npz",
                     images, labels, model.eval())


@pytest.fixture
def settings(tmp_path):
    from service.config import Settings

    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def client(settings):
    from fastapi.testclient import TestClient

    from worker.serve import create_app

    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


# --- real servers ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_url():
    """A fresh PostgreSQL database for the session, migrated by the tests that need it."""
    import psycopg

    name = f"modelpress_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url():
    import redis

    # No FLUSHDB: another suite (a second checkout, a CI run) may share this database. Every stack
    # sends under its own MODELPRESS_BROKER_PREFIX, so runs never see each other's keys.
    redis.Redis.from_url(REDIS_URL).ping()
    yield REDIS_URL


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on loopback (a real HTTP S3 endpoint)."""
    import httpx

    port = free_port()
    log_dir = tmp_path_factory.mktemp("moto")
    server = Process("moto", [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], S3_ENV, log_dir)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 30, "moto server")
        yield url
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    import boto3

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    bucket = f"mp-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket
