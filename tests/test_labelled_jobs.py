"""Labelled task data through the API: a quantize job on a tiny (untrained) model of each task and
a dataset with its labels reports the task metric of the original and the compressed model, equal
to this test's own computation (ONNX Runtime on the original and the downloaded artifact, then an
independent implementation of the metric); labels that do not fit the task are refused at job
creation with labels_do_not_fit_task."""

import io
import itertools

import numpy as np
import onnxruntime as ort
import pytest

from tests.jobs_flow import upload_dataset, upload_model, wait_finished
from tests.test_models_api import assert_problem

N = 48
RNG_SEED = 7
# The original runs the same graph on the same inputs here and in the worker: equal to float noise.
ORIGINAL_TOLERANCE = 1e-6
# The int8 artifact downloaded and run here: the same graph and inputs, so equal to float noise as well.
COMPRESSED_TOLERANCE = 1e-6


# --- tiny models -------------------------------------------------------------------------------

def _export(module, example, path, output_names=("y",)):
    import torch

    torch.onnx.export(module.eval(), example, str(path), input_names=["x"], output_names=list(output_names),
                      dynamic_axes={"x": {0: "n"}, **{name: {0: "n"} for name in output_names}}, dynamo=False)
    return path


def _detector(path):
    """(N, 1, 16, 16) -> (N, 4 + 3, 16): per anchor cx, cy, w, h in pixels (0..16), then 3 class scores."""
    import torch

    class Detector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 7, (16, 1))  # one anchor per image column
            # Box rows scaled to pixels, score rows left in 0..1 (no reshape: the output's shape stays known at upload).
            self.register_buffer("scale", torch.tensor([16.0] * 4 + [1.0] * 3).reshape(1, 7, 1))

        def forward(self, x):
            return torch.sigmoid(self.conv(x * 4.0 - 2.0)).squeeze(2) * self.scale  # (N, 7, 16)

    torch.manual_seed(0)
    return _export(Detector(), torch.zeros(1, 1, 16, 16), path)


def _segmenter(path):
    """(N, 1, 8, 8) -> (N, 3, 8, 8) class logits."""
    import torch

    torch.manual_seed(1)
    return _export(torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1)),
                   torch.zeros(1, 1, 8, 8), path)


def _recogniser(path):
    """(N, 1, 8, 16) -> (N, T=16, C=5) per-step class scores (class 0 the blank)."""
    import torch

    class Recogniser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 5, 3, padding=1)

        def forward(self, x):
            return self.conv(x * 6.0 - 3.0).mean(dim=2).permute(0, 2, 1)

    torch.manual_seed(2)
    return _export(Recogniser(), torch.zeros(1, 1, 8, 16), path)


def _embedder(path):
    """(N, 1, 8, 8) -> (N, 8) embeddings."""
    import torch

    torch.manual_seed(3)
    return _export(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 8)),
                   torch.zeros(1, 1, 8, 8), path)


def _npz(path, **arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    return path


def _outputs(model_path, images):
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0].astype(np.float64)


