"""Image-folder datasets, preprocessing specs and splits: uploaded, validated, and used by jobs the
same way everywhere."""

import io
import json
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from tests.jobs_flow import submit, upload_model, wait_finished
from tests.test_models_api import assert_problem


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def digits_folder(reference, *, rgb_scale: int = 1, root: str = "digits/") -> bytes:
    entries = {}
    for index, (image, label) in enumerate(zip(reference.eval_images[:, 0], reference.eval_labels)):
        pixels = image
        if rgb_scale > 1:
            pixels = np.repeat(np.repeat(image, rgb_scale, 0), rgb_scale, 1)
            pixels = np.stack([pixels] * 3, axis=-1)
        entries[f"{root}{label}/{index:04d}.png"] = png(pixels)
    return image_zip(entries)


def upload(client, content: bytes, preprocess: dict | str | None = None):
    data = {} if preprocess is None else {"preprocess": preprocess if isinstance(preprocess, str) else json.dumps(preprocess)}
    return client.post("/v1/datasets", files={"file": ("data.zip", content)}, data=data)


def run(client, model_id, **data):
    job = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"type": "quantize"}], "data": data})
    assert job.status_code == 202, job.text
    finished, _ = wait_finished(client, job.json()["id"])
    assert finished["status"] == "succeeded", finished["error"]
    return finished


def test_image_folder_upload_and_job_match_the_arrays(client, reference):
    response = upload(client, digits_folder(reference))
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["format"] == "image_zip" and dataset["layout"] == "files"
    assert dataset["classes"] == [str(i) for i in range(10)] and dataset["num_classes"] == 10
    assert dataset["count"] == len(reference.eval_labels) and dataset["shape"] == [len(reference.eval_labels), 1, 8, 8]

    model = upload_model(client, reference.onnx)
    job = run(client, model["id"], calibration=dataset["id"], eval=dataset["id"])
    # Lossless PNGs of the same pixels: the accuracy is the one computed here from the arrays.
    session = ort.InferenceSession(str(reference.onnx), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": reference.eval_images.astype(np.float32) / 255.0})[0]
    assert job["metrics"]["original"]["accuracy"]["top1"] == pytest.approx(float(np.mean(logits.argmax(1) == reference.eval_labels)))


def test_rgb_images_of_another_size_take_the_models_channels_and_size(client, reference):
    dataset = upload(client, digits_folder(reference, rgb_scale=4)).json()
    assert dataset["shape"][1:] == [3, 32, 32]
    model = upload_model(client, reference.onnx)
    job = run(client, model["id"], calibration=dataset["id"], eval=dataset["id"])
    assert job["metrics"]["original"]["accuracy"]["top1"] > 0.8


def test_unlabelled_flat_zip(client, reference):
    content = image_zip({f"{i}.png": png(reference.eval_images[i, 0]) for i in range(40)})
    dataset = upload(client, content).json()
    assert (dataset["has_labels"], dataset["classes"], dataset["count"]) == (False, None, 40)


def test_preprocess_spec_is_stored_and_applied(client, reference, tmp_path):
    from worker.engine.data import load_dataset

    spec = {"mean": [0.5], "std": [0.25], "channels": "gray"}
    dataset = upload(client, digits_folder(reference), preprocess=spec).json()
    assert dataset["preprocess"] == spec
    archive = tmp_path / "d.zip"
    archive.write_bytes(digits_folder(reference))
    loaded = load_dataset(archive, dataset_format="image_zip", layout="files", preprocess=spec,
                          model_shape=[None, 1, 8, 8], role="eval")
    # Files are read in path order: by class folder, then file name.
    order = np.lexsort((np.arange(len(reference.eval_labels)), reference.eval_labels))
    expected = (reference.eval_images[order].astype(np.float32) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(loaded.images, expected, atol=1e-5)
    np.testing.assert_array_equal(loaded.labels, reference.eval_labels[order])


@pytest.mark.parametrize(("content", "preprocess", "code"), [
    (lambda r: image_zip({"../evil.png": png(r.eval_images[0, 0])}), None, "unsafe_archive"),
    (lambda r: image_zip({"a.png": png(r.eval_images[0, 0]), "notes.txt": b"hello"}), None, "invalid_dataset"),
    (lambda r: image_zip({"a.png": b"\x89PNG\r\n\x1a\n broken"}), None, "invalid_dataset"),
    (lambda r: image_zip({"a.png": png(np.zeros((2100, 2100), np.uint8))}), None, "image_decompression_bomb"),
    (lambda r: image_zip({"a/b/c.png": png(r.eval_images[0, 0]), "d.png": png(r.eval_images[0, 0])}), None, "invalid_dataset"),
    (lambda r: image_zip({"a.png": png(r.eval_images[0, 0])}), "{not json", "invalid_preprocess"),
    (lambda r: image_zip({"a.png": png(r.eval_images[0, 0])}), {"resize": 0}, "invalid_preprocess"),
    (lambda r: image_zip({"a.png": png(r.eval_images[0, 0])}), {"mean": [0.5], "std": [0.5, 0.5]}, "invalid_preprocess"),
    (lambda r: r.eval_npz.read_bytes(), {"resize": 32}, "invalid_preprocess"),
    (lambda r: r.eval_npz.read_bytes(), {"layout": "NHW"}, "invalid_dataset"),
])
def test_bad_image_datasets(tmp_path, reference, content, preprocess, code):
    from fastapi.testclient import TestClient

    from service.config import Settings
    from worker.serve import create_app

    with TestClient(create_app(Settings(data_dir=tmp_path, max_image_pixels=2000 * 2000))) as client:
        assert_problem(upload(client, content(reference), preprocess), 422, code)


def test_zip_bomb_of_images_is_refused(tmp_path, reference):
    from fastapi.testclient import TestClient

    from service.config import Settings
    from worker.serve import create_app

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.png", png(reference.eval_images[0, 0]))
        archive.writestr("b.png", b"\x00" * 30_000_000)
    with TestClient(create_app(Settings(data_dir=tmp_path, max_dataset_bytes=10_000_000))) as client:
        assert_problem(upload(client, buffer.getvalue()), 422, "dataset_too_large")


def test_a_crop_that_cannot_fit_the_model_is_refused_at_job_creation(client, reference):
    dataset = upload(client, digits_folder(reference), preprocess={"center_crop": [6, 6]}).json()
    model = upload_model(client, reference.onnx)
    response = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"type": "quantize"}],
                                             "data": {"calibration": dataset["id"]}})
    body = assert_problem(response, 422, "dataset_shape_mismatch")
    assert "H (height) = 6" in body["detail"]


