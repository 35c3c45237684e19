"""A broker that is down must not leave a job stuck in `queued`: the client gets 503 with a code,
the job is marked failed with the same code, and the upload it used is kept."""

from fastapi.testclient import TestClient

from service.config import Settings
from worker.serve import create_app
from service.migrate import upgrade
from tests.jobs_flow import upload_dataset, upload_model
from tests.processes import free_port
from tests.test_models_api import assert_problem


def test_job_fails_cleanly_when_the_broker_is_down(tmp_path, reference):
    # Keys are off: this test is about the broker (keys with a broker: test_api_keys.py).
    settings = Settings(data_dir=tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0", auth="off")
    upgrade(settings.effective_database_url)
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert_problem(ready, 503, "not_ready")
        assert ready.json()["checks"]["broker"].startswith("error")
        model = upload_model(client, reference.onnx)
        data = upload_dataset(client, reference.calib_npz)
        response = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"type": "quantize"}],
                                                  "data": {"calibration": data["id"]}})
        assert_problem(response, 503, "broker_unavailable")
        [job] = client.get("/v1/jobs").json()["items"]
        assert job["status"] == "failed" and job["error"]["code"] == "broker_unavailable"
        assert client.get(f"/v1/models/{model['id']}").status_code == 200
