"""The keypoints task: its layouts and their fit to output shapes, decoding, the label-free and
labelled figures against references computed here, and `keypoints` labels checked at upload and
against the task at job creation."""

import io

import numpy as np
import pytest
from pydantic import ValidationError

from modelpress.spec.configs.task import CtcTask, infer_task, misfit, parse_task
from tests.test_models_api import assert_problem, upload
from worker.engine.tasks.keypoints import decode, keypoint_agreement, keypoint_scores

# Four keypoints on a 6 x 8 box (diagonal 10) per image.
SQUARE = np.array([[0.0, 0.0], [6.0, 0.0], [6.0, 8.0], [0.0, 8.0]])


@pytest.mark.parametrize(("task", "shape", "fits"), [
    ({}, (1, 17, 2), True), ({}, (1, 17, 3), True), ({}, ("batch", 17, 3), True),
    ({}, (1, 17, 4), False), ({}, (1, 34), False), ({"keypoints": 16}, (1, 17, 2), False),
    ({"layout": "flat", "keypoints": 17}, (1, 34), True), ({"layout": "flat", "keypoints": 17}, (1, 51), True),
    ({"layout": "flat", "keypoints": 17}, (1, 35), False), ({"layout": "flat", "keypoints": 17}, (1, 68), False),
    ({"layout": "flat", "keypoints": 17}, (1, "width"), True),
    ({"layout": "heatmaps"}, (1, 17, 64, 48), True), ({"layout": "heatmaps", "keypoints": 5}, (1, 17, 64, 48), False),
    ({"layout": "heatmaps"}, (1, 17, 3), False),
])
def test_each_layout_fits_only_outputs_of_its_shape(task, shape, fits):
    problem = misfit(parse_task({"type": "keypoints", **task}), [shape])
    assert (problem is None) == fits, problem


def test_a_flat_layout_needs_its_keypoint_count_and_keypoints_are_never_inferred():
    with pytest.raises(ValidationError):
        parse_task({"type": "keypoints", "layout": "flat"})
    # (N, K, 2) is read as CTC today, and inference stays as it was: a keypoints task is given.
    assert isinstance(infer_task([(1, 17, 2)]).task, CtcTask)


def test_the_layouts_decode_to_the_same_points():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 40, (3, 4, 3))
    as_points, visible = decode(parse_task({"type": "keypoints"}), points)
    flat, flat_visible = decode(parse_task({"type": "keypoints", "layout": "flat", "keypoints": 4}), points.reshape(3, 12))
    assert np.array_equal(as_points, points[:, :, :2]) and np.array_equal(flat, as_points)
    assert np.array_equal(visible, points[:, :, 2] >= 0.5) and np.array_equal(flat_visible, visible)
    _, logits_visible = decode(parse_task({"type": "keypoints", "visibility_activation": "sigmoid"}), points - [0, 0, 20])
    assert np.array_equal(logits_visible, points[:, :, 2] >= 20)  # sigmoid(v - 20) >= 0.5 exactly when v >= 20
    maps = np.zeros((2, 4, 6, 5))
    peaks = [(1, 2), (4, 0), (0, 5), (3, 3)]  # (x, y)
    for k, (x, y) in enumerate(peaks):
        maps[:, k, y, x] = 1.0
    decoded, none = decode(parse_task({"type": "keypoints", "layout": "heatmaps"}), maps)
    assert none is None and decoded.tolist() == [[list(map(float, p)) for p in peaks]] * 2


def test_label_free_pck_error_and_visibility_agreement_against_a_hand_count():
    reference = np.concatenate([np.stack([SQUARE, SQUARE * 2]), np.ones((2, 4, 1))], axis=2)  # diagonals 10 and 20
    candidate = reference.copy()
    candidate[0, 0, 0] += 0.4  # 0.04 of its diagonal: within 0.05
    candidate[0, 1, 1] += 0.6  # 0.06: outside
    candidate[1, 2, 0] += 0.9  # 0.045 of 20: within
    candidate[1, 3, 2] = 0.0  # the candidate calls it hidden
    figures = keypoint_agreement(parse_task({"type": "keypoints"}), reference, candidate)
    assert figures["pck"] == 7 / 8 and figures["keypoints_judged"] == 8
    assert figures["mean_normalized_error"] == pytest.approx((0.04 + 0.06 + 0.045) / 8)
    assert figures["visibility_agreement"] == 7 / 8
    # "extent": one diagonal for both images, the box of all keypoints (12 x 16: 20).
    extent = keypoint_agreement(parse_task({"type": "keypoints", "normalize": "extent"}), reference, candidate)
    assert extent["mean_normalized_error"] == pytest.approx((0.4 + 0.6 + 0.9) / 20 / 8)
    # A keypoint the original calls hidden is not judged, however far the candidate moves it.
    reference[0, 0, 2] = 0.0
    candidate[0, 0, :2] += 100
    assert keypoint_agreement(parse_task({"type": "keypoints"}), reference, candidate)["keypoints_judged"] == 7


