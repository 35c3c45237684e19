"""Dataset uploads are read in the sandboxed child (service/datasets/sandboxed.py): zip and .npy
parsing and Pillow decoding every image happen under its memory and time limits, and an image
that would decompress past the pixel limit is refused as a decompression bomb."""

import struct
import zlib

import pytest

from service.config import Settings
from tests.test_image_datasets import digits_folder, image_zip, upload
from tests.test_models_api import assert_problem

BIG_SIDE = 24_000  # 576 M pixels: ~0.55 MiB as a blank PNG, 576 MiB once decoded


def blank_png(width: int, height: int) -> bytes:
    """A valid grey PNG of zeros, compressed as it is built (its decoded pixels never exist here)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, parts, row = zlib.compressobj(9), [], b"\0" * (width + 1)  # filter byte + pixels
    for start in range(0, height, 1000):
        parts.append(compressor.compress(row * min(1000, height - start)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def big_image_zip() -> bytes:
    return image_zip({"big.png": blank_png(BIG_SIDE, BIG_SIDE)})


def app_client(tmp_path, **settings):
    from fastapi.testclient import TestClient

    from worker.serve import create_app

    return TestClient(create_app(Settings(data_dir=tmp_path / "data", **settings)), raise_server_exceptions=False)


def test_a_decompression_bomb_image_is_refused_with_a_clear_code(tmp_path, big_image_zip):
    assert len(big_image_zip) < 2 * 1024**2  # small on the wire, 576 MiB of pixels
    with app_client(tmp_path) as client:
        body = assert_problem(upload(client, big_image_zip), 422, "image_decompression_bomb")
        assert body["entry"] == "big.png" and body["max_image_pixels"] == 4096 * 4096
        assert "decompression bomb" in body["detail"]
        assert client.get("/healthz").status_code == 200


def test_decoding_past_the_childs_memory_is_refused_and_the_api_stays_up(tmp_path, big_image_zip, reference):
    # Allowed by the pixel limit, but decoding needs more than the child's 512 MiB of address space.
    with app_client(tmp_path, max_image_pixels=BIG_SIDE**2, dataset_parse_memory_bytes=512 * 1024**2) as client:
        assert_problem(upload(client, big_image_zip), 422, "dataset_parse_out_of_memory")
        assert client.get("/healthz").status_code == 200
        assert upload(client, digits_folder(reference)).status_code == 201  # the next child is whole


def test_decoding_past_the_time_limit_is_refused(tmp_path, big_image_zip):
    # Decoding 576 M pixels takes seconds; the child has 10 ms.
    with app_client(tmp_path, max_image_pixels=BIG_SIDE**2, dataset_parse_timeout_s=0.01) as client:
        assert_problem(upload(client, big_image_zip), 422, "dataset_parse_timeout")
        assert client.get("/healthz").status_code == 200


def test_an_image_that_is_truncated_after_its_header_is_refused(tmp_path, reference):
    # verify() alone passes a JPEG cut short; decoding it in the child does not.
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(buffer, format="JPEG")
    with app_client(tmp_path) as client:
        response = upload(client, image_zip({"a.jpg": buffer.getvalue()[: len(buffer.getvalue()) // 2]}))
        assert_problem(response, 422, "invalid_dataset")


def test_sandboxed_and_in_process_dataset_inspection_agree(reference, tmp_path):
    from service.datasets.inspect import inspect_dataset
    from service.datasets.sandboxed import DatasetBounds, SandboxedDatasetReader

    folder = tmp_path / "digits.zip"
    folder.write_bytes(digits_folder(reference))
    bounds = DatasetBounds(max_bytes=2**30, max_samples=10_000, max_image_pixels=4096**2)
    reader = SandboxedDatasetReader(limits=Settings().dataset_parse_limits)
    reader.start()
    try:
        for path in (reference.eval_npz, reference.calib_npz, folder):
            assert reader.inspect(path, bounds=bounds, layout=None) == inspect_dataset(
                path, max_bytes=bounds.max_bytes, max_samples=bounds.max_samples,
                max_image_pixels=bounds.max_image_pixels)
    finally:
        reader.close()


@pytest.mark.parametrize(("route", "content", "code"), [
    ("/v1/models", lambda r: r.onnx.read_bytes(), "model_parse_failed"),
    ("/v1/datasets", lambda r: r.eval_npz.read_bytes(), "dataset_parse_failed"),
])
def test_a_parser_child_that_crashes_is_parse_failed(tmp_path, reference, monkeypatch, route, content, code):
    import sys

    # Every child (the warm ones too, so the app is built after this) dies of SIGABRT, as a native
    # parser crashing on hostile bytes would.
    monkeypatch.setattr("service.sandbox.python_module", lambda *args: [sys.executable, "-c", "import os; os.abort()"])
    with app_client(tmp_path) as client:
        body = assert_problem(client.post(route, files={"file": ("upload.bin", content(reference))}), 422, code)
        assert "Traceback" not in body["detail"]
        assert client.get(route).json()["items"] == []
