"""The reference task models of bench/task_models.py (tiny configuration, trained here, seeded)
really learned their tasks, judged by this test's own implementation of each task's measure on
held-out data; and a default static int8 job through the API on each reports the task fidelity of
the right task type, with the floor judged on it and the job's status following the floor."""

import inspect
import itertools
import json

import numpy as np
import onnxruntime as ort
import pytest

from tests.examples_check import check_detector, check_recognizer, check_segmenter, embedded_images
from tests.jobs_flow import download, upload_dataset, wait_finished

NAMES = ("detector", "recognizer", "segmenter", "embedder")
TASK_TYPES = {"detector": "detection", "recognizer": "ctc", "segmenter": "segmentation", "embedder": "embedding"}


def _train_task_models(out):
    from bench.task_models import build

    for name in NAMES:
        build(name, "tiny", out)


@pytest.fixture(scope="module")
def task_models(tmp_path_factory):
    import torch

    from bench.task_models import build
    from tests.trained import ROOT, cached, code_key, copy_of

    torch.set_num_threads(1)
    # Trained once per version of bench/task_models.py and bench/task_data.py (tests/trained.py);
    # `build` finds the trained files in this session's copy and does not train again.
    key = code_key(ROOT / "bench" / "task_models.py", ROOT / "bench" / "task_data.py",
                   extra=inspect.getsource(_train_task_models) + "threads=1")
    out = copy_of(cached("task-models", key, _train_task_models), tmp_path_factory.mktemp("task-models"))
    return {name: build(name, "tiny", out) for name in NAMES}


