"""Error codes of docs/ERRORS.md that need a crafted input: each is produced through the HTTP API on
the embedded default, with a model built here to break one library call (ONNX Runtime, the ONNX
version converter, torch.onnx.export, torch.jit.load, shape inference), and each test also checks
what did not happen (nothing stored, no job, the job failed rather than hung)."""

import io
import zipfile

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from service.config import Settings
from tests.jobs_flow import upload_dataset, upload_model, wait_finished
from tests.test_models_api import assert_problem


def _onnx(nodes, inputs, outputs, initializers=(), opsets=(("", 17),), ir_version=8) -> bytes:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
                              initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                             ir_version=ir_version).SerializeToString()


def _torchscript(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def _failed_job(client, model_bytes: bytes, filename: str, body: dict) -> dict:
    model = client.post("/v1/models", files={"file": (filename, model_bytes)})
    assert model.status_code == 201, model.text  # accepted at upload: the failure is the job's
    created = client.post("/v1/jobs", json={"model_id": model.json()["id"], **body})
    assert created.status_code == 202, created.text
    job, _ = wait_finished(client, created.json()["id"])
    assert job["status"] == "failed", job
    assert job["artifacts"] == [] or all(a["name"] != "model.onnx" for a in job["artifacts"])
    return job["error"]


def _dynamic_quantize(dataset_id: str | None = None) -> dict:
    return {"steps": [{"type": "quantize", "params": {"method": "dynamic_int8"}}],
            "data": {"eval": dataset_id} if dataset_id else {}}


# --- refused when the job is created ----------------------------------------------------------------

def test_a_model_with_two_inputs_is_refused_at_job_creation(client, reference):
    two_inputs = _onnx([helper.make_node("Add", ["a", "b"], ["y"])], [("a", [1, 4]), ("b", [1, 4])], [("y", [1, 4])])
    model = client.post("/v1/models", files={"file": ("two.onnx", two_inputs)})
    assert model.status_code == 201, model.text
    assert [i["name"] for i in model.json()["inputs"]] == ["a", "b"]
    response = client.post("/v1/jobs", json={"model_id": model.json()["id"], **_dynamic_quantize()})
    assert_problem(response, 422, "unsupported_model_input")
    assert client.get("/v1/jobs").json()["items"] == []


# --- failed jobs: one library call broken on purpose -------------------------------------------------

def test_a_model_onnx_runtime_cannot_load_fails_model_not_runnable(client, reference):
    # A node of a custom domain: valid ONNX (the upload accepts it), but no kernel in ONNX Runtime.
    custom = _onnx([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.acme")], [("x", [1, 1, 8, 8])],
                   [("y", [1, 1, 8, 8])], opsets=(("", 17), ("com.acme", 1)))
    data = upload_dataset(client, reference.eval_npz)["id"]
    error = _failed_job(client, custom, "custom.onnx", _dynamic_quantize(data))
    assert error["code"] == "model_not_runnable" and "Frobnicate" in error["message"], error


def test_an_old_opset_the_converter_cannot_raise_fails_opset_conversion_failed(client, reference):
    # Opset 6 BatchNormalization with spatial=0 is valid there; the 6->7 adapter asserts on it.
    params = [helper.make_tensor(n, TensorProto.FLOAT, [1], [1.0]) for n in ("scale", "bias", "mean", "var")]
    old = _onnx([helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], is_test=1, spatial=0)],
                [("x", [1, 1, 8, 8])], [("y", [1, 1, 8, 8])], params, opsets=(("", 6),), ir_version=4)
    data = upload_dataset(client, reference.eval_npz)["id"]
    error = _failed_job(client, old, "old.onnx", _dynamic_quantize(data))
    assert error["code"] == "opset_conversion_failed" and "opset 6" in error["message"], error


