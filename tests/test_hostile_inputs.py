"""Hostile and broken input, on SQLite and on a real PostgreSQL: every case gets its documented 4xx
and stable code (never a 500), the server stays healthy, and nothing is left in storage.

Found in review (issue 17): NUL bytes in ids and cursors were 500s on PostgreSQL, labels of 2**62
were a 500 that left an orphan object, a 10 MB job body was stored, a TorchScript `forward` read
/etc/passwd on the worker, and a PostgreSQL outage answered 500 or nothing at all."""

import io
import zipfile

import numpy as np
import pytest
import torch

from tests.relay import Relay
from tests.test_datasets_api import npz_bytes
from tests.test_models_api import assert_problem

IDS = ["mdl_%00", "mdl_a%00b", "job_%0a", "ds_%7f", "%00", "job_%01%02"]
ROUTES = ["/v1/models/{}", "/v1/datasets/{}", "/v1/jobs/{}", "/v1/jobs/{}/artifacts/model.onnx", "/v1/jobs/{}/report"]
CURSORS = ["%00", "abc%00", "WyIyMDI2LTAxLTAxIiwgIlx1MDAwMCJd", "WyIyMDI2LTAxLTAxIiwgMV0"]  # "\u0000" and 1 as row ids


@pytest.fixture(scope="module")
def fresh_postgres_url():
    from tests.conftest import PG_ADMIN_URL
    from tests.tenancy import fresh_postgres_database

    url, drop = fresh_postgres_database(PG_ADMIN_URL)
    yield url
    drop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def hostile_client(request, tmp_path_factory):
    from fastapi.testclient import TestClient

    from service.config import Settings
    from worker.serve import create_app
    from service.migrate import upgrade

    database_url = ""
    if request.param == "postgresql":
        # A database of its own: the corpus asserts that nothing was stored, so no other test's rows.
        database_url = request.getfixturevalue("fresh_postgres_url")
        upgrade(database_url)
    data_dir = tmp_path_factory.mktemp("hostile") / "data"
    settings = Settings(data_dir=data_dir, database_url=database_url)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        client.data_dir = data_dir
        yield client


def stored_objects(client) -> list[str]:
    root = client.data_dir / "objects"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_healthy(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/v1/models").status_code == 200


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("bad_id", IDS)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_control_characters_in_ids_are_400(hostile_client, method, route, bad_id):
    path = route.format(bad_id)
    response = hostile_client.request(method, path)
    if response.status_code == 405:  # a route without that verb says so, which is fine as long as it is not a 500
        return
    assert_problem(response, 400, "invalid_characters")
    assert_healthy(hostile_client)


@pytest.mark.parametrize("resource", ["models", "datasets", "jobs"])
@pytest.mark.parametrize("cursor", CURSORS)
def test_bad_cursors_are_4xx(hostile_client, resource, cursor):
    response = hostile_client.get(f"/v1/{resource}?cursor={cursor}")
    assert response.status_code in (400, 422), response.text
    assert response.json()["code"] in ("invalid_characters", "invalid_cursor")
    assert_healthy(hostile_client)


def _nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth):
        value = [value]
    return value


JOB_BODIES = {
    "nul_in_model_id": ({"model_id": "mdl_\u0000", "steps": [{"type": "quantize"}]}, 422, "validation_error"),
    "nul_in_params": ({"model_id": "mdl_x", "steps": [{"type": "quantize", "params": {"method": "static_int8\u0000"}}]},
                      422, "validation_error"),
    "nul_in_key": ({"model_id": "mdl_x", "steps": [{"type": "quantize", "params": {"a\u0000": 1}}]}, 422, "validation_error"),
    "negative_split_seed": ({"model_id": "mdl_x", "steps": [{"type": "quantize"}], "data": {"split": {"dataset": "ds_x", "seed": -1}}},
                            422, "validation_error"),
    "split_seed_beyond_64_bits": ({"model_id": "mdl_x", "steps": [{"type": "quantize"}],
                                   "data": {"split": {"dataset": "ds_x", "seed": 2**64}}}, 422, "validation_error"),
    "deep_nesting": ({"model_id": "mdl_x", "steps": [{"type": "quantize", "params": {"p": _nested(40)}}]},
                     422, "validation_error"),
}


