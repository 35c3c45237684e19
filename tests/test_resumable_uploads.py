"""Resumable upload sessions (issue #15, part 3): parts with checksums, resume after a cut
connection, complete through the same checks as a single-request upload, tenants kept apart, and
the API's memory bounded on a 2 GB upload."""

import base64
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import update

from modelpress.client import Client
from modelpress.errors import ModelpressError
from modelpress.resumable import ResumableUpload, file_sha256
from service.db import make_engine, make_session_factory, utcnow
from service.upload_sessions.tables import UploadSessionRow
from tests.processes import Process, free_port, wait_http
from tests.relay import Cut, Relay
from tests.tenancy import add_tenant, keyed_client, keyed_settings, problem_code

KiB, MiB = 1024, 1024 * 1024
PART = 16 * KiB


# --- inputs ---------------------------------------------------------------------------------------

def onnx_model(path: Path, features: int = 1024) -> Path:
    """A one-MatMul ONNX model whose weights make it `features`² x 4 bytes (4 MiB by default)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.random.default_rng(0).standard_normal((features, features)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, features])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def npz_bytes(count: int = 1200) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(1)
    np.savez(buffer, images=rng.integers(0, 255, (count, 1, 8, 8), dtype=np.uint8), labels=np.arange(count) % 10)
    return buffer.getvalue()


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def start(client, headers, *, data: bytes, kind: str = "dataset", **extra):
    response = client.post("/v1/uploads", headers=headers, json={
        "kind": kind, "filename": f"upload.{'onnx' if kind == 'model' else 'npz'}", "size_bytes": len(data),
        "part_bytes": PART, **extra})
    assert response.status_code == 201, response.text
    return response.json()


def put(client, headers, upload: dict, number: int, data: bytes, checksum: dict | None = None):
    chunk = data[(number - 1) * upload["part_bytes"]: number * upload["part_bytes"]]
    checksum = {"x-checksum-sha256": sha256_b64(chunk)} if checksum is None else checksum
    return client.put(f"/v1/uploads/{upload['id']}/parts/{number}", content=chunk,
                      headers={**headers, "Content-Type": "application/octet-stream", **checksum})


def put_all(client, headers, upload: dict, data: bytes, skip: tuple[int, ...] = ()) -> None:
    for number in range(1, upload["part_count"] + 1):
        if number not in skip:
            response = put(client, headers, upload, number, data)
            assert response.status_code == 200, response.text


# --- in-process API on SQLite, with keys and two tenants -------------------------------------------

@pytest.fixture
def keyed(tmp_path):
    settings = keyed_settings(tmp_path, upload_min_part_bytes=16 * KiB)
    alice, bob = add_tenant(settings, "alice"), add_tenant(settings, "bob")
    with keyed_client(settings) as client:
        yield client, settings, alice.headers(), bob.headers()


def test_a_session_makes_the_dataset_a_single_upload_would_and_complete_repeats(keyed):
    client, settings, alice, _ = keyed
    data = npz_bytes()
    upload = start(client, alice, data=data, sha256=hashlib.sha256(data).hexdigest(), name="digits")
    assert upload["part_count"] == -(-len(data) // PART) > 2
    put_all(client, alice, upload, data)
    listed = client.get(f"/v1/uploads/{upload['id']}", headers=alice).json()
    assert [p["number"] for p in listed["parts"]] == list(range(1, upload["part_count"] + 1))
    assert listed["received_bytes"] == len(data)

    done = client.post(f"/v1/uploads/{upload['id']}/complete", headers=alice)
    assert done.status_code == 201, done.text
    dataset = done.json()
    assert dataset["id"].startswith("ds_") and dataset["name"] == "digits"
    assert dataset["sha256"] == hashlib.sha256(data).hexdigest() and dataset["count"] == 1200
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=alice).json()["sha256"] == dataset["sha256"]
    # A complete whose answer was lost is sent again: the same dataset, not a second one.
    again = client.post(f"/v1/uploads/{upload['id']}/complete", headers=alice)
    assert again.status_code == 200 and again.json()["id"] == dataset["id"]
    assert len(client.get("/v1/datasets", headers=alice).json()["items"]) == 1
    session = client.get(f"/v1/uploads/{upload['id']}", headers=alice).json()
    assert session["status"] == "completed" and session["result_id"] == dataset["id"] and session["parts"] == []
    # The parts are deleted once the dataset is stored.
    assert not list((settings.data_dir / "objects").rglob("uploads/*/parts/*"))
    # A completed session takes no more parts.
    assert problem_code(put(client, alice, upload, 1, data)) == "upload_not_open"


def test_a_part_with_a_wrong_checksum_is_refused_and_not_recorded(keyed):
    client, _, alice, _ = keyed
    data = npz_bytes()
    upload = start(client, alice, data=data)
    wrong = put(client, alice, upload, 1, data, {"x-checksum-sha256": hashlib.sha256(b"other bytes").hexdigest()})
    assert wrong.status_code == 422 and wrong.headers["content-type"].startswith("application/problem+json")
    assert problem_code(wrong) == "part_checksum_mismatch" and wrong.json()["part_number"] == 1
    bad_md5 = put(client, alice, upload, 2, data, {"Content-MD5": base64.b64encode(hashlib.md5(b"x").digest()).decode()})
    assert problem_code(bad_md5) == "part_checksum_mismatch"
    assert client.get(f"/v1/uploads/{upload['id']}", headers=alice).json()["parts"] == []
    # A right Content-MD5 is taken as well as a sha256.
    chunk = data[PART: 2 * PART]
    assert put(client, alice, upload, 2, data, {"Content-MD5": base64.b64encode(hashlib.md5(chunk).digest()).decode()}).status_code == 200
    assert problem_code(put(client, alice, upload, 1, data, {})) == "part_checksum_required"
    assert problem_code(put(client, alice, upload, 1, data, {"x-checksum-sha256": "not a digest"})) == "part_checksum_required"


def test_parts_of_the_wrong_size_or_number_are_refused(keyed):
    client, _, alice, _ = keyed
    data = npz_bytes()
    upload = start(client, alice, data=data)
    short = data[: PART - 10]
    response = client.put(f"/v1/uploads/{upload['id']}/parts/1", content=short,
                          headers={**alice, "x-checksum-sha256": sha256_b64(short)})
    assert response.status_code == 422 and problem_code(response) == "part_size_mismatch"
    assert response.json()["expected_bytes"] == PART
    beyond = put(client, alice, upload, upload["part_count"] + 1, data, {"x-checksum-sha256": sha256_b64(b"")})
    assert problem_code(beyond) == "part_number_out_of_range"


def test_complete_with_missing_parts_is_refused_and_names_them(keyed):
    client, _, alice, _ = keyed
    data = npz_bytes()
    upload = start(client, alice, data=data)
    put_all(client, alice, upload, data, skip=(2, upload["part_count"]))
    refused = client.post(f"/v1/uploads/{upload['id']}/complete", headers=alice)
    assert refused.status_code == 409 and problem_code(refused) == "upload_incomplete"
    assert refused.json()["missing_parts"] == [2, upload["part_count"]]
    assert client.get(f"/v1/uploads/{upload['id']}", headers=alice).json()["status"] == "open"
    for number in (2, upload["part_count"]):
        assert put(client, alice, upload, number, data).status_code == 200
    assert client.post(f"/v1/uploads/{upload['id']}/complete", headers=alice).status_code == 201


def test_another_tenant_cannot_touch_the_session(keyed):
    client, _, alice, bob = keyed
    data = npz_bytes()
    upload = start(client, alice, data=data)
    assert put(client, alice, upload, 1, data).status_code == 200
    path = f"/v1/uploads/{upload['id']}"
    for response in (client.get(path, headers=bob), put(client, bob, upload, 2, data),
                     client.post(f"{path}/complete", headers=bob), client.delete(path, headers=bob)):
        assert response.status_code == 404 and problem_code(response) == "upload_not_found"
    # Untouched: still open, with alice's one part and nothing of bob's.
    mine = client.get(path, headers=alice).json()
    assert mine["status"] == "open" and [p["number"] for p in mine["parts"]] == [1]


def test_a_hostile_model_through_a_session_is_still_refused(keyed, tmp_path):
    client, settings, alice, _ = keyed
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    data = pickle.dumps(Evil(), protocol=4) + b"\0" * (PART + 100)  # two parts: the pickle stops at its STOP
    upload = start(client, alice, data=data, kind="model")
    put_all(client, alice, upload, data)
    refused = client.post(f"/v1/uploads/{upload['id']}/complete", headers=alice)
    assert refused.status_code == 422 and problem_code(refused) == "pickle_refused"
    assert any("system" in ref for ref in refused.json()["references"])
    assert not marker.exists()
    session = client.get(f"/v1/uploads/{upload['id']}", headers=alice).json()
    assert session["status"] == "failed" and session["error"]["code"] == "pickle_refused"
    assert client.get("/v1/models", headers=alice).json()["items"] == []
    assert not list((settings.data_dir / "objects").rglob("uploads/*/parts/*"))


def test_a_file_that_is_not_the_declared_one_is_refused_at_complete(keyed):
    client, _, alice, _ = keyed
    data = npz_bytes()
    upload = start(client, alice, data=data, sha256=hashlib.sha256(b"another file").hexdigest())
    put_all(client, alice, upload, data)
    refused = client.post(f"/v1/uploads/{upload['id']}/complete", headers=alice)
    assert problem_code(refused) == "upload_checksum_mismatch"
    assert refused.json()["sha256"] == hashlib.sha256(data).hexdigest()


def test_sizes_part_sizes_and_open_sessions_are_bounded(tmp_path):
    settings = keyed_settings(tmp_path, upload_min_part_bytes=16 * KiB, upload_session_max_bytes=10 * MiB,
                              max_open_upload_sessions=2)
    small = add_tenant(settings, "small", max_stored_bytes=1 * MiB)
    other = add_tenant(settings, "other")
    with keyed_client(settings) as client:
        body = {"kind": "model", "filename": "m.onnx", "size_bytes": 11 * MiB}
        too_large = client.post("/v1/uploads", headers=other.headers(), json=body)
        assert too_large.status_code == 413 and problem_code(too_large) == "upload_too_large"
        assert too_large.json()["limit_bytes"] == 10 * MiB
        tiny_parts = client.post("/v1/uploads", headers=other.headers(), json={**body, "size_bytes": MiB, "part_bytes": 1024})
        assert problem_code(tiny_parts) == "invalid_part_size"
        # The stored-bytes quota counts the bytes of open sessions: two of 600 KiB do not fit in 1 MiB.
        first = client.post("/v1/uploads", headers=small.headers(), json={**body, "size_bytes": 600 * KiB})
        assert first.status_code == 201
        second = client.post("/v1/uploads", headers=small.headers(), json={**body, "size_bytes": 600 * KiB})
        assert second.status_code == 403 and problem_code(second) == "quota_exceeded"
        assert second.json()["quota"] == "stored_bytes"
        for _ in range(2):
            assert client.post("/v1/uploads", headers=other.headers(), json={**body, "size_bytes": MiB}).status_code == 201
        third = client.post("/v1/uploads", headers=other.headers(), json={**body, "size_bytes": MiB})
        assert problem_code(third) == "quota_exceeded" and third.json()["quota"] == "open_upload_sessions"


def test_aborted_and_expired_sessions_lose_their_parts(keyed):
    client, settings, alice, _ = keyed
    data = npz_bytes()
    objects = settings.data_dir / "objects"
    aborted, expiring, swept = (start(client, alice, data=data) for _ in range(3))
    for upload in (aborted, expiring, swept):
        assert put(client, alice, upload, 1, data).status_code == 200
    assert len(list(objects.rglob("uploads/*/parts/*"))) == 3

    assert client.delete(f"/v1/uploads/{aborted['id']}", headers=alice).status_code == 204
    assert problem_code(put(client, alice, aborted, 2, data)) == "upload_not_open"
    assert not [p for p in objects.rglob("uploads/*/parts/*") if aborted["id"] in str(p)]

    # Two sessions past their time (set in the database: no waiting on a clock).
    engine = make_engine(settings.effective_database_url)
    with make_session_factory(engine)() as session:
        session.execute(update(UploadSessionRow).where(UploadSessionRow.id.in_([expiring["id"], swept["id"]]))
                        .values(expires_at=utcnow()))
        session.commit()
    engine.dispose()
    gone = client.get(f"/v1/uploads/{expiring['id']}", headers=alice)
    assert gone.status_code == 410 and problem_code(gone) == "upload_expired"
    # The other one is cleaned by the sweep that runs when any session starts.
    start(client, alice, data=data)
    remaining = {p.parent.parent.name for p in objects.rglob("uploads/*/parts/*")}
    assert remaining == set()
    assert problem_code(client.get(f"/v1/uploads/{swept['id']}", headers=alice)) == "upload_expired"


# --- PostgreSQL and S3 -------------------------------------------------------------------------------

def test_sessions_on_postgresql_and_s3(tmp_path, postgres_url, s3_endpoint, s3_bucket):
    import boto3

    from service.migrate import upgrade

    upgrade(postgres_url)
    settings = keyed_settings(tmp_path, database_url=postgres_url, upload_min_part_bytes=16 * KiB,
                              storage_url=f"s3://{s3_bucket}/objects", s3_endpoint_url=s3_endpoint)
    tenant = add_tenant(settings, "pg")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

    def stored_parts() -> list[str]:
        listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"objects/tenants/{tenant.id}/uploads/")
        return [o["Key"] for o in listed.get("Contents", [])]

    model_bytes = onnx_model(tmp_path / "m.onnx", features=256).read_bytes()
    with keyed_client(settings) as client:
        upload = start(client, tenant.headers(), data=model_bytes, kind="model")
        put_all(client, tenant.headers(), upload, model_bytes, skip=(1,))
        assert len(stored_parts()) == upload["part_count"] - 1
        assert problem_code(client.post(f"/v1/uploads/{upload['id']}/complete", headers=tenant.headers())) == "upload_incomplete"
        assert put(client, tenant.headers(), upload, 1, model_bytes).status_code == 200
        done = client.post(f"/v1/uploads/{upload['id']}/complete", headers=tenant.headers())
        assert done.status_code == 201, done.text
        model = done.json()
        assert model["format"] == "onnx" and model["sha256"] == hashlib.sha256(model_bytes).hexdigest()
        assert model["inputs"][0]["shape"] == [None, 256]
        assert stored_parts() == []


# --- a real server process -----------------------------------------------------------------------------

class UploadCutter:
    """Drops the connection once, when the bytes the client has sent pass `cut_after`: the way a
    network drops a long upload. Counts the part requests it sees."""

    def __init__(self, cut_after: int):
        self.cut_after, self.sent, self.cuts, self.part_requests = cut_after, 0, 0, 0

    def __call__(self, data: bytes, from_client: bool, connection: dict) -> bytes:
        if from_client:
            self.part_requests += data.count(b"PUT /v1/uploads/")
            self.sent += len(data)
            if self.cuts == 0 and self.sent > self.cut_after:
                self.cuts += 1
                raise Cut(data[: len(data) // 2])
        return data


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m worker.serve` (uvicorn, the embedded default) with small parts allowed."""
    data_dir = tmp_path_factory.mktemp("uploads-server") / "data"
    port = free_port()
    env = {"PORT": str(port), "MODELPRESS_DATA_DIR": str(data_dir), "MODELPRESS_UPLOAD_MIN_PART_BYTES": str(PART),
           "MODELPRESS_UPLOAD_PART_BYTES": str(256 * KiB)}
    api = Process("api-uploads", [sys.executable, "-m", "worker.serve"], env, data_dir.parent)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", api, timeout=120)
        yield f"http://127.0.0.1:{port}", api, data_dir
    finally:
        api.stop()


