"""The Python client and the `modelpress` CLI, end to end against the real service: the embedded
default (`python -m service`) and the production stack (API + Celery worker + PostgreSQL + Redis
+ S3). The CLI runs as a subprocess, the way a CI job or an Airflow task runs it."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import onnx
import pytest

from modelpress import Client, FidelityFloorNotMet, GuardNotMet, JobFailed, ModelpressError, ServerUnreachable
from tests.jobs_flow import weight_bytes
from tests.processes import free_port
from tests.relay import Cut, Relay
from tests.stack import embedded_server, production_stack

CLI = str(Path(sys.executable).parent / "modelpress")


@pytest.fixture(scope="module", params=["embedded", "stack"])
def server_url(request, tmp_path_factory):
    logs = tmp_path_factory.mktemp(f"client-{request.param}")
    if request.param == "embedded":
        with embedded_server(logs / "data") as (url, _):
            yield url
    else:
        with production_stack(logs, redis_url=request.getfixturevalue("redis_url"),
                              s3_endpoint=request.getfixturevalue("s3_endpoint"), bucket="modelpress-client") as (url, _, _):
            yield url


def run_cli(*args, url: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODELPRESS_URL": url}
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_client_end_to_end(server_url, reference, tmp_path):
    with Client(server_url) as client:
        model = client.upload_model(reference.onnx, name="resnet")
        calibration = client.upload_dataset(reference.calib_npz)
        evaluation = client.upload_dataset(reference.eval_npz)
        assert (model.format, calibration.has_labels, evaluation.has_labels) == ("onnx", False, True)
        updates = []
        job = client.submit(model, [{"type": "quantize", "params": {"method": "static_int8"}}],
                            data={"calibration": calibration, "eval": evaluation.id})
        job.wait(timeout=600, on_update=lambda j: updates.append((j.status, j.progress)))
        assert job.status == "succeeded" and updates[-1] == ("succeeded", 1.0)
        path = job.download("model.onnx", to=tmp_path)
        assert path == tmp_path / "model.onnx"
        # int8 from the file itself: the weights take a quarter of the float bytes (0.25 measured;
        # fp16 would give 0.5, a float copy 1.0).
        weights = weight_bytes(onnx.load(str(path)).graph)
        original = weight_bytes(onnx.load(str(reference.onnx)).graph)[onnx.TensorProto.FLOAT]
        assert weights[onnx.TensorProto.INT8] <= 0.3 * original and job.metrics["comparison"]["size_ratio"] > 1.5, weights
        assert hashlib.sha256(path.read_bytes()).hexdigest() == job.artifacts["model.onnx"]["sha256"]
        assert client.job(job.id).status == "succeeded"
        assert job.id in [j.id for j in client.jobs(status="succeeded")]
        assert model.id in [m.id for m in client.models()]


def test_client_raises_coded_errors(server_url, reference, tmp_path):
    with Client(server_url) as client:
        with pytest.raises(ModelpressError) as missing:
            client.job("job_nope")
        assert (missing.value.code, missing.value.status) == ("job_not_found", 404)
        already = client.submit(client.upload_model(reference.onnx), [{"type": "quantize"}],
                                data={"calibration": client.upload_dataset(reference.calib_npz)})
        already.wait(timeout=600, progress=False)
        quantized = client.upload_model(already.download("model.onnx", to=tmp_path / "q.onnx"))
        failing = client.submit(quantized, [{"type": "quantize"}], data={"calibration": already.raw["data"]["calibration"]})
        with pytest.raises(JobFailed) as failed:
            failing.wait(timeout=600, progress=False)
        assert failed.value.code == "already_quantized" and not isinstance(failed.value, GuardNotMet)
        assert failed.value.job.status == "failed"


def test_cli_compress_like_a_ci_job(server_url, reference, tmp_path):
    out = tmp_path / "out"
    result = run_cli("compress", str(reference.onnx), "--method", "static_int8", "--calibration", str(reference.calib_npz),
                     "--eval", str(reference.eval_npz), "--output", str(out), url=server_url)
    assert result.returncode == 0, result.stderr
    assert "x smaller" in result.stdout and "top-1" in result.stdout
    # Not a terminal: progress comes as plain lines, one per change, ending at 100%.
    progress_lines = [line for line in result.stderr.splitlines() if line.startswith("job_")]
    assert progress_lines and progress_lines[-1].split()[1:3] == ["succeeded", "100%"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.onnx", "recipe.json", "report.html"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["compressed"]["size_bytes"] == (out / "model.onnx").stat().st_size


def test_cli_json_output_and_job_commands(server_url, reference, tmp_path):
    result = run_cli("compress", str(reference.onnx), "--step", '{"type": "quantize", "params": {"calibration": "percentile"}}',
                     "--calibration", str(reference.calib_npz), "--output", str(tmp_path / "a"), "--json", url=server_url)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)  # JSON only on stdout
    job_id = payload["job"]["id"]
    assert payload["job"]["steps"][0]["params"]["calibration"] == "percentile"
    assert set(payload["downloaded"]) == {"model.onnx", "metrics.json", "report.html", "recipe.json"}

    shown = run_cli("jobs", "show", job_id, "--json", url=server_url)
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "succeeded"
    listed = run_cli("jobs", "list", "--json", url=server_url)
    assert job_id in [j["id"] for j in json.loads(listed.stdout)]
    downloaded = run_cli("jobs", "download", job_id, "--output", str(tmp_path / "b"), url=server_url)
    assert downloaded.returncode == 0 and (tmp_path / "b" / "model.onnx").is_file()
    assert run_cli("jobs", "cancel", job_id, url=server_url).returncode == 2  # finished: 409

    uploaded = run_cli("models", "upload", str(reference.onnx), "--name", "cli", "--json", url=server_url)
    model_id = json.loads(uploaded.stdout)["id"]
    assert json.loads(run_cli("models", "show", model_id, "--json", url=server_url).stdout)["name"] == "cli"
    assert model_id in run_cli("models", "list", url=server_url).stdout
    dataset = run_cli("datasets", "upload", str(reference.calib_npz), "--json", url=server_url)
    dataset_id = json.loads(dataset.stdout)["id"]
    no_wait = run_cli("compress", model_id, "--calibration", dataset_id, "--output", str(tmp_path / "c"), "--no-wait", "--json", url=server_url)
    assert no_wait.returncode == 0
    waited = run_cli("jobs", "wait", json.loads(no_wait.stdout)["job"]["id"], "--json", url=server_url)
    assert waited.returncode == 0 and json.loads(waited.stdout)["job"]["status"] == "succeeded"


def test_cli_exit_codes_for_failures(server_url, reference, tmp_path):
    missing = run_cli("jobs", "show", "job_nope", url=server_url)
    assert missing.returncode == 2 and "job_not_found" in missing.stderr
    bad = run_cli("compress", str(reference.onnx), "--calibration", str(reference.wrong_size_npz), "--output", str(tmp_path), url=server_url)
    assert bad.returncode == 2 and "dataset_shape_mismatch" in bad.stderr
    assert run_cli("compress", "no-such-file.onnx", "--output", str(tmp_path), url=server_url).returncode == 2
    assert run_cli("frobnicate", url=server_url).returncode == 2

    first = run_cli("compress", str(reference.onnx), "--calibration", str(reference.calib_npz), "--output", str(tmp_path / "q"), url=server_url)
    assert first.returncode == 0, first.stderr
    failed = run_cli("compress", str(tmp_path / "q" / "model.onnx"), "--calibration", str(reference.calib_npz),
                     "--output", str(tmp_path / "q2"), "--json", url=server_url)
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["job"]["error"]["code"] == "already_quantized"


def test_unreachable_server():
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, retries=1, backoff=0.01) as client, pytest.raises(ServerUnreachable):
        client.job("job_x")
    result = run_cli("jobs", "list", url=url)
    assert result.returncode == 4 and "server_unreachable" in result.stderr


class DownloadCutter:
    """Cuts the first artifact download mid-body, the way a dropped connection does."""

    def __init__(self, cut_after_bytes: int = 2000):
        self.cut_after, self.cuts = cut_after_bytes, 0

    def __call__(self, data: bytes, from_client: bool, connection: dict) -> bytes:
        if from_client and b"/artifacts/" in data:
            connection["download"] = True
        if not from_client and connection.get("download") and self.cuts == 0:
            connection["relayed"] = connection.get("relayed", 0) + len(data)
            if connection["relayed"] > self.cut_after:
                self.cuts += 1
                raise Cut(data[: self.cut_after // 2])
        return data

def test_interrupted_download_is_retried(reference, tmp_path):
    with embedded_server(tmp_path / "data") as (url, _), Client(url) as direct:
        job = direct.submit(direct.upload_model(reference.onnx), [{"type": "quantize"}],
                            data={"calibration": direct.upload_dataset(reference.calib_npz)})
        job.wait(timeout=600, progress=False)
        proxy = Relay(int(url.rsplit(":", 1)[1]), DownloadCutter())
        try:
            with Client(f"http://127.0.0.1:{proxy.port}", backoff=0.01) as flaky:
                path = flaky.job(job.id).download("model.onnx", to=tmp_path / "model.onnx")
        finally:
            proxy.close()
        assert proxy.meddle.cuts == 1
        assert hashlib.sha256(path.read_bytes()).hexdigest() == job.artifacts["model.onnx"]["sha256"]
        assert not (tmp_path / "model.onnx.part").exists()


# --- client behaviour a live server cannot easily show: a fake transport stands in for it ---------

def _fake(handler) -> Client:
    return Client("http://modelpress.test", transport=httpx.MockTransport(handler), backoff=0.0)


def test_transient_errors_are_retried_a_bounded_number_of_times():
    calls = []

    def flaky(request):
        calls.append(request.method)
        if len(calls) < 3:
            return httpx.Response(503, json={"code": "not_ready", "detail": "x"})
        return httpx.Response(200, json={"id": "job_1", "status": "queued", "stage": "queued", "progress": 0})

    assert _fake(flaky).job("job_1").status == "queued" and len(calls) == 3

    def always_down(request):
        calls.append(request.method)
        return httpx.Response(502, text="bad gateway")

    calls.clear()
    with pytest.raises(ModelpressError) as error:
        _fake(always_down).job("job_1")
    assert error.value.code == "http_502" and len(calls) == 5  # 1 + 4 retries


def test_a_failed_guard_raises_guard_not_met():
    def guarded(request):
        return httpx.Response(200, json={"id": "job_1", "status": "failed", "stage": "failed", "progress": 0.9,
                                         "error": {"code": "guard_not_met", "message": "accuracy drop 2.1 > 1.0 points"}})

    job = _fake(guarded).job("job_1")
    with pytest.raises(GuardNotMet) as error:
        job.wait(progress=False)
    assert isinstance(error.value, JobFailed) and error.value.code == "guard_not_met"


def test_a_missed_floor_raises_fidelity_floor_not_met_with_the_shortfalls():
    missed = {"metric": "top1_agreement", "value": 0.11, "bound": 0.95, "direction": "min"}

    def floored(request):
        return httpx.Response(200, json={"id": "job_1", "status": "failed", "stage": "failed", "progress": 1.0,
                                         "metrics": {"floor": {"mode": "default", "met": False, "shortfalls": [missed]}},
                                         "error": {"code": "fidelity_floor_not_met", "message": "top1_agreement 0.1100 < 0.95"}})

    with pytest.raises(FidelityFloorNotMet) as error:
        _fake(floored).job("job_1").wait(progress=False)
    assert isinstance(error.value, JobFailed) and not isinstance(error.value, GuardNotMet)
    assert error.value.code == "fidelity_floor_not_met" and error.value.shortfalls == [missed]


def test_submit_sends_the_task_and_the_floor():
    bodies = []

    def accept(request):
        bodies.append(json.loads(request.content))
        return httpx.Response(202, json={"id": "job_1", "status": "queued", "stage": "queued", "progress": 0})

    client = _fake(accept)
    client.submit("mdl_1", [{"type": "quantize"}], task="detection", floor="off")
    client.submit("mdl_1", [{"type": "quantize"}], task={"type": "ctc", "blank": 3}, floor={"exact_match": 0.9})
    client.submit("mdl_1", [{"type": "quantize"}])
    assert [(b.get("task"), b.get("floor")) for b in bodies] == [
        ({"type": "detection"}, "off"), ({"type": "ctc", "blank": 3}, {"exact_match": 0.9}), (None, None)]


def test_a_post_that_may_have_stored_something_is_not_retried():
    calls = []

    def unavailable(request):
        calls.append(request.method)
        return httpx.Response(503, json={"code": "broker_unavailable", "detail": "stored but not queued"})

    with pytest.raises(ModelpressError) as error:
        _fake(unavailable).submit("mdl_1", [{"type": "quantize"}])
    assert error.value.code == "broker_unavailable" and calls == ["POST"]

    calls.clear()

    def throttled_then_ok(request):
        calls.append(request.method)
        if len(calls) == 1:
            return httpx.Response(429, headers={"retry-after": "0"}, json={"code": "rate_limited", "detail": "x"})
        return httpx.Response(202, json={"id": "job_1", "status": "queued", "stage": "queued", "progress": 0})

    assert _fake(throttled_then_ok).submit("mdl_1", [{"type": "quantize"}]).id == "job_1" and calls == ["POST", "POST"]


def test_cli_recipe_file_gives_steps_and_data(server_url, reference, tmp_path):
    with Client(server_url) as client:
        calibration = client.upload_dataset(reference.calib_npz).id
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model_id": "replaced-by-MODEL",
                                  "steps": [{"type": "quantize", "params": {"method": "weight_only", "bits": 4}}],
                                  "data": {"calibration": calibration}}))
    result = run_cli("compress", str(reference.onnx), "--recipe", str(recipe), "--output", str(tmp_path / "out"), "--json", url=server_url)
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)["job"]
    assert job["steps"][0]["params"]["method"] == "weight_only" and job["data"]["calibration"] == calibration
    assert run_cli("compress", str(reference.onnx), "--recipe", str(tmp_path / "missing.json"), "--output", str(tmp_path), url=server_url).returncode == 2


def test_cli_preset_runs_a_prune_distill_quantize_recipe(server_url, reference, tmp_path):
    listed = run_cli("presets", "--json", url=server_url)
    assert listed.returncode == 0 and "edge-int8" in {p["name"] for p in json.loads(listed.stdout)}
    out = tmp_path / "out"
    result = run_cli("compress", str(reference.onnx), "--preset", "edge-int8", "--train", str(reference.train_npz),
                     "--calibration", str(reference.calib_npz), "--eval", str(reference.eval_npz), "--output", str(out), "--json",
                     url=server_url)
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)["job"]
    assert job["preset"] == "edge-int8" and [s["type"] for s in job["steps"]] == ["prune", "distill", "quantize"]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["provenance"]["preset"] == "edge-int8" and len(recipe["steps"]) == 3
    assert run_cli("compress", str(reference.onnx), "--preset", "int8", "--method", "fp16", "--output", str(tmp_path),
                   url=server_url).returncode == 2