@pytest.mark.parametrize("case", JOB_BODIES)
def test_hostile_job_bodies_are_refused_at_the_door(hostile_client, case):
    body, status, code = JOB_BODIES[case]
    assert_problem(hostile_client.post("/v1/jobs", json=body), status, code)
    assert hostile_client.get("/v1/jobs").json()["items"] == []
    assert_healthy(hostile_client)


@pytest.mark.parametrize("size", [300_000, 10 * 1024 * 1024])
def test_oversized_json_bodies_are_413_and_not_stored(hostile_client, size):
    body = b'{"model_id": "mdl_x", "steps": [{"type": "quantize", "params": {"exclude": ["' + b"a" * size + b'"]}}]}'
    response = hostile_client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert_problem(response, 413, "body_too_large")
    # Sent without a Content-Length (chunked), the body is counted as it arrives.
    chunked = hostile_client.post("/v1/jobs", content=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                                  headers={"content-type": "application/json"})
    assert_problem(chunked, 413, "body_too_large")
    assert hostile_client.get("/v1/jobs").json()["items"] == []


def npy_with_header(header: bytes) -> bytes:
    header = header + b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x00" * 64


NPY_HEADERS = {
    "python_expression": b"{'descr': '|u1', 'fortran_order': False, 'shape': (1,)+(2,), }",
    "function_call": b"{'descr': '|u1', 'fortran_order': False, 'shape': __import__('os').getpid(), }",
    "not_a_dict": b"[1, 2, 3]",
    "negative_shape": b"{'descr': '|u1', 'fortran_order': False, 'shape': (-1, 8, 8), }",
    "float_shape": b"{'descr': '|u1', 'fortran_order': False, 'shape': (1.5, 8, 8), }",
    "unknown_dtype": b"{'descr': 'zz9', 'fortran_order': False, 'shape': (1, 8, 8), }",
    "missing_keys": b"{'descr': '|u1'}",
    "deep_nesting": b"{'descr': '|u1', 'fortran_order': False, 'shape': " + b"(" * 200 + b")" * 200 + b"}",
}


@pytest.mark.parametrize("case", NPY_HEADERS)
def test_malformed_npy_headers_are_422(hostile_client, case):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("images.npy", npy_with_header(NPY_HEADERS[case]))
    before = stored_objects(hostile_client)
    response = hostile_client.post("/v1/datasets", files={"file": ("d.npz", archive.getvalue())})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_dataset"
    assert stored_objects(hostile_client) == before
    assert_healthy(hostile_client)


@pytest.mark.parametrize("label", [2**62, 2**31, 100_000, -(2**62)])
def test_out_of_range_labels_are_422_and_leave_no_object(hostile_client, label):
    images = np.zeros((4, 1, 8, 8), np.uint8)
    before = stored_objects(hostile_client)
    response = hostile_client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(images=images, labels=np.array([0, 1, 2, label])))})
    assert_problem(response, 422, "invalid_labels")
    assert stored_objects(hostile_client) == before
    assert_healthy(hostile_client)


class ReadsAFile(torch.nn.Module):
    def forward(self, x):
        leaked = torch.from_file("/etc/passwd", size=10, dtype=torch.uint8)
        return x + leaked.float().sum()


class PlainConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return torch.nn.functional.hardswish(self.conv(x)).mean((2, 3))