def test_labelled_pck_and_oks_skip_unlabelled_keypoints():
    truth = np.concatenate([SQUARE[None], np.array([[[2.0], [2.0], [2.0], [0.0]]])], axis=2)
    output = SQUARE[None].copy()
    output[0, 0] += [3.0, 4.0]  # 5 px off: 0.5 of the diagonal
    output[0, 3] += 100.0  # unlabelled: not scored
    scores = keypoint_scores(parse_task({"type": "keypoints", "pck_threshold": 0.1}), truth, output)
    # The labelled keypoints (0, 0), (6, 0), (6, 8) span a 6 x 8 box: diagonal 10, area 48.
    assert scores["keypoints_labelled"] == 3 and scores["pck"] == 2 / 3 and scores["pck_0_2"] == 2 / 3
    assert scores["mean_normalized_error"] == pytest.approx(0.5 / 3)
    assert scores["oks"] == pytest.approx((np.exp(-25 / (2 * 48 * 0.1 ** 2)) + 2) / 3)


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, images=np.zeros((4, 1, 8, 8), np.uint8), **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize(("keypoints", "words"), [
    (np.zeros((4, 5)), "expected [4, K, 2 or 3]"), (np.zeros((3, 5, 2)), "expected [4, K, 2 or 3]"),
    (np.zeros((4, 5, 4)), "expected [4, K, 2 or 3]"), (np.full((4, 5, 3), -1.0), "visibility"),
    (np.full((4, 5, 2), np.nan), "NaN"), (np.full((4, 5, 2), "a"), "dtype"),
])
def test_bad_keypoint_labels_are_refused_at_upload(client, keypoints, words):
    body = assert_problem(client.post("/v1/datasets", files={"file": ("d.npz", _npz(keypoints=keypoints))}), 422, "invalid_labels")
    assert words in body["detail"] and "keypoints" in body["detail"]


def test_keypoint_labels_and_tasks_are_checked_against_the_model_at_job_creation(client, reference):
    truth = np.concatenate([np.tile(SQUARE[None], (4, 1, 1)), np.full((4, 4, 1), 2.0)], axis=2)
    accepted = client.post("/v1/datasets", files={"file": ("d.npz", _npz(keypoints=truth))}).json()
    assert accepted["label_kinds"] == ["keypoints"]
    assert accepted["labels"]["keypoints"] == {"count": 4, "keypoints": 4, "columns": 3, "labelled": 16,
                                               "min_x": 0.0, "min_y": 0.0, "max_x": 6.0, "max_y": 8.0}
    model_id = upload(client, reference.onnx.read_bytes(), "resnet.onnx").json()["id"]  # output (N, 10)

    def create(task):
        return client.post("/v1/jobs", json={"model_id": model_id, "task": task, "data": {"eval": accepted["id"]},
                                             "steps": [{"type": "quantize", "params": {"method": "fp16"}}]})

    assert_problem(create({"type": "keypoints"}), 422, "task_does_not_fit_model")  # points read (N, K, 2|3)
    assert_problem(create({"type": "keypoints", "layout": "flat", "keypoints": 3}), 422, "task_does_not_fit_model")
    # (N, 10) as 5 keypoints of x, y fits the output, but the labels hold 4 keypoints per image.
    body = assert_problem(create({"type": "keypoints", "layout": "flat", "keypoints": 5}), 422, "labels_do_not_fit_task")
    assert "4 keypoints" in body["detail"]
    fits = client.post("/v1/jobs", json={"model_id": model_id, "task": {"type": "keypoints", "layout": "flat", "keypoints": 5},
                                         "data": {}, "steps": [{"type": "quantize", "params": {"method": "fp16"}}]})
    assert fits.status_code == 202, fits.text