def _run_job(client, model_id, dataset_id, task, tmp_path):
    response = client.post("/v1/jobs", json={
        "model_id": model_id, "task": task, "floor": "off", "data": {"calibration": dataset_id, "eval": dataset_id},
        "steps": [{"type": "quantize", "params": {"method": "static_int8"}}]})
    assert response.status_code == 202, response.text
    job, _ = wait_finished(client, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    artifact = tmp_path / "compressed.onnx"
    artifact.write_bytes(client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content)
    return job, artifact


def _assert_reported(job, expected_original, expected_compressed, names):
    scored = job["metrics"]["task_metrics"]
    for name in names:
        assert scored["original"][name] == pytest.approx(expected_original[name], abs=ORIGINAL_TOLERANCE), name
        assert scored["compressed"][name] == pytest.approx(expected_compressed[name], abs=COMPRESSED_TOLERANCE), name
    return scored


# --- independent references --------------------------------------------------------------------

def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _reference_map(truth, detections, thresholds=np.linspace(0.5, 0.95, 10)):
    """COCO AP written out: per class and IoU threshold, detections by score, each matched to the
    unmatched truth box of its image with the highest IoU >= threshold; precision made monotone;
    read at the 101 recall points 0, 0.01, ..., 1; averaged over classes, then thresholds."""
    classes = sorted({int(c) for _, cs in truth for c in cs})
    per_threshold = []
    for threshold in thresholds:
        aps = []
        for cls in classes:
            gts = {i: [b for b, c in zip(boxes, cs) if c == cls] for i, (boxes, cs) in enumerate(truth)}
            total = sum(len(g) for g in gts.values())
            dets = sorted(((s, i, b) for i, (bs, ss, cs) in enumerate(detections) for b, s, c in zip(bs, ss, cs) if c == cls),
                          key=lambda d: -d[0])
            used = {i: [False] * len(g) for i, g in gts.items()}
            hits = []
            for _, i, box in dets:
                best, best_iou = None, threshold
                for j, gt in enumerate(gts[i]):
                    overlap = _iou(box, gt)
                    if not used[i][j] and overlap >= best_iou:
                        best, best_iou = j, overlap
                if best is not None:
                    used[i][best] = True
                hits.append(best is not None)
            true_positives = np.cumsum(hits)
            recall = true_positives / total if len(hits) else np.zeros(0)
            precision = true_positives / np.arange(1, len(hits) + 1) if len(hits) else np.zeros(0)
            for k in range(len(precision) - 2, -1, -1):
                precision[k] = max(precision[k], precision[k + 1])
            points = [precision[np.searchsorted(recall, r, side="left")] if np.searchsorted(recall, r, side="left") < len(recall)
                      else 0.0 for r in np.linspace(0, 1, 101)]
            aps.append(np.mean(points))
        per_threshold.append(np.mean(aps))
    return {"map50": per_threshold[0], "map50_95": float(np.mean(per_threshold))}


def _decode(output, cut=0.001, nms_iou=0.7):
    """Anchors at or above the cut, then class-wise NMS as the task's default `nms_iou` asks: by
    score, a box overlapping a kept box of its class by more than nms_iou is dropped."""
    decoded = []
    for image in output:
        scores, classes = image[4:].max(axis=0), image[4:].argmax(axis=0)
        keep = scores >= cut
        cx, cy, w, h = image[:4, keep]
        boxes, scores, classes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1), scores[keep], classes[keep]
        kept = []
        for i in np.argsort(-scores, kind="stable"):
            if all(classes[j] != classes[i] or _iou(boxes[i], boxes[j]) <= nms_iou for j in kept):
                kept.append(i)
        kept = np.asarray(kept, dtype=np.int64)
        decoded.append((boxes[kept].reshape(-1, 4), scores[kept], classes[kept]))
    return decoded


def _reference_segmentation(truth, predicted):
    valid = truth != 255
    t, p = truth[valid], predicted[valid]
    ious = [np.sum((t == c) & (p == c)) / np.sum((t == c) | (p == c)) for c in sorted(set(t) | set(p))]
    return {"miou": float(np.mean(ious)), "pixel_accuracy": float(np.mean(t == p))}


def _levenshtein(a, b):
    table = np.zeros((len(a) + 1, len(b) + 1), int)
    table[:, 0], table[0, :] = np.arange(len(a) + 1), np.arange(len(b) + 1)
    for i, j in itertools.product(range(1, len(a) + 1), range(1, len(b) + 1)):
        table[i, j] = min(table[i - 1, j] + 1, table[i, j - 1] + 1, table[i - 1, j - 1] + (a[i - 1] != b[j - 1]))
    return int(table[-1, -1])


def _greedy_strings(output, alphabet, blank=0):
    strings = []
    for steps in output.argmax(axis=2):
        classes = [c for k, c in enumerate(steps) if k == 0 or c != steps[k - 1]]
        strings.append("".join(alphabet[c - 1] for c in classes if c != blank))  # blank 0: class c is alphabet[c - 1]
    return strings


def _reference_ctc(texts, strings):
    return {"exact_match": np.mean([t == s for t, s in zip(texts, strings)]),
            "cer": sum(_levenshtein(t, s) for t, s in zip(texts, strings)) / sum(len(t) for t in texts)}


def _reference_verification(embeddings, pairs, same):
    a, b = embeddings[pairs[:, 0]], embeddings[pairs[:, 1]]
    similarity = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    thresholds = list(similarity) + [similarity.max() + 1]
    return {"verification_accuracy": max(np.mean((similarity >= t) == same) for t in thresholds)}