def torchscript_bytes(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def test_torchscript_that_reads_files_is_refused_at_upload(hostile_client):
    before = stored_objects(hostile_client)
    response = hostile_client.post("/v1/models", files={"file": ("model.pt", torchscript_bytes(ReadsAFile()))})
    body = assert_problem(response, 422, "torchscript_op_refused")
    assert body["operators"] == ["torch.from_file"]
    assert stored_objects(hostile_client) == before
    # Plain tensor maths in TorchScript is still accepted.
    assert hostile_client.post("/v1/models", files={"file": ("model.pt", torchscript_bytes(PlainConv()))}).status_code == 201


def test_the_worker_checks_the_compiled_torchscript_graph_too(tmp_path):
    from modelpress.spec.errors import EngineError
    from worker.engine.formats import check_torchscript_graph, to_onnx

    check_torchscript_graph(torch.jit.script(PlainConv()))
    path = tmp_path / "model.pt"
    path.write_bytes(torchscript_bytes(ReadsAFile()))  # as if it had slipped past the upload scan
    with pytest.raises(EngineError) as refused:
        to_onnx(path, "torchscript", tmp_path, np.zeros((2, 1, 8, 8), np.float32))
    assert refused.value.code == "torchscript_op_refused"
    assert "aten::from_file" in refused.value.message
    assert not (tmp_path / "converted.onnx").exists()


def test_a_database_outage_is_503_with_retry_after_and_service_returns(tmp_path, postgres_url):
    from urllib.parse import urlsplit

    from fastapi.testclient import TestClient

    from service.config import Settings
    from worker.serve import create_app
    from service.migrate import upgrade

    upgrade(postgres_url)
    real = urlsplit(postgres_url)
    proxy = Relay(real.port or 5432)
    via_proxy = postgres_url.replace(f"{real.hostname}:{real.port}", f"127.0.0.1:{proxy.port}")
    settings = Settings(data_dir=tmp_path / "data", database_url=via_proxy)
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            assert client.get("/v1/jobs").status_code == 200
            proxy.down()
            for method, path in [("GET", "/v1/jobs"), ("GET", "/v1/models"), ("GET", "/v1/datasets"),
                                 ("GET", "/v1/models/mdl_x"), ("DELETE", "/v1/datasets/ds_x"),
                                 ("POST", "/v1/jobs")]:
                kwargs = {"json": {"model_id": "mdl_x", "steps": [{"type": "quantize"}]}} if method == "POST" else {}
                response = client.request(method, path, **kwargs)
                assert_problem(response, 503, "service_unavailable")
                assert response.headers["Retry-After"] == "5"
            assert client.get("/readyz").status_code == 503
            assert client.get("/healthz").status_code == 200  # the process itself is alive
            proxy.up()
            assert client.get("/v1/jobs").status_code == 200
            assert client.get("/readyz").status_code == 200
    finally:
        proxy.close()


def test_a_loopback_instance_answers_only_to_its_own_host_names(tmp_path):
    from fastapi.testclient import TestClient

    from service.config import Settings
    from worker.serve import create_app

    settings = Settings(data_dir=tmp_path / "data", allowed_hosts="127.0.0.1,localhost,::1")
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.get("/v1/models", headers={"host": "localhost:8000"}).status_code == 200
        assert client.get("/v1/models", headers={"host": "[::1]:8000"}).status_code == 200
        # DNS rebinding: evil.example resolved to 127.0.0.1, the browser sends its own Host.
        assert_problem(client.get("/v1/models", headers={"host": "evil.example:8000"}), 421, "host_not_allowed")


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:9999"])
def test_writes_from_a_page_of_another_origin_are_refused(client, reference, origin):
    content = reference.onnx.read_bytes()
    response = client.post("/v1/models", files={"file": ("m.onnx", content)}, headers={"origin": origin})
    assert_problem(response, 403, "cross_origin_refused")
    job = client.post("/v1/jobs", json={"model_id": "mdl_x", "steps": [{"type": "quantize"}]}, headers={"origin": origin})
    assert_problem(job, 403, "cross_origin_refused")
    assert client.get("/v1/models").json()["items"] == []
    # The same origin (Swagger UI on the instance itself) and clients that send no Origin may write.
    assert client.post("/v1/models", files={"file": ("m.onnx", content)}, headers={"origin": "http://testserver"}).status_code == 201
    assert client.post("/v1/models", files={"file": ("m.onnx", content)}).status_code == 201


def test_a_body_that_stops_arriving_frees_the_request():
    import asyncio

    from service.guards import RequestGuard

    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())

    async def stalled_receive():
        await asyncio.sleep(3600)

    async def send(message):
        pass

    for content_type in (b"application/json", b"multipart/form-data; boundary=x"):
        guard = RequestGuard(app, max_json_body_bytes=1024, body_idle_timeout_s=0.2, allowed_hosts=[])
        scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "query_string": b"",
                 "headers": [(b"host", b"testserver"), (b"content-type", content_type)]}
        asyncio.run(asyncio.wait_for(guard(scope, stalled_receive, send), 5))
    assert seen == [{"type": "http.disconnect"}, {"type": "http.disconnect"}]


