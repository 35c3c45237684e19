"""Start the service the way it runs for real: the embedded default (`python -m worker.serve`, what `make run` starts), or the
production shape (API under uvicorn + a Celery worker process on PostgreSQL, Redis and S3)."""

import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import boto3

from tests.processes import Process, free_port, wait_for, wait_http

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def embedded_server(data_dir: Path, env: dict | None = None):
    port = free_port()
    api = Process("api-embedded", [sys.executable, "-m", "worker.serve"],
                  {"PORT": str(port), "MODELPRESS_DATA_DIR": str(data_dir), **(env or {})}, data_dir.parent)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", api)
        yield f"http://127.0.0.1:{port}", api
    finally:
        api.stop()


@contextmanager
def _own_database():
    from tests.conftest import PG_ADMIN_URL
    from tests.tenancy import fresh_postgres_database

    url, drop = fresh_postgres_database(PG_ADMIN_URL)
    try:
        yield url
    finally:
        drop()


@contextmanager
def production_stack(logs: Path, *, redis_url: str, s3_endpoint: str, bucket: str, extra_env: dict | None = None):
    """Each stack on a PostgreSQL database of its own, dropped when it stops (its URL is the API's
    and the worker's `DATABASE_URL`): no stack reads another's rows, nor one a reaper of another
    took over."""
    from service.migrate import upgrade

    with _own_database() as postgres_url:
        boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=bucket)
        upgrade(postgres_url)
        env = {
            **S3_ENV,
            "DATABASE_URL": postgres_url, "BROKER_URL": redis_url, "STORAGE_URL": f"s3://{bucket}/objects",
            "S3_ENDPOINT_URL": s3_endpoint, "MODELPRESS_DATA_DIR": str(logs / "data"), "MODELPRESS_STALE_JOB_AFTER_S": "10",
            # A slow test-only step, loaded the way a technique plug-in is.
            "MODELPRESS_PLUGINS": "tests.plugins",
            # These tests are about the jobs' path; keys on a served API are tested in test_api_keys.py.
            "MODELPRESS_AUTH": "off",
            # Its own broker keys: a worker of another run on the same Redis never takes this stack's tasks.
            "MODELPRESS_BROKER_PREFIX": f"{bucket}-{uuid.uuid4().hex[:8]}:",
            **(extra_env or {}),
        }
        worker = Process("worker", [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "cpu",
                                    "--pool", "prefork", "--concurrency", "1", "--loglevel", "INFO", "-n", f"cpu-{bucket}@%h"], env, logs)
        port = free_port()
        api = Process("api", [sys.executable, "-m", "service"], {**env, "PORT": str(port)}, logs)
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", api)
            wait_ready(worker)
            yield f"http://127.0.0.1:{port}", worker, api
        finally:
            api.stop()
            worker.stop()


@contextmanager
def stack_client(request, bucket: str, *, redis_url: str | None = None, extra_env: dict | None = None):
    """A module's production stack on a database of its own, the session's Redis (or `redis_url`) and S3, its
    logs in a folder of its own, and a client of its API: yields (http, worker, api). `bucket` names
    its S3 bucket, broker keys and worker, so no two stacks share a queue."""
    import httpx

    logs = request.getfixturevalue("tmp_path_factory").mktemp(bucket)
    with production_stack(logs, redis_url=redis_url or request.getfixturevalue("redis_url"),
                          s3_endpoint=request.getfixturevalue("s3_endpoint"), bucket=bucket, extra_env=extra_env) as (url, worker, api):
        with httpx.Client(base_url=url, timeout=30) as http:
            yield http, worker, api


def wait_ready(worker: Process, timeout: float = 120) -> None:
    wait_for(lambda: "ready" in worker.output() or not worker.alive(), timeout, "celery worker")
    assert worker.alive(), worker.output()


@contextmanager
def own_worker(template: Process, name: str, env: dict | None = None):
    """A Celery worker of the test's own, and no other: the stack's first worker is stopped, so no
    job of this test can go to a worker it does not control (whatever ran before). `env`: settings
    of this worker only (a shorter job time limit)."""
    template.stop()
    worker = template.restarted(name) if env is None else \
        Process(name, template.args, {**template.env, **env}, template.log_dir, template.cwd)
    try:
        wait_ready(worker)
        yield worker
    finally:
        worker.stop()
