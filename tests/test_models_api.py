"""Model uploads through HTTP on the embedded default: formats sniffed from content, bad uploads
refused with problem+json and a stable code."""

import hashlib
import io
import pickle

import pytest
import torch

from service.config import Settings


def upload(client, content: bytes, filename: str = "upload.bin", **fields):
    return client.post("/v1/models", files={"file": (filename, content)}, data=fields)


def assert_problem(response, status: int, code: str):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code
    assert body["status"] == status
    assert body["detail"]
    return body


def test_onnx_upload_reports_signature_and_digest(client, reference):
    content = reference.onnx.read_bytes()
    response = upload(client, content, "resnet.onnx", name="my resnet")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "onnx"
    assert body["name"] == "my resnet"
    assert body["size_bytes"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["inputs"] == [{"name": "input", "shape": [None, 1, 8, 8], "dtype": "float32"}]
    assert body["outputs"] == [{"name": "logits", "shape": [None, 10], "dtype": "float32"}]
    assert body["details"]["quantized"] is False
    assert client.get(f"/v1/models/{body['id']}").json() == body


def test_format_is_sniffed_from_content_not_name(client, reference):
    assert upload(client, reference.pt2.read_bytes(), "model.onnx").json()["format"] == "torch_export"
    script = upload(client, reference.torchscript.read_bytes(), "weights.onnx").json()
    assert script["format"] == "torchscript"
    exported = upload(client, reference.pt2.read_bytes(), "x.bin").json()
    assert exported["inputs"][0]["shape"] == [None, 1, 8, 8]
    assert exported["inputs"][0]["dtype"] == "float32"


def test_pickled_module_is_refused_without_unpickling(client, tmp_path):
    buffer = io.BytesIO()
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), buffer)
    body = assert_problem(upload(client, buffer.getvalue(), "model.onnx"), 422, "pickle_refused")
    assert any("Sequential" in ref for ref in body["references"])


def test_plain_pickle_with_code_reference_is_refused(client):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    assert_problem(upload(client, pickle.dumps(Evil(), protocol=4)), 422, "pickle_refused")


def test_state_dict_is_refused_as_weights_only(client):
    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2).state_dict(), buffer)
    assert_problem(upload(client, buffer.getvalue(), "weights.pt"), 422, "weights_only_file")


def test_truncated_onnx_is_refused(client, reference):
    content = reference.onnx.read_bytes()
    assert_problem(upload(client, content[: len(content) // 2], "model.onnx"), 422, "invalid_onnx")


def test_random_bytes_are_refused(client):
    assert_problem(upload(client, b"\x00garbage" * 100), 422, "unsupported_model_format")


def test_empty_and_missing_file(client):
    assert_problem(upload(client, b""), 422, "empty_file")
    assert_problem(client.post("/v1/models", data={"name": "x"}, files={"other": ("a", b"b")}), 422, "missing_file")


def test_wrong_content_type_is_415(client):
    assert_problem(client.post("/v1/models", content=b"{}", headers={"content-type": "application/json"}), 415, "unsupported_media_type")


def test_oversized_upload_is_413_and_leaves_nothing(tmp_path, reference):
    from fastapi.testclient import TestClient

    from worker.serve import create_app

    settings = Settings(data_dir=tmp_path / "data", max_model_bytes=10_000)
    with TestClient(create_app(settings)) as small:
        assert_problem(upload(small, reference.onnx.read_bytes()), 413, "upload_too_large")

        # Without a Content-Length the body is cut off while streaming.
        def chunks():
            yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m\"\r\n\r\n"
            for _ in range(20):
                yield b"\x00" * 1000
            yield b"\r\n--b--\r\n"

        response = small.post("/v1/models", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert_problem(response, 413, "upload_too_large")
        assert small.get("/v1/models").json()["items"] == []
    # Nothing of the upload is left; `sandbox/` is where the parser children get their folders.
    left = [path for path in settings.tmp_dir.rglob("*") if path != settings.tmp_dir / "sandbox"]
    assert left == []


def test_unknown_ids_are_404_problems(client):
    assert_problem(client.get("/v1/models/mdl_nope"), 404, "model_not_found")
    assert_problem(client.delete("/v1/models/mdl_nope"), 404, "model_not_found")
    assert_problem(client.get("/v1/datasets/ds_nope"), 404, "dataset_not_found")
    assert_problem(client.get("/v1/jobs/job_nope"), 404, "job_not_found")
    assert_problem(client.get("/v1/nothing-here"), 404, "not_found")


def test_list_is_newest_first_with_cursor(client, reference):
    content = reference.onnx.read_bytes()
    ids = [upload(client, content, name=f"m{i}").json()["id"] for i in range(5)]
    first = client.get("/v1/models", params={"limit": 2}).json()
    assert [m["id"] for m in first["items"]] == ids[::-1][:2]
    second = client.get("/v1/models", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    third = client.get("/v1/models", params={"limit": 2, "cursor": second["next_cursor"]}).json()
    assert [m["id"] for m in second["items"] + third["items"]] == ids[::-1][2:]
    assert third["next_cursor"] is None
    assert_problem(client.get("/v1/models", params={"cursor": "!!"}), 422, "invalid_cursor")
    assert_problem(client.get("/v1/models", params={"limit": 0}), 422, "validation_error")


def test_delete_removes_row_and_object(client, settings, reference):
    model = upload(client, reference.onnx.read_bytes()).json()
    objects = settings.data_dir / "objects" / "tenants" / "default" / "models" / model["id"]
    assert objects.is_dir()
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204
    assert client.get(f"/v1/models/{model['id']}").status_code == 404
    assert not objects.exists()


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health(client, path):
    response = client.get(path)
    assert response.status_code == 200