# --- the four tasks ----------------------------------------------------------------------------

def _boxes(rng, count, per_image=3, size=16, classes=3):
    images = np.repeat(np.arange(count), per_image)
    corner = rng.uniform(0, size - 6, (len(images), 2))
    extent = rng.uniform(3, 6, (len(images), 2))
    return np.concatenate([corner, corner + extent], axis=1), rng.integers(0, classes, len(images)), images


def test_a_detection_job_reports_map_of_both_models_against_the_boxes(client, tmp_path):
    rng = np.random.default_rng(RNG_SEED)
    images = rng.random((N, 1, 16, 16), dtype=np.float32)
    boxes, box_classes, box_images = _boxes(rng, N)
    dataset = upload_dataset(client, _npz(tmp_path / "boxes.npz", images=images, boxes=boxes, box_classes=box_classes,
                                          box_images=box_images))
    assert dataset["label_kinds"] == ["boxes"] and dataset["labels"]["boxes"]["count"] == 3 * N
    model = _detector(tmp_path / "detector.onnx")
    job, artifact = _run_job(client, upload_model(client, model)["id"], dataset["id"], {"type": "detection"}, tmp_path)
    truth = [(boxes[box_images == i], box_classes[box_images == i]) for i in range(N)]
    expected = {key: _reference_map(truth, _decode(_outputs(path, images))) for key, path in
                (("original", model), ("compressed", artifact))}
    scored = _assert_reported(job, expected["original"], expected["compressed"], ["map50", "map50_95"])
    assert scored["original"]["truth_boxes"] == 3 * N and scored["task"] == "detection"
    assert scored["drop"]["map50_95"] == pytest.approx(expected["original"]["map50_95"] - expected["compressed"]["map50_95"], abs=1e-6)
    # Not a vacuous comparison: the untrained detector finds some boxes, and not all.
    assert 0.0 < expected["original"]["map50"] < 1.0
    report = client.get(f"/v1/jobs/{job['id']}/artifacts/report.html").text
    assert 'id="task-metrics"' in report and "mAP@0.5:0.95" in report
    # The label-free detection fidelity gains mAP against the original's confident detections.
    assert "map50" in job["metrics"]["comparison"]["task"]["fidelity"]


def test_a_segmentation_job_reports_miou_of_both_models_against_the_masks(client, tmp_path):
    rng = np.random.default_rng(RNG_SEED)
    images = rng.random((N, 1, 8, 8), dtype=np.float32)
    masks = rng.integers(0, 3, (N, 8, 8)).astype(np.uint8)
    masks[:, 0, 0] = 255  # ignored pixels
    dataset = upload_dataset(client, _npz(tmp_path / "masks.npz", images=images, masks=masks))
    assert dataset["label_kinds"] == ["masks"]
    model = _segmenter(tmp_path / "segmenter.onnx")
    job, artifact = _run_job(client, upload_model(client, model)["id"], dataset["id"], {"type": "segmentation"}, tmp_path)
    expected = [_reference_segmentation(masks, _outputs(path, images).argmax(axis=1)) for path in (model, artifact)]
    _assert_reported(job, *expected, ["miou", "pixel_accuracy"])
    assert 0.0 < expected[0]["miou"] < 0.9  # an untrained model against random masks: some overlap, far from 1


def test_a_ctc_job_reports_exact_match_and_cer_of_both_models_against_the_texts(client, tmp_path):
    rng = np.random.default_rng(RNG_SEED)
    images = rng.random((N, 1, 8, 16), dtype=np.float32)
    alphabet = "abcd"  # blank 0: a = 1, ..., d = 4
    texts = np.array(["".join(rng.choice(list(alphabet), rng.integers(1, 6))) for _ in range(N)])
    dataset = upload_dataset(client, _npz(tmp_path / "texts.npz", images=images, texts=texts))
    assert dataset["label_kinds"] == ["texts"]
    model = _recogniser(tmp_path / "recogniser.onnx")
    job, artifact = _run_job(client, upload_model(client, model)["id"], dataset["id"],
                             {"type": "ctc", "alphabet": alphabet}, tmp_path)
    expected = [_reference_ctc(list(texts), _greedy_strings(_outputs(path, images), alphabet)) for path in (model, artifact)]
    scored = _assert_reported(job, *expected, ["exact_match", "cer"])
    assert expected[0]["cer"] > 0.1  # an untrained model: errors to count
    assert scored["drop"]["cer"] == pytest.approx(expected[1]["cer"] - expected[0]["cer"], abs=1e-6)  # positive = worse


