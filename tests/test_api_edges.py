"""The API's edges a new user meets first: an artifact asked for too early, HEAD where GET works,
and /docs and /redoc without internet."""

import re

from tests.jobs_flow import upload_dataset, upload_model, wait_finished
from tests.test_models_api import assert_problem


def test_artifact_of_an_unfinished_job_is_409_naming_its_status(client, reference):
    import tests.plugins  # noqa: F401  (registers the test-only `wait` step)

    model = upload_model(client, reference.onnx)["id"]
    data = upload_dataset(client, reference.calib_npz)["id"]
    job = client.post("/v1/jobs", json={"model_id": model, "steps": [{"type": "wait", "params": {"seconds": 600}}],
                                        "data": {"eval": data}}).json()
    try:
        response = client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx")
        body = assert_problem(response, 409, "job_not_finished")
        assert body["job_status"] in ("queued", "running") and body["job_status"] in body["detail"]
        assert client.head(f"/v1/jobs/{job['id']}/artifacts/model.onnx").status_code == 409
    finally:
        client.post(f"/v1/jobs/{job['id']}/cancel")
        cancelled, _ = wait_finished(client, job["id"], timeout=180)
    assert cancelled["status"] == "cancelled"
    # Finished without that artifact: a plain 404.
    assert_problem(client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx"), 404, "artifact_not_found")


def test_head_answers_where_get_does(client, reference):
    assert client.head("/healthz").status_code == 200
    model = upload_model(client, reference.onnx)["id"]
    data = upload_dataset(client, reference.calib_npz)["id"]
    job = client.post("/v1/jobs", json={"model_id": model, "steps": [{"type": "quantize", "params": {"method": "dynamic_int8"}}],
                                        "data": {"eval": data}}).json()
    job, _ = wait_finished(client, job["id"])
    assert job["status"] == "succeeded", job["error"]
    artifact = next(a for a in job["artifacts"] if a["name"] == "model.onnx")
    head = client.head(artifact["url"])
    get = client.get(artifact["url"])
    assert head.status_code == get.status_code == 200
    assert head.content == b"" and len(get.content) == artifact["size_bytes"]
    for header in ("content-length", "etag", "repr-digest", "content-disposition", "content-type"):
        assert head.headers[header] == get.headers[header], header


def test_docs_and_redoc_load_their_assets_from_the_service(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200
        sources = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert sources and not [s for s in sources if s.startswith(("http://", "https://", "//"))], sources
        for source in sources:
            asset = client.get(source)
            assert asset.status_code == 200 and len(asset.content) > 1000 or source.endswith(".png"), source
    assert client.get("/openapi.json").status_code == 200
