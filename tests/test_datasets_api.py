import io
import zipfile

import numpy as np
import pytest

from tests.test_models_api import assert_problem


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def upload(client, content: bytes):
    return client.post("/v1/datasets", files={"file": ("data.npz", content)})


@pytest.mark.parametrize(("shape", "layout"), [((10, 1, 8, 8), "NCHW"), ((10, 8, 8, 3), "NHWC"), ((10, 8, 8), "NHW"), ((10, 3, 32, 32), "NCHW")])
def test_layouts_are_recognised(client, shape, layout):
    response = upload(client, npz_bytes(images=np.zeros(shape, np.uint8)))
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["count"], body["shape"], body["layout"], body["dtype"], body["has_labels"]) == (10, list(shape), layout, "uint8", False)


def test_labels_are_counted(client):
    body = upload(client, npz_bytes(images=np.zeros((4, 1, 8, 8), np.float32), labels=np.array([0, 3, 1, 2]))).json()
    assert body["has_labels"] is True
    assert body["num_classes"] == 4
    assert body["dtype"] == "float32"


@pytest.mark.parametrize(("arrays", "code"), [
    ({"pixels": np.zeros((4, 8, 8), np.uint8)}, "missing_images"),
    ({"images": np.zeros((4, 8), np.uint8)}, "invalid_dataset"),
    ({"images": np.zeros((4, 8, 8), np.complex64)}, "invalid_dataset"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(3, np.int64)}, "invalid_labels"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(4, np.float32)}, "invalid_labels"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.array([0, -1, 0, 0])}, "invalid_labels"),
])
def test_bad_arrays_are_refused(client, arrays, code):
    assert_problem(upload(client, npz_bytes(**arrays)), 422, code)


def test_object_arrays_are_refused_without_unpickling(client):
    buffer = io.BytesIO()
    np.savez(buffer, images=np.array([object()] * 4, dtype=object))
    assert_problem(upload(client, buffer.getvalue()), 422, "invalid_dataset")


def test_not_a_zip(client):
    assert_problem(upload(client, b"plain text, not npz"), 422, "invalid_dataset")


def test_zip_bomb_is_refused_before_inflating(tmp_path):
    from fastapi.testclient import TestClient

    from service.config import Settings
    from worker.serve import create_app

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (50_000, 1, 64, 64)})
        with archive.open("images.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            for _ in range(200):
                member.write(b"\x00" * 1_000_000)
    assert len(buffer.getvalue()) < 1_000_000
    with TestClient(create_app(Settings(data_dir=tmp_path, max_dataset_bytes=50_000_000))) as small:
        assert_problem(upload(small, buffer.getvalue()), 422, "dataset_too_large")
