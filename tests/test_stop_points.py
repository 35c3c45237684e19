"""Where a job's stop reaches a step that is inside a long library call (worker/engine/stoppable.py):
ORT's static-int8 calibration, which runs its own InferenceSession, is stopped by its data reader
before the next batch, and the stop comes out of the step as it went in (not as the quantizer's
failure); the guard lets the deadline through; bias correction's and AdaRound's runs stop with the
job. The same stops on the real stack, with a model slow by its size: test_real_faults.py."""

import pytest

from modelpress.spec.configs import parse_step
from worker.engine.data import ImageSet
from worker.engine.errors import JobCancelled, TimeLimitExceeded
from worker.engine.registry import StepContext, handler_for
from worker.engine.stoppable import RunStopper, stopping_with
from tests.test_equalize import digits, unbalanced_model  # noqa: F401 (digits: a fixture)

BATCH = 16  # static_int8.CALIBRATION_BATCH


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return unbalanced_model(tmp_path_factory.mktemp("stops") / "m.onnx")


def run_step(model, workdir, calibration, progress, eval_images=None, **params):
    config = parse_step("quantize", {"method": "static_int8", "activation_type": "uint8", **params})
    data = {"calibration": ImageSet(calibration, None)}
    if eval_images is not None:
        data["eval"] = ImageSet(eval_images, None)
    return handler_for(config)(config, StepContext(model, model, workdir, data, progress))


class StopAtBatch:
    """A job's progress function that raises `stop` when ORT's calibration asks for batch `batch`
    (numbered from 0) of the calibration pass, and keeps what was reported until then."""

    def __init__(self, stop, batch: int):
        self.stop, self.batch, self.reports = stop, batch, []

    def __call__(self, stage, fraction):
        self.reports.append((stage, fraction))
        asked = sum(1 for s, _ in self.reports if s == "calibrate") - 1  # the first report opens the stage
        if stage == "calibrate" and asked > self.batch:
            raise self.stop()


@pytest.mark.parametrize("stop", [JobCancelled, lambda: TimeLimitExceeded(30)], ids=["cancel", "deadline"])
def test_a_stop_inside_ort_calibration_comes_out_as_it_went_in_after_the_batch_in_progress(tmp_path, digits, model, stop):
    calibration, _ = digits
    progress = StopAtBatch(stop, batch=3)
    with pytest.raises((JobCancelled, TimeLimitExceeded)) as raised:
        run_step(model, tmp_path, calibration, progress)
    # The quantizer's own failure (quantization_failed) would be an EngineError of another code.
    assert isinstance(raised.value, JobCancelled) or raised.value.code == "time_limit_exceeded"
    calibrating = [fraction for stage, fraction in progress.reports if stage == "calibrate"]
    # Reports: the stage's opening, then one before each batch: ORT ran batches 0..2 and was
    # stopped asking for batch 3 (of 256 / 16 = 16): 0.2 + 0.45 * 3/16 is the last fraction.
    assert len(calibrating) == 1 + 4
    assert calibrating[-1] == pytest.approx(0.2 + 0.45 * 3 / (len(calibration) // BATCH))


def test_the_guard_lets_the_deadline_through_instead_of_trying_the_next_candidate(tmp_path, digits, model):
    calibration, images = digits
    reports = []

    def progress(stage, fraction):
        reports.append(stage)
        if stage.endswith(": calibrate") and reports.count(stage) > 2:  # inside the first candidate's calibration
            raise TimeLimitExceeded(30)

    with pytest.raises(TimeLimitExceeded):
        run_step(model, tmp_path, calibration, progress, eval_images=images,
                 guard={"min_top1_agreement": 0.999, "budget_s": 600})
    tried = {stage.split(":")[1] for stage in reports if stage.startswith("guard: ")}
    assert len(tried) == 1, tried  # a recorded failure would have gone on to the next candidate


@pytest.mark.parametrize("stage, params", [("bias correction", {"bias_correction": "fast"}), ("adaround", {"adaround": True})])
def test_bias_correction_and_adaround_stop_with_the_job(tmp_path, digits, model, stage, params):
    """The heartbeat's stop (RunStopper.stop) set as the stage starts ends the stage's runs and
    loops: the step raises the stop before it reaches its next stage."""
    calibration, _ = digits
    stopper, stages = RunStopper(), []

    def progress(name, fraction):
        stages.append(name)
        if name == stage:
            stopper.stop(JobCancelled)

    with stopping_with(stopper), pytest.raises(JobCancelled):
        run_step(model, tmp_path, calibration, progress, **params)
    assert stages[-1] == stage