# --- models and data that are accepted today and break later --------------------------------------

def onnx_bytes(nodes, inputs, outputs, initializers=(), opset=17) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
                              initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


def loop_model(trip_count: int | None) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Relu", ["x_in"], ["x_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1, 4])])
    inits = [numpy_helper.from_array(np.array(True), "cond")]
    if trip_count is not None:
        inits.append(numpy_helper.from_array(np.array(trip_count, np.int64), "trips"))
    loop = helper.make_node("Loop", ["trips" if trip_count is not None else "", "cond", "x"], ["y"], body=body)
    return onnx_bytes([loop], [("x", [1, 4])], [("y", [1, 4])], inits)


def external_data_in_a_subgraph() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    weight = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1, 4])
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../etc/passwd")
    then_branch = helper.make_graph([helper.make_node("Add", ["x", "w"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])], initializer=[weight])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 4])])
    from onnx import numpy_helper
    cond = numpy_helper.from_array(np.array(True), "c")
    node = helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)
    return onnx_bytes([node], [("x", [1, 4])], [("y", [1, 4])], [cond])


MODEL_CASES = {
    "loop_of_10_to_the_15": (lambda: loop_model(10**15), "unbounded_loop"),
    "loop_without_trip_count": (lambda: loop_model(None), "unbounded_loop"),
    "external_data_path_in_an_if_branch": (external_data_in_a_subgraph, "external_data_unsupported"),
    "no_outputs": (lambda: onnx_bytes([__import__("onnx").helper.make_node("Relu", ["x"], ["y"])], [("x", [1, 4])], []),
                   "model_has_no_outputs"),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_models_that_would_break_a_worker_are_refused_at_upload(hostile_client, case):
    make, code = MODEL_CASES[case]
    before = stored_objects(hostile_client)
    response = hostile_client.post("/v1/models", files={"file": ("model.onnx", make())})
    assert response.status_code == 422, response.text
    assert response.json()["code"] in (code, "invalid_onnx")
    if case != "no_outputs":  # the onnx checker may also catch a graph with no outputs
        assert response.json()["code"] == code
    assert stored_objects(hostile_client) == before
    assert_healthy(hostile_client)


def test_a_loop_with_a_small_constant_trip_count_is_accepted(hostile_client):
    assert hostile_client.post("/v1/models", files={"file": ("model.onnx", loop_model(8))}).status_code == 201


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_images_are_422(hostile_client, bad):
    images = np.zeros((300, 1, 32, 32), np.float32)  # several 1 MiB chunks: the bad pixel is in a later one
    images[-1, 0, 5, 5] = bad
    response = hostile_client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(images=images))})
    assert_problem(response, 422, "non_finite_images")
    assert hostile_client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(images=np.zeros((4, 1, 8, 8), np.float64)))}).status_code == 201


@pytest.mark.parametrize("preprocess", ['{"scale": 1e300}', '{"scale": 1e-30}', '{"mean": [1e30], "std": [1.0]}',
                                        '{"mean": [0.0], "std": [1e-30]}', '{"std": [Infinity]}'])
def test_extreme_preprocessing_is_refused(hostile_client, reference, preprocess):
    response = hostile_client.post("/v1/datasets", files={"file": ("d.npz", reference.eval_npz.read_bytes())},
                                   data={"preprocess": preprocess})
    assert_problem(response, 422, "invalid_preprocess")


