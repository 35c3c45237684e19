"""Cancel, deadline and SIGKILL while a real technique is inside a long library call, on the
production shape (Celery worker process, PostgreSQL, Redis, S3): ONNX Runtime's `quantize_static`
calibrating (its own InferenceSession, not ours), and torch training a batch. The `wait` step of
the other fault tests stands in for these where only the runner's protocol is tested.

The slow model is slow by its size alone (no sleeps): 1 -> 512 channels then three 512 -> 512 3x3
convolutions on 8x8 inputs, about 1.2 GFLOP an image. Measured on a 2-core AMD EPYC shared with
other test runs: one calibration batch of 16 takes ~0.5 s, so 1,024 calibration images (64
batches) take more than 30 s to calibrate; one training step of 16 images 1 to 4 s."""

import time
from datetime import datetime, timezone

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.jobs_flow import submit, upload_dataset, upload_model, wait_finished
from tests.processes import wait_for
from tests.stack import own_worker, stack_client

pytestmark = pytest.mark.integration

CHANNELS, LAYERS = 512, 4
CALIBRATION_IMAGES = 1024
# From the cancel request to `cancelled`, and to the next job's claim by the same worker: one
# heartbeat (2 s) or progress write (1 s), one calibration batch (~0.5 s idle, a few s loaded),
# the next job's dispatch. The heartbeat alone settles `cancelled` in time; the claim shows the
# run itself stopped: calibrating the rest would hold the worker more than 30 s even when idle.
CANCEL_BOUND_S = 20
# The worker's job time limit in the deadline test: room to load the 28 MB model and reach
# training on a loaded machine; training would go on for minutes.
TIME_LIMIT_S = 30
# Past the limit, to `failed` (the heartbeat settles it) and then to the run's work folder gone
# (the run itself stopped): one training step (8 images: ~0.5 s idle, ~2 s loaded) and the
# unwinding. Celery's soft limit, the backstop, comes 30 s after the limit, so a loop that checks
# only per epoch (128 steps, minutes) or not at all fails this.
DEADLINE_OVERRUN_BOUND_S = 15


