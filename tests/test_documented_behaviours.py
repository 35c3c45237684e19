"""Behaviours the README and docs promise that no other test checked (issue #19): image zips of
JPEG, BMP and WebP files, the `bgr` channel order, distill's `augment` and `patience`, the
`Repr-Digest` header, `GET /v1/jobs?status=`, and the checkpoints a finished job leaves behind."""

import base64
import hashlib
import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image

from tests.jobs_flow import upload_dataset, upload_model, wait_finished
from tests.test_models_api import assert_problem


def start(client, model_id, steps, data, **extra):
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": steps, "data": data, **extra})
    assert response.status_code == 202, response.text
    return response.json()


def succeeded(client, model_id, steps, data, **extra):
    job, _ = wait_finished(client, start(client, model_id, steps, data, **extra)["id"])
    assert job["status"] == "succeeded", job["error"]
    return job


def session_of(path_or_bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def logits_of(session, images: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i : i + 64]})[0] for i in range(0, len(images), 64)])


# --- Repr-Digest (RFC 9530) --------------------------------------------------------------------

def test_repr_digest_of_every_artifact_is_the_sha256_of_its_bytes(client, reference):
    model = upload_model(client, reference.onnx)["id"]
    data = upload_dataset(client, reference.calib_npz)["id"]
    job = succeeded(client, model, [{"type": "quantize", "params": {"method": "dynamic_int8"}}], {"eval": data})
    assert {a["name"] for a in job["artifacts"]} >= {"model.onnx", "metrics.json", "report.html", "recipe.json"}
    for artifact in job["artifacts"]:
        response = client.get(artifact["url"])
        assert response.status_code == 200, response.text
        expected = base64.b64encode(hashlib.sha256(response.content).digest()).decode()
        assert response.headers["repr-digest"] == f"sha-256=:{expected}:", artifact["name"]
        assert client.head(artifact["url"]).headers["repr-digest"] == f"sha-256=:{expected}:"


# --- GET /v1/jobs?status= ----------------------------------------------------------------------

def test_jobs_list_filters_by_status_and_refuses_an_unknown_status(client, reference):
    import tests.plugins  # noqa: F401  (registers the test-only `wait` step)

    model = upload_model(client, reference.onnx)["id"]
    data = upload_dataset(client, reference.calib_npz)["id"]
    done = succeeded(client, model, [{"type": "quantize", "params": {"method": "dynamic_int8"}}], {"eval": data})
    waiting = start(client, model, [{"type": "wait", "params": {"seconds": 600}}], {"eval": data})
    deadline = time.monotonic() + 300  # a hang detector: the embedded worker claims it within seconds
    while client.get(f"/v1/jobs/{waiting['id']}").json()["status"] != "running":
        assert time.monotonic() < deadline, "the wait job never ran"
        time.sleep(0.05)

    def listed(**query):
        response = client.get("/v1/jobs", params=query)
        assert response.status_code == 200, response.text
        return [(j["id"], j["status"]) for j in response.json()["items"]]

    try:
        assert sorted(listed()) == sorted([(done["id"], "succeeded"), (waiting["id"], "running")])
        assert listed(status="succeeded") == [(done["id"], "succeeded")]
        assert listed(status="running") == [(waiting["id"], "running")]
        assert listed(status="queued") == [] and listed(status="failed") == []
        assert listed(status="running", view="full") == [(waiting["id"], "running")]
    finally:
        client.post(f"/v1/jobs/{waiting['id']}/cancel")
        cancelled, _ = wait_finished(client, waiting["id"], timeout=180)
    assert cancelled["status"] == "cancelled"
    assert listed(status="cancelled") == [(waiting["id"], "cancelled")]
    assert listed(status="running") == []
    for bad in ("done", "SUCCEEDED", "succeeded,failed", ""):
        body = assert_problem(client.get("/v1/jobs", params={"status": bad}), 422, "validation_error")
        assert any("status" in json.dumps(error) for error in body["errors"]), body


# --- checkpoints deleted at job end ------------------------------------------------------------