def test_an_embedding_job_reports_verification_accuracy_of_both_models_against_the_pairs(client, tmp_path):
    rng = np.random.default_rng(RNG_SEED)
    images = rng.random((N, 1, 8, 8), dtype=np.float32)
    pairs = np.array(list(itertools.combinations(range(N), 2)))[rng.permutation(N * (N - 1) // 2)[:300]]
    same = rng.random(len(pairs)) < 0.5
    dataset = upload_dataset(client, _npz(tmp_path / "pairs.npz", images=images, pairs=pairs, pair_same=same))
    assert dataset["label_kinds"] == ["pairs"]
    model = _embedder(tmp_path / "embedder.onnx")
    job, artifact = _run_job(client, upload_model(client, model)["id"], dataset["id"], {"type": "embedding"}, tmp_path)
    expected = [_reference_verification(_outputs(path, images), pairs, same) for path in (model, artifact)]
    scored = _assert_reported(job, *expected, ["verification_accuracy"])
    assert scored["original"]["pairs"] == 300
    assert 0.5 <= expected[0]["verification_accuracy"] < 1.0  # random pairs: above the majority class, far from 1


# --- labels that do not fit the task: 422 at job creation -------------------------------------

def _post(client, model_id, dataset_id, task):
    return client.post("/v1/jobs", json={"model_id": model_id, "task": task, "data": {"calibration": dataset_id},
                                         "steps": [{"type": "quantize", "params": {"method": "static_int8"}}]})


@pytest.mark.parametrize("build, arrays, task, words", [
    (_detector, lambda rng: {"boxes": np.array([[1.0, 1, 5, 5]]), "box_classes": np.array([3]), "box_images": np.array([0])},
     {"type": "detection"}, "class id 3"),
    (_detector, lambda rng: {"boxes": np.array([[1.0, 1, 20, 5]]), "box_classes": np.array([0]), "box_images": np.array([0])},
     {"type": "detection"}, "input width 16"),
    (_segmenter, lambda rng: {"masks": np.zeros((N, 4, 4), np.uint8)}, {"type": "segmentation"}, "4x4"),
    (_segmenter, lambda rng: {"masks": np.full((N, 8, 8), 3, np.uint8)}, {"type": "segmentation"}, "class id 3"),
    (_recogniser, lambda rng: {"label_sequences": np.array([[1, 7, -1]] * N)}, {"type": "ctc"}, "class id 7"),
    (_recogniser, lambda rng: {"label_sequences": np.array([[1, 0, -1]] * N)}, {"type": "ctc"}, "blank"),
    (_recogniser, lambda rng: {"texts": np.array(["abz"] * N)}, {"type": "ctc", "alphabet": "abcd"}, "'z'"),
    (_recogniser, lambda rng: {"texts": np.array(["ab"] * N)}, {"type": "ctc"}, "no alphabet"),
])
def test_labels_that_do_not_fit_the_task_are_refused_at_job_creation(client, tmp_path, build, arrays, task, words):
    model = build(tmp_path / "model.onnx")
    shape = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    images = np.random.default_rng(0).random((N, *shape[1:]), dtype=np.float32)
    dataset = upload_dataset(client, _npz(tmp_path / "data.npz", images=images, **arrays(None)))
    body = assert_problem(_post(client, upload_model(client, model)["id"], dataset["id"], task), 422, "labels_do_not_fit_task")
    assert words in body["detail"]
    assert client.get("/v1/jobs").json()["items"] == []  # nothing was queued


def test_pairs_beyond_the_images_the_evaluation_runs_are_refused_at_job_creation(client, tmp_path):
    model = _embedder(tmp_path / "embedder.onnx")
    images = np.zeros((2001, 1, 8, 8), np.uint8)  # one more than the evaluation's 2,000
    dataset = upload_dataset(client, _npz(tmp_path / "pairs.npz", images=images, pairs=np.array([[0, 2000]]),
                                          pair_same=np.array([True])))
    body = assert_problem(_post(client, upload_model(client, model)["id"], dataset["id"], {"type": "embedding"}),
                          422, "labels_do_not_fit_task")
    assert "image 2000" in body["detail"]


def test_labels_that_fit_only_the_shapes_known_at_upload_get_a_note_not_wrong_figures(client, tmp_path):
    import torch

    from tests.test_wide_activations import ConcatHead

    # ConcatHead's output dimensions are unknown until it runs (a Concat): the box class 9 passes at
    # creation; the worker, on the real (N, 4 + C, A) output, finds it past the classes scored.
    path = tmp_path / "concat.onnx"
    _export(ConcatHead(), torch.zeros(1, 1, 8, 8), path)
    rows = _outputs(path, np.zeros((1, 1, 8, 8), np.float32)).shape[1]
    assert rows - 4 <= 9
    images = np.random.default_rng(0).random((N, 1, 8, 8), dtype=np.float32)
    dataset = upload_dataset(client, _npz(tmp_path / "boxes.npz", images=images, boxes=np.array([[1.0, 1, 5, 5]]),
                                          box_classes=np.array([9]), box_images=np.array([0])))
    job, _ = _run_job(client, upload_model(client, path)["id"], dataset["id"], {"type": "detection"}, tmp_path)
    scored = job["metrics"]["task_metrics"]
    assert scored["original"] is None and "class id 9" in scored["note"]
    assert "class id 9" in client.get(f"/v1/jobs/{job['id']}/artifacts/report.html").text


def test_labels_of_another_task_are_not_read(client, tmp_path):
    # Masks beside a detection job: not its labels, so no refusal and no task metrics.
    model = _detector(tmp_path / "detector.onnx")
    images = np.random.default_rng(0).random((N, 1, 16, 16), dtype=np.float32)
    dataset = upload_dataset(client, _npz(tmp_path / "masks.npz", images=images, masks=np.zeros((N, 3, 3), np.uint8)))
    response = _post(client, upload_model(client, model)["id"], dataset["id"], {"type": "detection"})
    assert response.status_code == 202, response.text


def _image_zip(path, pixels, annotations):
    import json
    import zipfile

    from PIL import Image

    with zipfile.ZipFile(path, "w") as archive:
        for index, image in enumerate(pixels):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            archive.writestr(f"img{index:03d}.png", buffer.getvalue())
        archive.writestr("annotations.json", json.dumps(annotations))
    return path


def test_coco_boxes_in_an_image_zip_are_scaled_with_the_images_and_scored(client, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(RNG_SEED)
    pixels = rng.integers(0, 256, (N, 32, 32), dtype=np.uint8)
    boxes, box_classes, box_images = _boxes(rng, N, size=32)  # in the 32x32 images' own pixels
    annotations = {"images": [{"id": 100 + i, "file_name": f"img{i:03d}.png"} for i in range(N)],
                   "annotations": [{"image_id": 100 + int(i), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "category_id": int(c)}
                                   for b, c, i in zip(boxes.tolist(), box_classes, box_images)]}
    dataset = upload_dataset(client, _image_zip(tmp_path / "coco.zip", pixels, annotations))
    assert dataset["label_kinds"] == ["boxes"] and dataset["labels"]["boxes"] == {"count": 3 * N, "max_class": 2, "in_image": True}
    model = _detector(tmp_path / "detector.onnx")
    job, artifact = _run_job(client, upload_model(client, model)["id"], dataset["id"], {"type": "detection"}, tmp_path)
    # The job resizes each 32x32 image to the model's 16x16 (bilinear): the boxes halve with them.
    images = np.stack([np.asarray(Image.fromarray(p).resize((16, 16), Image.Resampling.BILINEAR), np.float32) / np.float32(255)
                       for p in pixels])[:, None]
    truth = [(boxes[box_images == i] / 2, box_classes[box_images == i]) for i in range(N)]
    expected = [_reference_map(truth, _decode(_outputs(path, images))) for path in (model, artifact)]
    _assert_reported(job, *expected, ["map50", "map50_95"])
    assert job["metrics"]["task_metrics"]["original"]["truth_boxes"] == 3 * N
