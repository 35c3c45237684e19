"""Keypoints through the API: the reference keypoints model (bench/task_keypoints.py, tiny,
trained here) really learned, a default int8 job reports its label-free fidelity (and PCK / OKS
against `keypoints` labels when the eval data has them), recomputed here from the downloaded
artifact in ONNX Runtime; a job that breaks it fails the floor."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from tests.jobs_flow import download, upload_dataset, wait_finished

INT8 = [{"type": "quantize", "params": {"method": "static_int8"}}]
BREAKING_PRUNE = [{"type": "prune", "params": {"method": "channels", "ratio": 0.9, "round_to": 1}}]


@pytest.fixture(scope="module")
def keypointer(tmp_path_factory):
    import torch

    from bench.task_models import build

    torch.set_num_threads(1)
    return build("keypointer", "tiny", tmp_path_factory.mktemp("task-models"))


def run(path, images):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": images[i : i + 64]})[0] for i in range(0, len(images), 64)])


def object_sizes(points, visible):
    """Each image's diagonal of the box its visible keypoints span (no image here has fewer than 2)."""
    return np.array([np.linalg.norm(p[v].max(axis=0) - p[v].min(axis=0)) for p, v in zip(points, visible)])


def pck(truth, visible, predicted, threshold):
    distance = np.linalg.norm(predicted - truth, axis=2) / object_sizes(truth, visible)[:, None]
    return float(np.mean(distance[visible] <= threshold)), float(distance[visible].mean())


def test_the_keypointer_finds_the_corners_and_says_which_are_inside(keypointer):
    data = keypointer.eval_data()
    output = run(keypointer.onnx, data["images"].astype(np.float32) / 255.0)
    truth, labelled = data["keypoints"][:, :, :2], data["keypoints"][:, :, 2] > 0
    assert output.shape == (len(truth), 5, 3)
    within, _ = pck(truth, labelled, output[:, :, :2], 0.2)
    # Measured 0.986 at 0.2 of the object's diagonal; predicting every image's mean place gets 0.10.
    assert within >= 0.9, within
    # Corners over the edge are told apart from those inside: measured 0.99; all "inside" gets 0.77.
    assert np.mean((output[:, :, 2] >= 0.5) == labelled) >= 0.95


def _job(client, model_id, data, steps):
    response = client.post("/v1/jobs", json={"model_id": model_id, "data": data, "steps": steps})
    assert response.status_code == 202, response.text
    job, _ = wait_finished(client, response.json()["id"])
    return job


def _misses(original: np.ndarray, int8: np.ndarray, threshold: float) -> list[list[int]]:
    """Per image, the keypoints (visible in the original) farther than `threshold` of the diagonal
    of the box the original's visible keypoints span (an image spanning no box: the median one)."""
    visible = original[:, :, 2] >= 0.5
    diagonals = np.array([np.linalg.norm(p[v, :2].max(axis=0) - p[v, :2].min(axis=0)) if v.sum() > 1 else 0.0
                          for p, v in zip(original, visible)])
    diagonals = np.where(diagonals > 0, diagonals, np.median(diagonals[diagonals > 0]))
    far = np.linalg.norm(int8[:, :, :2] - original[:, :, :2], axis=2) / diagonals[:, None] > threshold
    return [[int(k) for k in np.flatnonzero(row)] for row in far & visible]


def test_default_int8_jobs_report_keypoint_fidelity_with_and_without_labels_and_a_broken_one_fails(client, keypointer, tmp_path):
    uploaded = client.post("/v1/models", files={"file": ("model.onnx", keypointer.onnx.read_bytes())},
                           data={"task": json.dumps(keypointer.task)})
    assert uploaded.status_code == 201, uploaded.text
    model_id = uploaded.json()["id"]
    data = keypointer.eval_data()
    np.savez(tmp_path / "unlabelled.npz", images=data["images"])
    labelled_eval = upload_dataset(client, keypointer.eval_npz)
    assert labelled_eval["label_kinds"] == ["keypoints"]
    calibration = upload_dataset(client, keypointer.calib_npz)["id"]
    images = data["images"].astype(np.float32) / 255.0
    original = run(keypointer.onnx, images).astype(np.float64)

    for eval_id in (labelled_eval["id"], upload_dataset(client, tmp_path / "unlabelled.npz")["id"]):
        job = _job(client, model_id, {"eval": eval_id, "calibration": calibration}, INT8)
        task, floor = job["metrics"]["comparison"]["task"], job["metrics"]["floor"]
        assert task["task"]["type"] == "keypoints" and not task["inferred"]
        # Measured 0.963 (mean error 1.6% of the object's diagonal) against the floor's 0.9.
        assert floor == {**floor, "mode": "default", "met": True, "bounds": {"pck": 0.9}}
        assert job["status"] == "succeeded", job["error"]
        # The figures recomputed here from the downloaded int8 model, judged on the keypoints
        # the original calls visible, normalised by the box they span.
        download(client, f"/v1/jobs/{job['id']}/artifacts/model.onnx", tmp_path / "int8.onnx")
        int8 = run(tmp_path / "int8.onnx", images).astype(np.float64)
        visible = original[:, :, 2] >= 0.5
        agreement, error = pck(original[:, :, :2], visible, int8[:, :, :2], 0.05)
        fidelity = task["fidelity"]
        assert abs(fidelity["pck"] - agreement) < 1e-9 and abs(fidelity["mean_normalized_error"] - error) < 1e-9
        assert fidelity["visibility_agreement"] == np.mean(visible == (int8[:, :, 2] >= 0.5))
        # The report's pictures: each image's misses are the test's own (beyond 5% of the box the
        # original's visible keypoints span), the image with the most misses drawn first.
        shown = job["metrics"]["examples"]["images"]
        assert shown and all(image["point_units"] == "pixels" for image in shown)
        misses = _misses(original, int8, 0.05)
        assert [image["missed"] for image in shown] == [misses[image["index"]] for image in shown]
        assert len(shown[0]["missed"]) == max(len(m) for m in misses[:256])
        scored = job["metrics"]["task_metrics"]
        if eval_id != labelled_eval["id"]:
            assert scored is None
            continue
        truth, labelled = data["keypoints"][:, :, :2], data["keypoints"][:, :, 2] > 0
        for side, output in (("original", original), ("compressed", int8)):
            expected, expected_error = pck(truth, labelled, output[:, :, :2], 0.05)
            assert abs(scored[side]["pck"] - expected) < 1e-9, side
            assert abs(scored[side]["mean_normalized_error"] - expected_error) < 1e-9, side
            assert abs(scored[side]["pck_0_2"] - pck(truth, labelled, output[:, :, :2], 0.2)[0]) < 1e-9
        assert abs(scored["drop"]["pck"] - (scored["original"]["pck"] - scored["compressed"]["pck"])) < 1e-9

    broken = _job(client, model_id, {"eval": labelled_eval["id"], "calibration": calibration}, BREAKING_PRUNE)
    assert broken["status"] == "failed" and broken["error"]["code"] == "fidelity_floor_not_met"
    # Measured 0.0: the pruned model's keypoints land far from the original's (1.4 diagonals).
    assert broken["metrics"]["floor"]["shortfalls"][0]["metric"] == "pck"
    assert broken["metrics"]["comparison"]["task"]["fidelity"]["pck"] < 0.5
