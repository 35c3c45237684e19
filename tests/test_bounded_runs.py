"""A job's cancel or deadline stops an ONNX Runtime run in progress (worker/engine/stoppable.py):
the worker is free for the next job instead of finishing a run that nobody will read.

The model's one run takes many minutes: a Loop of 100,000 512x512 MatMuls (the most trips an
upload may name), fed from the input so nothing folds away. Without the stop, the embedded
worker's one thread stays inside the first evaluation run and the next job is never claimed
within these tests' generous waits."""

import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.config import Settings
from tests.jobs_flow import upload_dataset, upload_model, wait_finished

SIDE = 512
TRIPS = 100_000


def slow_model(path, trips=TRIPS):
    """x [N,1,8,8] -> scores [N,10]; every run multiplies a SIDE x SIDE matrix `trips` times."""
    weight = numpy_helper.from_array((np.random.default_rng(0).standard_normal((SIDE, SIDE)) / SIDE).astype(np.float32), "w")
    body = helper.make_graph(
        [helper.make_node("MatMul", ["a_in", "w"], ["a_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("a_in", TensorProto.FLOAT, [SIDE, SIDE])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("a_out", TensorProto.FLOAT, [SIDE, SIDE])])
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["level"], keepdims=0),
        helper.make_node("Mul", ["w", "level"], ["a0"]),
        helper.make_node("Loop", ["trips", "go", "a0"], ["a_end"], body=body),
        helper.make_node("ReduceMean", ["a_end"], ["bias"], keepdims=0),
        helper.make_node("Flatten", ["x"], ["flat"]),
        helper.make_node("MatMul", ["flat", "head"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["y"]),
    ]
    initializers = [weight, numpy_helper.from_array(np.array(trips, np.int64), "trips"),
                    numpy_helper.from_array(np.array(True), "go"),
                    numpy_helper.from_array(np.random.default_rng(1).standard_normal((64, 10)).astype(np.float32), "head")]
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def plugins():
    import tests.plugins  # noqa: F401  (registers the test-only `wait` step: no step runs the model)


@pytest.fixture
def digits(tmp_path):
    """32 labelled 8x8 grey images: what the model takes."""
    rng = np.random.default_rng(2)
    path = tmp_path / "digits.npz"
    np.savez(path, images=rng.integers(0, 256, (32, 1, 8, 8), dtype=np.uint8), labels=rng.integers(0, 10, 32))
    return path


def submit_evaluation(http, model_id, data_id):
    response = http.post("/v1/jobs", json={"model_id": model_id, "steps": [{"type": "wait", "params": {"seconds": 0}}],
                                           "data": {"eval": data_id}})
    assert response.status_code == 202, response.text
    return response.json()


def wait_for_stage(http, job_id, stage, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["stage"] == stage:
            return job
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached stage {stage}")


def test_cancel_stops_a_long_evaluation_run_and_the_worker_takes_the_next_job(client, digits, tmp_path, plugins):
    slow = upload_model(client, slow_model(tmp_path / "slow.onnx"))["id"]
    data = upload_dataset(client, digits)["id"]
    job = submit_evaluation(client, slow, data)
    wait_for_stage(client, job["id"], "evaluate:original")  # inside the first run: batch-1 warm-up
    time.sleep(1)
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    cancelled, _ = wait_finished(client, job["id"], timeout=120)
    assert cancelled["status"] == "cancelled"
    # The one worker thread is free again: an ordinary job runs to the end (the slow run alone
    # would hold it for many minutes, its 13 timed runs for hours).
    follower = submit_evaluation(client, upload_model(client, slow_model(tmp_path / "quick.onnx", trips=1))["id"], data)
    finished, _ = wait_finished(client, follower["id"], timeout=250)
    assert finished["status"] == "succeeded", finished["error"]


def test_a_deadline_stops_a_long_run_and_the_next_job_is_taken(tmp_path, digits, plugins):
    from fastapi.testclient import TestClient

    from worker.serve import create_app

    with TestClient(create_app(Settings(data_dir=tmp_path / "data", job_time_limit_s=15))) as client:
        slow = upload_model(client, slow_model(tmp_path / "slow.onnx"))["id"]
        quick = upload_model(client, slow_model(tmp_path / "quick.onnx", trips=1))["id"]
        data = upload_dataset(client, digits)["id"]
        first, second = submit_evaluation(client, slow, data), submit_evaluation(client, quick, data)
        # The second is claimed only once the first's run has stopped; it then runs to the end under
        # the same limit (its runs take milliseconds).
        finished, _ = wait_finished(client, first["id"], timeout=120)
        assert finished["status"] == "failed"
        assert finished["error"]["code"] == "time_limit_exceeded"
        assert finished["started_at"] is not None
        follower, _ = wait_finished(client, second["id"], timeout=120)
        assert follower["status"] == "succeeded", follower["error"]
