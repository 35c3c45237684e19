"""Idempotency-Key on POSTs: a repeat gets the first answer and runs nothing, also under 20
concurrent retries against a real server (the embedded default, and uvicorn + Celery on
PostgreSQL); another body under the same key is refused; a key in use, an expired key, a
tenant's bound, answers that are not kept; the client's retry of a submit whose answer was lost."""

import threading
import uuid
from datetime import timedelta

import httpx
import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from sqlalchemy import update

from modelpress import Client
from service.config import Settings
from service.db import make_engine, make_session_factory, utcnow
from service.idempotency.tables import IdempotencyKeyRow
from service.migrate import upgrade
from tests.processes import free_port, wait_for
from tests.relay import Cut, Relay
from tests.stack import embedded_server, production_stack
from tests.tenancy import add_tenant, keyed_client, keyed_settings
from tests.test_models_api import assert_problem
from worker.serve import create_app


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A one-layer classifier on 8x8 images and data for it: enough to accept a job, built in ms."""
    out = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(64, 10)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, out / "tiny.onnx")
    np.savez(out / "calib.npz", images=rng.integers(0, 255, (16, 1, 8, 8), dtype=np.uint8))
    return out / "tiny.onnx", out / "calib.npz"


def upload(http, path, key=None, name=None, headers=None):
    headers = {**(headers or {}), **({"Idempotency-Key": key} if key else {})}
    # A fixed boundary: the same request sent twice is the same bytes (as the client sends it).
    headers["Content-Type"] = "multipart/form-data; boundary=modelpress-test-boundary"
    return http.post(f"/v1/{'models' if path.suffix == '.onnx' else 'datasets'}",
                     files={"file": (path.name, path.read_bytes())}, data={"name": name} if name else None,
                     headers=headers)


def job_body(model_id, dataset_id, method="static_int8"):
    return {"model_id": model_id, "steps": [{"type": "quantize", "params": {"method": method}}],
            "data": {"calibration": dataset_id}}


def test_a_repeat_gets_the_first_answer_and_runs_nothing(client, tiny):
    onnx_path, calib = tiny
    first = upload(client, onnx_path, key="upload-1", name="tiny")
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    again = upload(client, onnx_path, key="upload-1", name="tiny")
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() and again.headers["content-type"] == first.headers["content-type"]
    assert [m["id"] for m in client.get("/v1/models").json()["items"]] == [first.json()["id"]]
    dataset = upload(client, calib, key="upload-2").json()

    body = job_body(first.json()["id"], dataset["id"])
    job = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "submit-1"})
    assert job.status_code == 202
    repeat = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "submit-1"})
    assert repeat.status_code == 202 and repeat.headers["idempotent-replayed"] == "true"
    assert repeat.json()["id"] == job.json()["id"] and repeat.json()["status"] == "queued"  # the first answer, as it was
    assert [j["id"] for j in client.get("/v1/jobs").json()["items"]] == [job.json()["id"]]

    # The same key for another body, another path, or another method's target: refused, nothing runs.
    other = assert_problem(client.post("/v1/jobs", json=job_body(first.json()["id"], dataset["id"], "dynamic_int8"),
                                       headers={"Idempotency-Key": "submit-1"}), 409, "idempotency_key_reused")
    assert "fresh key" in other["detail"]
    assert_problem(client.post(f"/v1/jobs/{job.json()['id']}/cancel", headers={"Idempotency-Key": "submit-1"}),
                   409, "idempotency_key_reused")
    assert len(client.get("/v1/jobs").json()["items"]) == 1
    # A refusal is an answer too: repeated as it was, even once the model exists.
    missing = client.post("/v1/jobs", json=job_body("mdl_missing", dataset["id"]), headers={"Idempotency-Key": "submit-2"})
    assert_problem(missing, 404, "model_not_found")
    assert client.post("/v1/jobs", json=job_body("mdl_missing", dataset["id"]),
                       headers={"Idempotency-Key": "submit-2"}).headers["idempotent-replayed"] == "true"
    # Without a key nothing changes: two posts, two jobs.
    assert client.post("/v1/jobs", json=body).json()["id"] != client.post("/v1/jobs", json=body).json()["id"]

    for bad in ("", "x" * 256, "has space", "tab\there"):
        assert_problem(client.post("/v1/jobs", json=body, headers={"Idempotency-Key": bad}), 400, "idempotency_key_invalid")


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def served(request, tmp_path_factory):
    """A real server: the embedded default (uvicorn, SQLite), or uvicorn + Celery on PostgreSQL."""
    logs = tmp_path_factory.mktemp(f"idempotency-{request.param}")
    if request.param == "embedded":
        with embedded_server(logs / "data") as (url, _):
            yield url, logs / "data" / "modelpress.db"
    else:
        with production_stack(logs, redis_url=request.getfixturevalue("redis_url"),
                              s3_endpoint=request.getfixturevalue("s3_endpoint"), bucket="modelpress-idem") as (url, _, _):
            yield url, None


def test_twenty_concurrent_retries_create_one_job(served, tiny):
    url, _ = served
    onnx_path, calib = tiny
    with httpx.Client(base_url=url, timeout=120) as http:
        model = upload(http, onnx_path).json()
        dataset = upload(http, calib).json()
        body, key = job_body(model["id"], dataset["id"]), str(uuid.uuid4())
        start, answers = threading.Barrier(20), []

        def retry():
            with httpx.Client(base_url=url, timeout=120) as own:
                start.wait()
                answers.append(own.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}))

        threads = [threading.Thread(target=retry) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert len(answers) == 20
        accepted = [a for a in answers if a.status_code == 202]
        busy = [a for a in answers if a.status_code == 409]
        assert len(accepted) + len(busy) == 20, [a.text for a in answers]
        assert all(a.json()["code"] == "idempotency_key_in_use" for a in busy)
        assert len({a.json()["id"] for a in accepted}) == 1
        # Exactly one ran; every other accepted answer is its replay.
        assert sum("idempotent-replayed" not in a.headers for a in accepted) == 1
        jobs = [j for j in http.get("/v1/jobs", params={"limit": 200}).json()["items"] if j["model_id"] == model["id"]]
        assert [j["id"] for j in jobs] == [accepted[0].json()["id"]]
        # A late retry, after all of them, gets the same answer.
        late = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        assert late.status_code == 202 and late.json()["id"] == jobs[0]["id"] and late.headers["idempotent-replayed"] == "true"


def test_a_request_still_running_holds_its_key(served, tiny):
    """A slow upload holds its key: a repeat waits (MODELPRESS_IDEMPOTENCY_WAIT_S, 5 s), then gets 409
    `idempotency_key_in_use`; once the upload has answered, a repeat gets that answer."""
    url, database = served
    if database is None:
        pytest.skip("one database is enough to watch a key being held: the embedded one")
    onnx_path, _ = tiny
    key, boundary = str(uuid.uuid4()), "slow-upload-boundary"
    content = httpx.Request("POST", f"{url}/v1/models", files={"file": (onnx_path.name, onnx_path.read_bytes())},
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}).read()
    headers = {"Idempotency-Key": key, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    release, answers = threading.Event(), []

    def slow_body():
        yield content[:100]
        release.wait(120)
        yield content[100:]

    slow = threading.Thread(target=lambda: answers.append(
        httpx.post(f"{url}/v1/models", content=slow_body(), headers=headers, timeout=180)))
    slow.start()
    try:
        engine = make_engine(f"sqlite:///{database}")
        from sqlalchemy import select

        def held():
            with make_session_factory(engine)() as session:
                return session.scalar(select(IdempotencyKeyRow.state).where(IdempotencyKeyRow.key == key)) == "running"

        wait_for(held, 60, "the slow upload to take its key")
        busy = httpx.post(f"{url}/v1/models", content=content, headers=headers, timeout=60)
        assert_problem(busy, 409, "idempotency_key_in_use")
        assert busy.headers["retry-after"] == "1"
    finally:
        release.set()
        slow.join(180)
    assert answers and answers[0].status_code == 201, answers
    repeat = httpx.post(f"{url}/v1/models", content=content, headers=headers, timeout=60)
    assert repeat.status_code == 201 and repeat.json() == answers[0].json() and repeat.headers["idempotent-replayed"] == "true"
    engine.dispose()


def test_answers_that_say_nothing_final_give_the_key_back(tmp_path, tiny):
    """A 503 (the broker is down: the job is stored, failed) keeps nothing: a retry runs anew."""
    onnx_path, calib = tiny
    settings = Settings(data_dir=tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0", auth="off")
    upgrade(settings.effective_database_url)
    with TestClient(create_app(settings)) as client:
        body = job_body(upload(client, onnx_path).json()["id"], upload(client, calib).json()["id"])
        for _ in range(2):
            response = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "while-the-broker-is-down"})
            assert_problem(response, 503, "broker_unavailable")
            assert "idempotent-replayed" not in response.headers
        assert [j["error"]["code"] for j in client.get("/v1/jobs").json()["items"]] == ["broker_unavailable"] * 2


def test_keys_expire_and_a_tenant_holds_a_bounded_number(tmp_path, tiny):
    onnx_path, calib = tiny
    settings = Settings(data_dir=tmp_path / "data", idempotency_max_keys_per_tenant=2)
    with TestClient(create_app(settings)) as client:
        dataset = upload(client, calib).json()  # no key: not counted
        body = job_body("mdl_missing", dataset["id"])
        for key in ("k1", "k2"):
            assert_problem(client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}), 404, "model_not_found")
        exhausted = assert_problem(client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k3"}), 429,
                                   "idempotency_keys_exhausted")
        assert "2" in exhausted["detail"]
        # k1 expires (as after MODELPRESS_IDEMPOTENCY_TTL_S): it is free for another request, and its place too.
        engine = make_engine(settings.effective_database_url)
        with make_session_factory(engine)() as session:
            session.execute(update(IdempotencyKeyRow).where(IdempotencyKeyRow.key == "k1")
                            .values(expires_at=utcnow() - timedelta(seconds=1)))
            session.commit()
        engine.dispose()
        model = upload(client, onnx_path, key="k1")
        assert model.status_code == 201 and "idempotent-replayed" not in model.headers
        assert client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k3"}).status_code == 429


def test_keys_belong_to_their_tenant(tmp_path, tiny):
    onnx_path, _ = tiny
    settings = keyed_settings(tmp_path)
    alice, bob = add_tenant(settings, "alice"), add_tenant(settings, "bob")
    with keyed_client(settings) as client:
        theirs = upload(client, onnx_path, key="shared-key", headers=alice.headers())
        ours = upload(client, onnx_path, key="shared-key", headers=bob.headers())
        assert theirs.status_code == ours.status_code == 201
        assert "idempotent-replayed" not in ours.headers and ours.json()["id"] != theirs.json()["id"]
        # No valid key: the route refuses it, and nothing is kept under the idempotency key.
        refused = upload(client, onnx_path, key="anonymous", headers={"Authorization": "Bearer mp_nope_nope"})
        assert_problem(refused, 401, "invalid_api_key")
        assert "idempotent-replayed" not in upload(client, onnx_path, key="anonymous", headers=alice.headers()).headers


class AnswerLoser:
    """Drops the connection instead of passing on the first answer to a POST /v1/jobs: the job was
    created, the client never heard (a timeout, a cut network)."""

    def __init__(self):
        self.dropped = 0

    def __call__(self, data: bytes, from_client: bool, connection: dict) -> bytes:
        if from_client and data.startswith(b"POST /v1/jobs "):
            connection["submit"] = True
        if not from_client and connection.get("submit") and self.dropped == 0:
            self.dropped += 1
            raise Cut()
        return data


def test_the_client_retries_a_submit_with_its_key(served, tiny):
    url, database = served
    if database is None:
        pytest.skip("the client's side needs one server: the embedded one")
    onnx_path, calib = tiny
    proxy = Relay(int(url.rsplit(":", 1)[1]), AnswerLoser())
    try:
        with Client(f"http://127.0.0.1:{proxy.port}", backoff=0.05) as client:
            model = client.upload_model(onnx_path)
            dataset = client.upload_dataset(calib)
            job = client.submit(model, [{"type": "quantize"}], data={"calibration": dataset})
    finally:
        proxy.close()
    assert proxy.meddle.dropped == 1
    with httpx.Client(base_url=url) as http:
        jobs = [j["id"] for j in http.get("/v1/jobs", params={"limit": 200}).json()["items"] if j["model_id"] == model.id]
    assert jobs == [job.id]  # the retry got the first answer; no second job