def wide_convnet(path):
    """x [N,1,8,8] -> y [N,10]: Conv+BatchNorm+Relu (1 -> CHANNELS), LAYERS-1 times the same
    (CHANNELS -> CHANNELS), global average pool, a MatMul head. He-initialised so activations stay
    finite. BatchNorm as exported before folding: training then adds none (train_norm measures
    statistics for a convolution without one, over 512 images, half a minute on this model)."""
    rng = np.random.default_rng(0)
    initializers, nodes, previous, inputs = [], [], "x", 1
    for i in range(LAYERS):
        weight = (rng.standard_normal((CHANNELS, inputs, 3, 3)) * np.sqrt(2 / (inputs * 9))).astype(np.float32)
        zeros, ones = np.zeros(CHANNELS, np.float32), np.ones(CHANNELS, np.float32)
        initializers += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(zeros, f"b{i}"),
                         *(numpy_helper.from_array(v, f"{name}{i}") for v, name in ((ones, "scale"), (zeros, "shift"),
                                                                                    (zeros, "mean"), (ones, "var")))]
        nodes += [helper.make_node("Conv", [previous, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{i}", f"scale{i}", f"shift{i}", f"mean{i}", f"var{i}"], [f"n{i}"],
                                   name=f"norm{i}"),
                  helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}")]
        previous, inputs = f"r{i}", CHANNELS
    initializers.append(numpy_helper.from_array((rng.standard_normal((CHANNELS, 10)) / np.sqrt(CHANNELS)).astype(np.float32), "head"))
    nodes += [helper.make_node("GlobalAveragePool", [previous], ["pooled"], name="pool"),
              helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
              helper.make_node("MatMul", ["flat", "head"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def stack(request):
    with stack_client(request, "modelpress-real-faults") as (http, worker, _):
        yield http, worker


@pytest.fixture(scope="module")
def wide(stack, tmp_path_factory):
    """The slow model and 1,024 labelled 8x8 images, uploaded once: (model id, dataset id)."""
    http, _ = stack
    folder = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(3)
    np.savez(folder / "images.npz", images=rng.integers(0, 256, (CALIBRATION_IMAGES, 1, 8, 8), dtype=np.uint8),
             labels=rng.integers(0, 10, CALIBRATION_IMAGES))
    return upload_model(http, wide_convnet(folder / "wide.onnx"))["id"], upload_dataset(http, folder / "images.npz")["id"]


def job_state(http, job_id) -> dict:
    return http.get(f"/v1/jobs/{job_id}").json()


def seconds_between(start: str, end: str) -> float:
    def instant(text: str) -> datetime:  # the API's times are UTC, with or without an offset
        value = datetime.fromisoformat(text)
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)

    return (instant(end) - instant(start)).total_seconds()


# Its waits: a worker start (120 s at most), calibration's start (180 s), the cancel, the next job (300 s).
@pytest.mark.timeout(720)
def test_cancel_inside_ort_calibration_ends_the_job_and_the_worker_takes_the_next(stack, wide, reference):
    http, template = stack
    model_id, data_id = wide
    # The next job's inputs first, so it is sent as soon as the cancel has ended the first.
    model = upload_model(http, reference.onnx)
    calibration = upload_dataset(http, reference.calib_npz)
    with own_worker(template, "real-cancel"):
        # uint8: one calibration pass, under the stage "calibrate" (auto calibrates twice, under "try ... activations").
        job = submit(http, model_id, data_id, None, {"method": "static_int8", "activation_type": "uint8",
                                                     "calibration_samples": CALIBRATION_IMAGES})
        seen = wait_for(lambda: (state := job_state(http, job["id"]))["stage"] == "0:quantize:calibrate" and state,
                        180, "calibration to start", interval=0.1)
        # Inside ORT's calibration loop: its reader has reported a batch (the progress moved on).
        wait_for(lambda: (state := job_state(http, job["id"]))["progress"] > seen["progress"] or state["status"] != "running",
                 60, "a calibration batch", interval=0.1)
        during = job_state(http, job["id"])
        assert (during["status"], during["stage"]) == ("running", "0:quantize:calibrate"), during
        asked, asked_at = time.monotonic(), datetime.now(timezone.utc).isoformat()
        assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        finished, _ = wait_finished(http, job["id"], timeout=120)
        took = time.monotonic() - asked
        print(f"cancel inside calibration: cancelled {took:.1f} s after the request")
        assert finished["status"] == "cancelled", finished["error"]
        assert took < CANCEL_BOUND_S
        assert (finished["attempts"], finished["artifacts"]) == (1, [])
        # The worker is free at once: it claims an ordinary static int8 job and runs it to the end.
        follower, _ = wait_finished(http, submit(http, model["id"], calibration["id"], None)["id"], timeout=300)
        freed = seconds_between(asked_at, follower["started_at"])
        print(f"next job: claimed {freed:.1f} s after the cancel request, {follower['status']}")
        assert follower["status"] == "succeeded", follower["error"]
        assert follower["attempts"] == 1
        assert freed < CANCEL_BOUND_S


# Its waits: a worker start (120 s at most), training's start (the limit), the failure (120 s), the folder (60 s).
@pytest.mark.timeout(480)
def test_deadline_inside_training_fails_the_job_in_bounded_time_and_cleans_its_folder(stack, wide):
    http, template = stack
    model_id, data_id = wide
    work_folders = template.log_dir / "data" / "tmp"  # the stack's MODELPRESS_DATA_DIR, tmp/
    with own_worker(template, "real-deadline", env={"MODELPRESS_JOB_TIME_LIMIT_S": str(TIME_LIMIT_S)}):
        # alpha 1: cross-entropy on the labels alone, no teacher pass over the training set first.
        steps = [{"type": "distill", "params": {"epochs": 20, "batch_size": 8, "alpha": 1.0}}]
        response = http.post("/v1/jobs", json={"model_id": model_id, "steps": steps, "data": {"train": data_id}, "floor": "off"})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        wait_for(lambda: job_state(http, job_id)["stage"].startswith("0:distill:epoch 1/"), TIME_LIMIT_S + 60,
                 "training to start", interval=0.1)
        assert job_state(http, job_id)["status"] == "running"
        assert any(folder.name.startswith(f"{job_id}-") for folder in work_folders.iterdir())
        finished, _ = wait_finished(http, job_id, timeout=TIME_LIMIT_S + 120)
        assert finished["status"] == "failed"
        assert finished["error"]["code"] == "time_limit_exceeded", finished["error"]
        ran = seconds_between(finished["started_at"], finished["finished_at"])
        print(f"deadline inside training: failed {ran:.1f} s after its start (limit {TIME_LIMIT_S} s)")
        assert TIME_LIMIT_S <= ran < TIME_LIMIT_S + DEADLINE_OVERRUN_BOUND_S
        # The heartbeat settled the job; the run stops at its next batch and its work folder goes.
        wait_for(lambda: not any(folder.name.startswith(f"{job_id}-") for folder in work_folders.iterdir()),
                 DEADLINE_OVERRUN_BOUND_S, "the job's work folder to be removed", interval=0.1)


# Celery's own soft time limit, the backstop behind the runner's deadline: a step inside a call that
# never checks in (the quiet wait step sleeps 600 s) holds the worker after the heartbeat has failed
# the job; the soft limit (limit + 30 s) interrupts it, and the worker takes the next job long before
# Celery's hard limit (limit + 120 s) would kill the child.
BACKSTOP_LIMIT_S = 5


# Its waits: a worker start (120 s at most), the failure (60 s), the follower (300 s).
@pytest.mark.timeout(600)
def test_celerys_soft_limit_frees_a_worker_stuck_in_a_call_that_never_checks_in(stack, reference):
    from worker.celery_app import SOFT_LIMIT_GRACE_S

    http, template = stack
    model = upload_model(http, reference.onnx)
    calibration = upload_dataset(http, reference.calib_npz)
    with own_worker(template, "real-backstop", env={"MODELPRESS_JOB_TIME_LIMIT_S": str(BACKSTOP_LIMIT_S)}) as worker:
        steps = [{"type": "wait", "params": {"seconds": 600, "quiet": True}}]
        response = http.post("/v1/jobs", json={"model_id": model["id"], "steps": steps,
                                               "data": {"calibration": calibration["id"]}, "floor": "off"})
        assert response.status_code == 202, response.text
        stuck, _ = wait_finished(http, response.json()["id"], timeout=BACKSTOP_LIMIT_S + 60)
        assert (stuck["status"], stuck["error"]["code"]) == ("failed", "time_limit_exceeded")
        follower, _ = wait_finished(http, submit(http, model["id"], calibration["id"], None)["id"], timeout=300)
        assert follower["status"] == "succeeded", follower["error"]
        freed = seconds_between(stuck["started_at"], follower["started_at"])
        print(f"Celery soft limit: next job claimed {freed:.1f} s after the stuck one started")
        # Soft limit at 35 s after the task started (its claim, `started_at`, comes a moment later:
        # measured 34.7 s); the hard limit would free it only at 125 s, the sleep at 600 s.
        assert BACKSTOP_LIMIT_S + SOFT_LIMIT_GRACE_S - 5 <= freed < BACKSTOP_LIMIT_S + SOFT_LIMIT_GRACE_S + 60
        assert "SoftTimeLimitExceeded" in worker.output() or "Soft time limit" in worker.output()