def test_an_upload_cut_mid_way_resumes_and_keeps_its_sha256(server, tmp_path):
    url, _, _ = server
    path = onnx_model(tmp_path / "big.onnx")
    size = path.stat().st_size
    part_count = -(-size // (256 * KiB))
    upstream_port = int(url.rsplit(":", 1)[1])
    proxy = Relay(upstream_port, UploadCutter(cut_after=size // 2))
    seen: list[tuple[int, int]] = []
    try:
        with Client(base_url=f"http://127.0.0.1:{proxy.port}", upload_session_threshold=0, backoff=0.05,
                    upload_progress=lambda done, total: seen.append((done, total))) as client:
            model = client.upload_model(path)
    finally:
        proxy.close()
    assert proxy.meddle.cuts == 1
    assert model.raw["sha256"] == file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.format == "onnx" and model.raw["size_bytes"] == size
    # Resumed, not restarted: only the part in flight went again.
    assert part_count + 1 <= proxy.meddle.part_requests <= part_count + 2
    # Progress went forward to the whole file (and held at the parts received across the cut).
    assert seen[-1] == (size, size)
    assert min(done for done, _ in seen if done > 0) < size // 2 < max(done for done, _ in seen)


def test_the_cli_shows_upload_progress(server, tmp_path):
    url, _, _ = server
    path = tmp_path / "data.npz"
    path.write_bytes(npz_bytes(2000))
    result = subprocess.run([sys.executable, "-m", "modelpress.cli", "datasets", "upload", str(path), "--url", url],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MODELPRESS_UPLOAD_SESSION_THRESHOLD": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ds_") and "2000 images" in result.stdout
    progress = [line for line in result.stderr.splitlines() if line.startswith("upload [")]
    assert len(progress) >= 2 and "100%" in progress[-1] and "0%" in progress[0]


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


GIB2 = 2 * 1024**3


def test_a_2gb_upload_keeps_the_servers_memory_flat(server, tmp_path):
    free = shutil.disk_usage(tmp_path).free
    if free < 6 * 1024**3:
        pytest.skip(f"needs 6 GB of free disk (parts, the joined file, temp copies); {free / 1024**3:.1f} GB free")
    url, api, _ = server
    pid = api.proc.pid
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as handle:  # a hole: no bytes on this disk, 2 GB to read
        handle.truncate(GIB2)
    with Client(base_url=url, upload_session_threshold=0) as client:
        # Warm-up: every code path of a session loaded before the baseline is read.
        small = tmp_path / "small.npz"
        small.write_bytes(npz_bytes(2000))
        client.upload_dataset(small)
        baseline = _status_kib(pid, "VmRSS")
        hwm_before = _status_kib(pid, "VmHWM")
        peak = {"rss": baseline}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak["rss"] = max(peak["rss"], _status_kib(pid, "VmRSS"))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        try:
            uploader = ResumableUpload(client, kind="dataset", file=sparse, part_bytes=16 * MiB)
            with pytest.raises(ModelpressError) as refused:
                uploader.run()
        finally:
            stop.set()
            sampler.join()
        elapsed = time.monotonic() - started
    # Every part arrived and was joined; the zeros are then refused by the dataset checks, as a
    # single-request upload of them would be.
    assert refused.value.code == "invalid_dataset", refused.value
    assert uploader.upload["part_count"] == 128 and uploader.resumes == 0
    hwm_after = _status_kib(pid, "VmHWM")
    growth_kib = max(peak["rss"], hwm_after if hwm_after > hwm_before else baseline) - baseline
    print(f"2 GiB upload in {elapsed:.1f} s ({GIB2 / MiB / elapsed:.0f} MiB/s); server RSS {baseline / 1024:.0f} MiB "
          f"at start, growth {growth_kib / 1024:.1f} MiB (VmHWM {hwm_before / 1024:.0f} -> {hwm_after / 1024:.0f} MiB)")
    assert growth_kib < 64 * 1024


def test_two_completes_at_once_make_one_model(server, tmp_path):
    import httpx

    url, _, _ = server
    data = onnx_model(tmp_path / "m.onnx", features=128).read_bytes()
    with httpx.Client(base_url=url, timeout=300) as client:
        upload = start(client, {}, data=data, kind="model")
        put_all(client, {}, upload, data)
        answers: list[httpx.Response] = []

        def complete():
            with httpx.Client(base_url=url, timeout=300) as own:
                answers.append(own.post(f"/v1/uploads/{upload['id']}/complete"))

        threads = [threading.Thread(target=complete) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        statuses = sorted(a.status_code for a in answers)
        # One made the model; the other either saw it finished (200, the same model) or in progress (409).
        assert statuses in ([200, 201], [201, 409]), [a.text for a in answers]
        made = next(a.json() for a in answers if a.status_code == 201)
        other = next(a for a in answers if a.status_code != 201)
        if other.status_code == 409:
            assert problem_code(other) == "upload_not_open" and other.json()["upload_status"] == "completing"
        else:
            assert other.json()["id"] == made["id"]
        same_bytes = client.get("/v1/models", params={"sha256": hashlib.sha256(data).hexdigest()}).json()["items"]
        assert [m["id"] for m in same_bytes] == [made["id"]]
