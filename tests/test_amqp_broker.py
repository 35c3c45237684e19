"""RabbitMQ as the broker: the production shape with `BROKER_URL=amqp://...` instead of Redis (the
other broker Celery's users run). The API sends, a real Celery worker process takes the job from
RabbitMQ, and the job ends as on Redis. RabbitMQ is started by tests/ensure_services.sh. Only this test uses it, so the default
vhost's `cpu` queue is this worker's alone; a message a killed earlier run left there names a job
this stack's database does not have, and the worker's claim of it does nothing."""

import socket

import httpx
import pytest

from tests.jobs_flow import check_quantized_job
from tests.processes import wait_for
from tests.stack import production_stack

pytestmark = pytest.mark.integration

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def rabbitmq_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def amqp_stack(tmp_path_factory, s3_endpoint):
    # ensure_services.sh starts it detached; a cold start takes a few seconds.
    wait_for(rabbitmq_up, 60, "RabbitMQ on 127.0.0.1:5672")
    logs = tmp_path_factory.mktemp("amqp")
    with production_stack(logs, redis_url=AMQP_URL, s3_endpoint=s3_endpoint,
                          bucket="modelpress-amqp") as (url, worker, api):
        with httpx.Client(base_url=url, timeout=30) as http:
            yield http, worker


def test_a_job_runs_through_rabbitmq(amqp_stack, reference, tmp_path):
    http, worker = amqp_stack
    ready = http.get("/readyz").json()
    assert ready["checks"]["broker"] == "ok" and ready["worker"] == "celery"
    job = check_quantized_job(http, reference, tmp_path, reference.onnx)
    assert job["attempts"] == 1
    # The worker process took it from RabbitMQ (its log names the broker and the job).
    assert "amqp://" in worker.output() and job["id"] in worker.output()