def stored_files(root: Path, job_id: str) -> list[str]:
    """Every object of the job in the local storage folder, as paths under its `jobs/<id>/`."""
    found = []
    for folder in root.rglob(job_id):
        if folder.is_dir() and folder.parent.name == "jobs":
            found += [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(found)


def test_a_two_step_job_leaves_no_checkpoint_behind(client, settings, reference):
    import tests.plugins  # noqa: F401

    root = Path(settings.effective_storage_url)
    model = upload_model(client, reference.onnx)["id"]
    calibration = upload_dataset(client, reference.calib_npz)["id"]
    # prune, then a wait step that holds the job while step 1's checkpoint is in storage, then quantize.
    # The held job's wait is quiet (a long call that never checks in): its cancel is settled by the
    # heartbeat, and the step, when it returns, finds its job gone. Checkpoints go on that path too.
    steps = [{"type": "prune", "params": {"method": "channels", "ratio": 0.25, "round_to": 4}},
             {"type": "wait", "params": {"seconds": 600}},
             {"type": "quantize", "params": {"method": "static_int8"}}]
    quiet = [steps[0], {"type": "wait", "params": {"seconds": 15, "quiet": True}}, steps[2]]
    held = start(client, model, quiet, {"calibration": calibration})
    deadline = time.monotonic() + 300
    while "checkpoints/step-0/result.json" not in stored_files(root, held["id"]):  # written last
        assert time.monotonic() < deadline, ("no checkpoint of step 1 was stored", stored_files(root, held["id"]))
        assert client.get(f"/v1/jobs/{held['id']}").json()["status"] in ("queued", "running")
        time.sleep(0.05)
    assert "checkpoints/step-0/output.onnx" in stored_files(root, held["id"])
    client.post(f"/v1/jobs/{held['id']}/cancel")
    cancelled, _ = wait_finished(client, held["id"], timeout=180)
    assert cancelled["status"] == "cancelled"

    # Pruning without fine-tuning misses the fidelity floor on this tiny model: not what is tested here.
    job = succeeded(client, model, [steps[0], steps[2]], {"calibration": calibration}, floor="off")
    for finished in (cancelled, job):
        # The worker records the end, then deletes the checkpoints: wait for that (a hang detector).
        deadline = time.monotonic() + 60
        while any(p.startswith("checkpoints/") for p in stored_files(root, finished["id"])):
            assert time.monotonic() < deadline, stored_files(root, finished["id"])
            time.sleep(0.05)
    # The same folder holds the job's artifacts: the listing looked in the right place.
    assert {"model.onnx", "metrics.json"} <= {Path(p).name for p in stored_files(root, job["id"])}
    assert client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").status_code == 200


# --- image zips of JPEG, BMP and WebP files ----------------------------------------------------

def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def zipped(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def upload_zip(client, content: bytes, preprocess: dict | None = None, name: str = "data.zip"):
    response = client.post("/v1/datasets", files={"file": (name, content)},
                           data={"preprocess": json.dumps(preprocess)} if preprocess else None)
    assert response.status_code == 201, response.text
    return response.json()


def test_a_zip_of_jpeg_bmp_and_webp_images_is_decoded_as_documented(client, reference, tmp_path):
    # 16x16 copies of the 8x8 digits, a third each as grayscale JPEG, RGB BMP and RGB WebP (both lossy
    # but BMP), one folder per class: the service must decode each, take the model's 1 channel and
    # its 8x8 size, and divide by 255.
    entries = {}
    for index, (image, label) in enumerate(zip(reference.eval_images[:, 0], reference.eval_labels)):
        big = np.repeat(np.repeat(image, 2, 0), 2, 1)
        fmt, pixels = [("JPEG", big), ("BMP", np.stack([big, big // 2, 255 - big], -1)), ("WEBP", np.stack([big] * 3, -1))][index % 3]
        entries[f"digits/{label}/{index:04d}.{fmt.lower()}"] = encoded(pixels, fmt)
    dataset = upload_zip(client, zipped(entries))
    assert dataset["format"] == "image_zip" and dataset["classes"] == [str(i) for i in range(10)]
    assert dataset["count"] == len(entries)

    # The test's own decoding, as README says: files in path order, labels from the sorted class
    # folders, the model's channels (1: grayscale) and size (bilinear), pixels / 255.
    names = sorted(entries)
    with_images = [Image.open(io.BytesIO(entries[n])).convert("L").resize((8, 8), Image.Resampling.BILINEAR) for n in names]
    images = np.stack([np.asarray(i, np.uint8)[None] for i in with_images]).astype(np.float32) / np.float32(255.0)
    labels = np.array([int(n.split("/")[1]) for n in names])
    order = np.lexsort((np.arange(len(reference.eval_labels)), reference.eval_labels))
    assert np.abs(images * 255 - reference.eval_images[order]).max() > 10  # lossy files: not the arrays again

    model = upload_model(client, reference.onnx)["id"]
    job = succeeded(client, model, [{"type": "quantize", "params": {"method": "static_int8"}}],
                    {"calibration": dataset["id"], "eval": dataset["id"]})
    original = logits_of(session_of(reference.onnx), images)
    compressed = logits_of(session_of(client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content), images)
    metrics = job["metrics"]
    assert metrics["eval_samples"] == len(names)
    assert metrics["original"]["accuracy"]["top1"] == pytest.approx(float(np.mean(original.argmax(1) == labels)), abs=1e-12)
    # int8: one borderline image of the 360 came out differently here than in the job (seen once,
    # with the same decoded arrays; see the branch's report), so the quantized model gets one image.
    assert metrics["compressed"]["accuracy"]["top1"] == pytest.approx(float(np.mean(compressed.argmax(1) == labels)), abs=1.5 / len(names))
    fidelity = metrics["comparison"]["fidelity"][0]
    cosine = np.sum(original * compressed, 1) / (np.linalg.norm(original, axis=1) * np.linalg.norm(compressed, axis=1))
    assert fidelity["cosine_mean"] == pytest.approx(float(cosine.mean()), abs=1e-4)
    assert fidelity["max_abs_error"] == pytest.approx(float(np.abs(original - compressed).max()), abs=1e-3)


# --- "channels": "bgr" -------------------------------------------------------------------------

def channel_mean_model(path: Path) -> Path:
    """logits[k] = the mean of input channel k (an identity 1x1 conv, then global average pool):
    its top-1 is the brightest channel, so it tells RGB from BGR."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [3, 3, 1, 1], np.eye(3, dtype=np.float32).ravel())
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"]), helper.make_node("GlobalAveragePool", ["c"], ["p"]),
         helper.make_node("Flatten", ["p"], ["logits"])],
        "channels", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_bgr_preprocess_reverses_the_channels_the_job_sees(client, tmp_path):
    rng = np.random.default_rng(0)
    pixels, labels = [], []
    for label in range(3):  # class k: channel k (in RGB order) is the brightest; 3 channel orders differ
        for _ in range(12):
            image = rng.integers(0, 100, (4, 4, 3), dtype=np.uint8)
            image[:, :, label] = rng.integers(150, 256, (4, 4), dtype=np.uint8)
            pixels.append(image)
            labels.append(label)
    pixels, labels = np.stack(pixels), np.array(labels)
    content = zipped({f"{label}/{i:03d}.png": encoded(p, "PNG") for i, (p, label) in enumerate(zip(pixels, labels))})
    session = session_of(channel_mean_model(tmp_path / "channels.onnx"))
    model = upload_model(client, tmp_path / "channels.onnx")["id"]
    np.savez(tmp_path / "nhwc.npz", images=pixels, labels=labels)

    def accuracy_of(dataset_id):
        job = succeeded(client, model, [{"type": "quantize", "params": {"method": "fp16"}}], {"eval": dataset_id}, floor="off")
        return job["metrics"]["original"]["accuracy"]["top1"]

    rgb = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255  # PNG files are listed in path order: by class, then index
    expected = {order: float(np.mean(logits_of(session, images).argmax(1) == labels))
                for order, images in (("rgb", rgb), ("bgr", np.ascontiguousarray(rgb[:, ::-1])))}
    assert expected == {"rgb": 1.0, "bgr": pytest.approx(1 / 3)}  # only the green class survives the swap
    for order in ("rgb", "bgr"):
        assert accuracy_of(upload_zip(client, content, {"channels": order})["id"]) == pytest.approx(expected[order]), order
        npz = client.post("/v1/datasets", files={"file": ("nhwc.npz", (tmp_path / "nhwc.npz").read_bytes())},
                          data={"preprocess": json.dumps({"channels": order, "layout": "NHWC"})})
        assert npz.status_code == 201, npz.text
        assert accuracy_of(npz.json()["id"]) == pytest.approx(expected[order]), f"npz {order}"


# --- distill `patience` and `augment` ----------------------------------------------------------

def test_distill_patience_stops_when_the_eval_score_cannot_improve(client, reference, tmp_path):
    # Eval images the teacher gets right, and a student that is the teacher trained at a learning rate
    # too small to change it: the first epoch scores 1.0, which no later epoch can beat.
    right = np.flatnonzero(logits_of(session_of(reference.onnx), reference.eval_images.astype(np.float32) / 255).argmax(1) == reference.eval_labels)[:64]
    np.savez(tmp_path / "right.npz", images=reference.eval_images[right], labels=reference.eval_labels[right])
    model = upload_model(client, reference.onnx)["id"]
    train = upload_dataset(client, reference.train_npz)["id"]
    eval_set = upload_dataset(client, tmp_path / "right.npz")["id"]
    steps = [{"type": "distill", "params": {"epochs": 6, "patience": 1, "lr": 1e-8, "batch_size": 256}}]
    training = succeeded(client, model, steps, {"train": train, "eval": eval_set})["metrics"]["steps"][0]["training"]
    scores = [epoch["eval_score"] for epoch in training["history"]]
    assert scores[0] == 1.0
    # Epoch 1 is the best; epochs 2 and 3 do not beat it; more than `patience` (1) such epochs stop it.
    assert training["stopped_early"] is True and training["epochs_run"] == len(scores) == 3 < 6, training
    assert training["best_eval_score"] == 1.0


def test_distill_augment_changes_the_training_of_the_same_seed(client, reference):
    model = upload_model(client, reference.onnx)["id"]
    train = upload_dataset(client, reference.train_npz)["id"]

    def history(**params):
        steps = [{"type": "distill", "params": {"epochs": 2, "max_steps": 6, "batch_size": 128, "lr": 1e-2, "seed": 5, **params}}]
        return succeeded(client, model, steps, {"train": train}, floor="off")["metrics"]["steps"][0]["training"]["history"]

    plain = history()
    assert history() == plain  # same seed, same data: the same losses, so a difference below is augment's
    for kinds in (["flip"], ["crop"], ["noise"]):
        augmented = history(augment=kinds)
        assert len(augmented) == len(plain) and [e["loss"] for e in augmented] != [e["loss"] for e in plain], kinds