def test_a_model_with_nan_weights_fails_with_a_clear_code(client, reference, tmp_path):
    import onnx
    from onnx import numpy_helper

    from tests.jobs_flow import submit, upload_dataset, wait_finished

    model = onnx.load(str(reference.onnx))
    first = model.graph.initializer[0]
    poisoned = numpy_helper.to_array(first).copy()
    poisoned.flat[0] = np.nan
    first.CopyFrom(numpy_helper.from_array(poisoned, first.name))
    uploaded = client.post("/v1/models", files={"file": ("nan.onnx", model.SerializeToString())}).json()
    data = upload_dataset(client, reference.calib_npz)
    job, _ = wait_finished(client, submit(client, uploaded["id"], data["id"], data["id"])["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "non_finite_weights"
    assert first.name in job["error"]["message"]


def test_the_report_renders_without_the_figures_it_usually_has():
    from worker.engine.report import render

    html = render({"comparison": {"fidelity": [{"output": "<script>alert(1)</script>", "cosine_mean": None,
                                                "max_abs_error": None, "worst_slice": {"axis": 1, "index": 0, "cosine": None}}]},
                   "original": {"accuracy": {"top1": None}}, "compressed": {}, "steps": []})
    assert "<script>" not in html and "&lt;script&gt;" in html


@pytest.mark.parametrize("path, allowed", [("/v1/models", {"GET", "POST"}), ("/v1/models/mdl_x", {"GET", "DELETE", "PATCH"}),
                                           ("/v1/jobs/job_x/cancel", {"POST"}), ("/healthz", {"GET"})])
def test_405_names_every_allowed_method(client, path, allowed):
    response = client.request("PUT", path)
    assert_problem(response, 405, "method_not_allowed")
    assert allowed <= set(response.headers["Allow"].split(", "))
    assert "PUT" not in response.headers["Allow"]


def test_the_spec_declares_problem_answers_and_upload_bodies(client):
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            for status in ("404", "422", "503"):
                assert "application/problem+json" in operation["responses"][status]["content"], (path, method, status)
    for path in ("/v1/models", "/v1/datasets"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert body["properties"]["file"]["format"] == "binary"


@pytest.mark.parametrize("message, shown", [
    ("cannot be loaded: open /srv/data/tmp/job_ab-12-x/model.pt failed", "cannot be loaded: open model.pt failed"),
    ("No such file: '/srv/data/tmp/job_ab/'", "No such file: '<folder>'"),
    ("see http://host/v1/jobs/x and ./relative/path", "see http://host/v1/jobs/x and ./relative/path"),
])
def test_job_errors_show_no_server_paths(message, shown):
    from service.jobs.runner_api import without_server_paths

    assert without_server_paths(message) == shown


def with_lying_sizes(archive: bytes, member: str, declared: int) -> bytes:
    """The zip with `member`'s uncompressed size rewritten to `declared`, in its local header and in
    the central directory alike (so the bomb check, which trusts the directory, sees the lie)."""
    data = bytearray(archive)
    name = member.encode()
    for signature, size_at, name_at in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        at = data.find(signature)
        while at != -1:
            if data[at + name_at:at + name_at + len(name)] == name:
                data[at + size_at:at + size_at + 4] = declared.to_bytes(4, "little")
            at = data.find(signature, at + 4)
    return bytes(data)


@pytest.mark.parametrize("declared", [16, 10**9], ids=["smaller", "larger"])
def test_a_zip_entry_whose_declared_size_lies_is_refused(hostile_client, declared):
    """A deflated member that says it is small (to pass the unpacked-size limit) cannot unpack into
    more than it declared: reading stops there and the CRC fails; one that says it is large is broken."""
    # Deflated: a stored member is read by its stored length, which the upload's size bounds anyway.
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=np.zeros((4096, 1, 8, 8), np.uint8), labels=np.arange(4096) % 10)
    honest = buffer.getvalue()
    with zipfile.ZipFile(io.BytesIO(honest)) as z:
        info = z.getinfo("images.npy")
        assert info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > 250_000 > 10 * info.compress_size
    lying = with_lying_sizes(honest, "images.npy", declared)
    with zipfile.ZipFile(io.BytesIO(lying)) as z:
        assert z.getinfo("images.npy").file_size == declared  # the directory now tells the lie
    before = stored_objects(hostile_client)
    response = hostile_client.post("/v1/datasets", files={"file": ("d.npz", lying)})
    assert_problem(response, 422, "invalid_dataset")
    assert stored_objects(hostile_client) == before
    assert_healthy(hostile_client)