def test_split_of_one_dataset(client, reference):
    model = upload_model(client, reference.onnx)
    dataset = client.post("/v1/datasets", files={"file": ("e.npz", reference.eval_npz.read_bytes())}).json()
    job = run(client, model["id"], split={"dataset": dataset["id"], "eval_fraction": 0.25, "seed": 3})
    assert job["metrics"]["eval_samples"] == round(len(reference.eval_labels) * 0.25)
    assert job["data"]["split"] == {"dataset": dataset["id"], "eval_fraction": 0.25, "seed": 3}
    assert "held-out" in job["metrics"]["eval_dataset"]
    again = run(client, model["id"], split={"dataset": dataset["id"], "eval_fraction": 0.25, "seed": 3})
    assert again["metrics"]["original"]["accuracy"] == job["metrics"]["original"]["accuracy"]
    assert_problem(client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"type": "quantize"}],
                                                 "data": {"split": {"dataset": dataset["id"], "eval_fraction": 1.5}}}),
                   422, "validation_error")


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_image_folder_with_torch_uploads(client, reference, fmt):
    dataset = upload(client, digits_folder(reference)).json()
    model = upload_model(client, getattr(reference, fmt))
    job = run(client, model["id"], calibration=dataset["id"], eval=dataset["id"])
    assert job["metrics"]["original"]["accuracy"]["top1"] > 0.85