def run(path, images):
    """The model's first output, in batches of 64 with one thread, as the service runs it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {session.get_inputs()[0].name: images[i : i + 64]})[0]
                           for i in range(0, len(images), 64)])


def eval_of(model):
    data = model.eval_data()
    return data, data["images"].astype(np.float32) / 255.0


def box_iou(box, boxes):
    """IoU of one xyxy box with each of (K, 4) xyxy boxes."""
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def test_the_detector_finds_its_truth_boxes(task_models):
    data, images = eval_of(task_models["detector"])
    output = run(task_models["detector"].onnx, images)
    assert output.shape == (len(images), 4 + 10, 64)  # Ultralytics' export layout: (N, 4 + C, A)
    scores = output[:, 4:]
    assert scores.min() >= 0 and scores.max() <= 1  # sigmoid scores, not logits
    found = 0
    for box, cls, image in zip(data["boxes"], data["box_classes"], data["box_images"]):
        rows = output[image]
        confident = rows[4:].max(axis=0) >= 0.5
        cx, cy, w, h = rows[:4, confident]
        predicted = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        classes = rows[4:, confident].argmax(axis=0)
        found += bool(((box_iou(box, predicted) >= 0.5) & (classes == cls)).any())
    recall = found / len(data["boxes"])
    # Measured 0.82 (294 truth boxes, 200 scenes). Chance is ~0: a box must overlap a 6x8 digit at
    # IoU 0.5 and name its class (1 in 10); a detector that localises but guesses classes gets ~0.09,
    # one whose boxes are off by a stride (4 px) stays under 0.3.
    assert recall >= 0.7, recall


def greedy(output):
    """Best class per step, runs merged, blanks (0) dropped."""
    return [tuple(c for c, _ in itertools.groupby(steps.argmax(axis=1)) if c != 0) for steps in output]


def test_the_recognizer_reads_its_lines(task_models):
    data, images = eval_of(task_models["recognizer"])
    output = run(task_models["recognizer"].onnx, images)
    assert output.shape == (len(images), 32, 11)  # (N, T = width / 2, blank + 10 digits)
    assert np.allclose(output.sum(axis=2), 1, atol=1e-4)  # softmax
    alphabet = task_models["recognizer"].task["alphabet"]
    truth = [tuple(alphabet.index(c) + 1 for c in text) for text in data["texts"]]
    exact = np.mean([p == t for p, t in zip(greedy(output), truth)])
    # Measured 0.875 on 200 held-out lines of 1-4 digits. Guessing the string is ~0; a model that
    # gets every line but one character right per line would score 0; one reading lines shifted by a
    # class id (blank confusion) 0 as well. 0.75 fails a model reading one line in four wrong.
    assert exact >= 0.75, exact


def test_the_segmenter_outlines_its_shapes(task_models):
    data, images = eval_of(task_models["segmenter"])
    output = run(task_models["segmenter"].onnx, images)
    assert output.shape == (len(images), 4, 32, 32)
    predicted, truth = output.argmax(axis=1), data["masks"]
    ious = [np.sum((predicted == c) & (truth == c)) / np.sum((predicted == c) | (truth == c)) for c in range(4)]
    # Measured mIoU 0.905. All background scores about 0.2 (one class of four, at IoU ~0.8); telling
    # shapes from the background without their kind (circle, rectangle, triangle) about 0.45.
    assert np.mean(ious) >= 0.8, ious


def test_the_embedder_verifies_held_out_pairs(task_models):
    data, images = eval_of(task_models["embedder"])
    output = run(task_models["embedder"].onnx, images)
    assert output.shape == (len(images), 16)
    assert np.allclose(np.linalg.norm(output, axis=1), 1, atol=1e-4)  # L2-normalised
    pairs, same = data["pairs"], data["pair_same"]
    similarity = np.sum(output[pairs[:, 0]] * output[pairs[:, 1]], axis=1)
    # The threshold is chosen on one half of the pairs and judged on the other.
    half = len(pairs) // 2
    candidates = np.unique(similarity[:half])
    threshold = candidates[np.argmax([np.mean((similarity[:half] >= t) == same[:half]) for t in candidates])]
    accuracy = np.mean((similarity[half:] >= threshold) == same[half:])
    # Measured 0.925. Chance is 0.5 (half the pairs are the same digit); the raw pixels as
    # embeddings, judged the same way, give 0.835: 0.88 fails them, as it fails an untrained network.
    assert accuracy >= 0.88, accuracy


@pytest.mark.parametrize("name", NAMES)
def test_a_default_int8_job_reports_fidelity_of_the_right_task(client, task_models, tmp_path, name):
    model = task_models[name]
    uploaded = client.post("/v1/models", files={"file": ("model.onnx", model.onnx.read_bytes())},
                           data={"task": json.dumps(model.task)})
    assert uploaded.status_code == 201, uploaded.text
    data = {"eval": upload_dataset(client, model.eval_npz)["id"], "calibration": upload_dataset(client, model.calib_npz)["id"]}
    response = client.post("/v1/jobs", json={"model_id": uploaded.json()["id"], "data": data,
                                             "steps": [{"type": "quantize", "params": {"method": "static_int8"}}]})
    assert response.status_code == 202, response.text
    job, _ = wait_finished(client, response.json()["id"])
    task, floor = job["metrics"]["comparison"]["task"], job["metrics"]["floor"]
    assert task["inferred"] is False and task["task"]["type"] == TASK_TYPES[name]
    assert floor["mode"] == "default" and floor["task"] == TASK_TYPES[name] and isinstance(floor["met"], bool)
    # The job's status follows the floor: succeeded when met, failed with its code when missed.
    # Measured (python -m bench.tasks --tiny): all four meet the default floor. The segmenter
    # (pixel_agreement 0.9993 against 0.98) and the embedder (mean_cosine 0.9998 against 0.99) by
    # far; the detector (recall 0.969 against 0.95) and the recognizer (exact_match 0.96 against
    # 0.95: two strings of 200) too narrowly to promise, and the detector's floor is being reworked.
    if name in ("segmenter", "embedder"):
        assert floor["met"] is True, floor
    if floor["met"]:
        assert job["status"] == "succeeded", job["error"]
    else:
        assert job["status"] == "failed" and job["error"]["code"] == "fidelity_floor_not_met"

    # The floor's first metric recomputed here from the original and the downloaded int8 model.
    download(client, f"/v1/jobs/{job['id']}/artifacts/model.onnx", tmp_path / "int8.onnx")
    _, images = eval_of(model)
    original, int8 = run(model.onnx, images).astype(np.float64), run(tmp_path / "int8.onnx", images).astype(np.float64)
    fidelity = task["fidelity"]
    if name == "detector":
        a, b = original[:, 4:].ravel(), int8[:, 4:].ravel()
        assert abs(fidelity["scores_cosine"] - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) < 1e-6
        check_detector(client, job, original, int8)  # the report's drawn eval images show these detections
    elif name == "recognizer":
        assert fidelity["exact_match"] == np.mean([a == b for a, b in zip(greedy(original), greedy(int8))])
        check_recognizer(client, job, original, int8, model.task["alphabet"])
    elif name == "segmenter":
        assert fidelity["pixel_agreement"] == np.mean(original.argmax(axis=1) == int8.argmax(axis=1))
        check_segmenter(client, job, original, int8)
    else:
        cosine = np.sum(original * int8, axis=1) / (np.linalg.norm(original, axis=1) * np.linalg.norm(int8, axis=1))
        assert abs(fidelity["mean_cosine"] - cosine.mean()) < 1e-6
        shown = [entry for entry, _ in embedded_images(client, job)]
        assert [e["index"] for e in shown[:3]] == list(np.argsort(cosine, kind="stable")[:3])  # the farthest first
        assert all(abs(e["cosine"] - cosine[e["index"]]) < 1e-5 for e in shown)