class CumulativeMax(torch.nn.Module):
    """aten::cummax has no ONNX export at opset 17."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return torch.cummax(self.conv(x).flatten(1), 1)[0]


def test_torchscript_that_cannot_be_exported_fails_conversion_failed(client, reference):
    data = upload_dataset(client, reference.eval_npz)["id"]
    error = _failed_job(client, _torchscript(CumulativeMax()), "cummax.pt", _dynamic_quantize(data))
    assert error["code"] == "conversion_failed" and "cummax" in error["message"], error


def test_torchscript_without_any_dataset_fails_input_shape_unknown(client, reference):
    # TorchScript carries no input shape; with no dataset in the job there is nothing to take one from.
    error = _failed_job(client, reference.torchscript.read_bytes(), "model.pt", _dynamic_quantize())
    assert error["code"] == "input_shape_unknown", error


def test_torchscript_whose_code_does_not_compile_fails_model_load_failed(client, reference):
    # The upload reads the archive's code for forbidden calls; only torch.jit.load compiles it.
    source = zipfile.ZipFile(io.BytesIO(reference.torchscript.read_bytes()))
    broken = io.BytesIO()
    with zipfile.ZipFile(broken, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if "/code/" in info.filename and info.filename.endswith(".py"):
                data = b"def forward(self, x):\n  return x +* 1\n"
            target.writestr(info, data)
    data = upload_dataset(client, reference.eval_npz)["id"]
    error = _failed_job(client, broken.getvalue(), "broken.pt", _dynamic_quantize(data))
    assert error["code"] == "model_load_failed", error


def test_feature_pairs_on_a_flat_tensor_fail_invalid_feature_pairs(client, reference):
    model = upload_model(client, reference.onnx)
    output = model["outputs"][0]["name"]  # the logits: 2-D, not a feature map
    data = upload_dataset(client, reference.train_npz)["id"]
    created = client.post("/v1/jobs", json={
        "model_id": model["id"], "data": {"train": data},
        "steps": [{"type": "distill", "params": {"epochs": 1, "max_steps": 1, "feature_pairs": [[output, output]]}}]})
    assert created.status_code == 202, created.text
    job, _ = wait_finished(client, created.json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_feature_pairs", job
    assert output in job["error"]["message"]


class DynamicSizeConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_a_mac_target_on_a_model_without_static_shapes_fails_macs_unknown(client, reference, tmp_path):
    path = tmp_path / "dynamic.onnx"
    torch.onnx.export(DynamicSizeConvNet().eval(), (torch.rand(1, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n"}})
    data = upload_dataset(client, reference.eval_npz)["id"]
    error = _failed_job(client, path.read_bytes(), "dynamic.onnx",
                        {"steps": [{"type": "prune", "params": {"target_macs": 0.5}}], "data": {"eval": data}})
    assert error["code"] == "macs_unknown" and "ratio" in error["message"], error


# --- refused at upload -------------------------------------------------------------------------------

@pytest.fixture
def small_limit_client(tmp_path):
    from fastapi.testclient import TestClient

    from worker.serve import create_app

    settings = Settings(data_dir=tmp_path / "data", max_model_bytes=200_000)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def test_a_zip_that_unpacks_past_four_times_the_limit_is_refused(small_limit_client, reference):
    model = reference.onnx.read_bytes()
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model/model.onnx", model)
        archive.writestr("model/padding.bin", bytes(4 * 200_000))  # zeros: deflates to about 1 KB
    assert len(packed.getvalue()) < 200_000  # the upload itself is under the limit
    response = small_limit_client.post("/v1/models", files={"file": ("model.zip", packed.getvalue())})
    assert_problem(response, 422, "archive_too_large")
    assert small_limit_client.get("/v1/models").json()["items"] == []


def test_an_artifact_gone_from_storage_is_artifact_missing(client, settings, reference):
    model = upload_model(client, reference.onnx)["id"]
    data = upload_dataset(client, reference.eval_npz)["id"]
    created = client.post("/v1/jobs", json={"model_id": model, **_dynamic_quantize(data)})
    job, _ = wait_finished(client, created.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    stored = [p for p in (settings.data_dir / "objects").rglob("*") if p.is_file() and job["id"] in str(p)]
    report = next(p for p in stored if p.name == "report.html")
    report.unlink()  # an operator's cleanup, a lost bucket object
    assert_problem(client.get(f"/v1/jobs/{job['id']}/artifacts/report.html"), 404, "artifact_missing")
    assert client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").status_code == 200  # the others still serve


# --- tenants --------------------------------------------------------------------------------------

def test_a_tenant_created_twice_is_tenant_exists(client):
    # The local user without keys is an operator (docs/TENANTS).
    first = client.post("/v1/admin/tenants", json={"id": "acme-twice", "max_models": 3})
    assert first.status_code == 201, first.text
    body = assert_problem(client.post("/v1/admin/tenants", json={"id": "acme-twice", "max_models": 9}), 409, "tenant_exists")
    assert body["tenant_id"] == "acme-twice"
    assert client.get("/v1/admin/tenants/acme-twice").json()["max_models"] == 3  # the first one is untouched


def _keys_cli(tmp_path, *args):
    import os
    import subprocess
    import sys

    env = {**os.environ, "MODELPRESS_DATA_DIR": str(tmp_path / "data")}
    return subprocess.run([sys.executable, "-m", "service.keys", *args], env=env, capture_output=True, text=True, timeout=600)


def test_the_key_tool_names_the_code_of_a_bad_tenant_id_and_bad_scopes(tmp_path):
    bad_tenant = _keys_cli(tmp_path, "create", "--tenant", "Acme_Corp", "--scopes", "read")
    assert bad_tenant.returncode == 2 and "invalid_tenant_id" in bad_tenant.stderr and bad_tenant.stdout == ""
    bad_scopes = _keys_cli(tmp_path, "create", "--tenant", "acme", "--scopes", "read,fly")
    assert bad_scopes.returncode == 2 and "invalid_scopes" in bad_scopes.stderr and "fly" in bad_scopes.stderr
    assert bad_scopes.stdout == ""  # no key printed
    listed = _keys_cli(tmp_path, "list", "--tenant", "acme")
    assert listed.returncode == 0 and listed.stdout == ""  # and none made


def test_quotas_beyond_their_column_are_a_validation_error_on_every_database(client):
    assert client.post("/v1/admin/tenants", json={"id": "acme-big"}).status_code == 201
    for field, value in [("max_models", 2**31), ("max_stored_bytes", 2**63), ("max_requests_per_minute", 2**70)]:
        assert_problem(client.patch("/v1/admin/tenants/acme-big", json={field: value}), 422, "validation_error")
    assert client.patch("/v1/admin/tenants/acme-big", json={"max_models": 2**31 - 1}).json()["max_models"] == 2**31 - 1


def test_a_value_postgresql_refuses_is_invalid_value_and_writes_nothing(postgres_url, tmp_path):
    from fastapi.testclient import TestClient

    from service.migrate import upgrade
    from worker.serve import create_app

    settings = Settings(data_dir=tmp_path / "data", database_url=postgres_url)
    upgrade(settings.effective_database_url)
    with TestClient(create_app(settings), raise_server_exceptions=False) as pg_client:
        # PostgreSQL text cannot hold NUL; the schema lets it through (SQLite stores it).
        response = pg_client.post("/v1/admin/tenants", json={"id": "acme-nul", "name": "a\u0000b"})
        assert_problem(response, 422, "invalid_value")
        assert pg_client.get("/v1/admin/tenants/acme-nul").status_code == 404
        assert pg_client.post("/v1/admin/tenants", json={"id": "acme-nul", "name": "ab"}).status_code == 201
