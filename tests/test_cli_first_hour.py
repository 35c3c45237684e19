"""What a new user meets in the CLI's first hour: the same file is not uploaded twice, downloads
create their folder, --split, errors that name flags (JSON with --json), exit codes that fit the
cause, a redrawn progress line without leftovers, and a loud warning when quality falls."""

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from modelpress import Client
from modelpress.client import ProgressBar
from tests.processes import free_port
from tests.stack import embedded_server
from tests.test_client_cli import run_cli


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    with embedded_server(tmp_path_factory.mktemp("first-hour") / "data") as (url, _):
        yield url


def test_compress_reuses_the_uploaded_model_and_split_works(server_url, reference, tmp_path):
    runs = [run_cli("compress", str(reference.onnx), "--split", str(reference.eval_npz), "--method", "dynamic_int8",
                    "--output", str(tmp_path / f"out{i}"), "--json", url=server_url) for i in range(2)]
    jobs = []
    for run in runs:
        assert run.returncode == 0, run.stderr
        jobs.append(json.loads(run.stdout)["job"])
    assert jobs[0]["model_id"] == jobs[1]["model_id"]
    assert jobs[0]["data"]["split"]["eval_fraction"] == 0.2
    with Client(server_url) as client:
        same = [m for m in client.models() if m.id == jobs[0]["model_id"]]
        assert len(same) == 1 and sum(1 for m in client.models() if m.sha256 == same[0].sha256) == 1


def test_download_to_a_missing_folder_creates_it(server_url, reference, tmp_path):
    with Client(server_url) as client:
        job = client.submit(client.model_for_file(reference.onnx), [{"type": "quantize", "params": {"method": "dynamic_int8"}}],
                            data={"eval": client.upload_dataset(reference.eval_npz)})
        job.wait(timeout=600, progress=False)
        path = job.download("model.onnx", to=str(tmp_path / "out") + "/")
    assert path == tmp_path / "out" / "model.onnx" and path.is_file()


def test_errors_name_the_flags_and_json_errors_are_json(server_url, reference, tmp_path):
    run = run_cli("compress", str(reference.onnx), "--method", "static_int8", "--eval", str(reference.eval_npz),
                  "--output", str(tmp_path), url=server_url)
    assert run.returncode == 2
    assert "set --calibration" in run.stderr and "--split" in run.stderr and "data." not in run.stderr, run.stderr
    run = run_cli("compress", str(reference.onnx), "--calibration", str(reference.wrong_size_npz), "--output", str(tmp_path),
                  "--json", url=server_url)
    error = json.loads(run.stdout)["error"]
    assert run.returncode == error["exit_code"] == 2 and error["code"] == "dataset_shape_mismatch"
    run = run_cli("jobs", "show", "job_missing", "--json", url=server_url)
    assert run.returncode == 2 and json.loads(run.stdout)["error"]["code"] == "job_not_found"


class _WebPage(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"<html><body><h1>Welcome to nginx!</h1>" + b"x" * 2000 + b"</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def web_page_url():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _WebPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_exit_codes_fit_the_cause(web_page_url, tmp_path):
    no_scheme = run_cli("jobs", "list", url="127.0.0.1:8000")
    assert no_scheme.returncode == 2 and "http://127.0.0.1:8000" in no_scheme.stderr
    not_modelpress = run_cli("jobs", "list", url=web_page_url)
    assert not_modelpress.returncode == 4, not_modelpress.stderr
    assert "not the modelpress API" in not_modelpress.stderr and "<html" not in not_modelpress.stderr


def test_a_prune_that_loses_most_accuracy_fails_the_floor_and_is_loud_without_it(server_url, reference, tmp_path):
    step = json.dumps({"type": "prune", "params": {"method": "channels", "ratio": 0.9, "round_to": 1}})
    args = ("compress", str(reference.onnx), "--step", step, "--eval", str(reference.eval_npz), "--output", str(tmp_path))
    floored = run_cli(*args, url=server_url)
    assert floored.returncode == 3, floored.stderr
    assert "fidelity_floor_not_met" in floored.stdout and "FLOOR     top1_agreement" in floored.stdout, floored.stdout
    assert (tmp_path / "model.onnx").exists()  # the broken model is still downloaded, to look at
    run = run_cli(*args, "--floor", "off", url=server_url)
    assert run.returncode == 0, run.stderr
    assert "WARNING   top-1 fell" in run.stdout and '"finetune"' in run.stdout and "FLOOR" not in run.stdout, run.stdout
    own = run_cli(*args, "--floor", '{"top1_agreement": 0.0}', "--task", "classification", "--max-accuracy-drop", "5", url=server_url)
    assert own.returncode == 3 and "more than --max-accuracy-drop 5" in own.stdout and "FLOOR" not in own.stdout
    with Client(server_url) as client:
        job = client.job(next(iter(client.jobs(limit=1))).id)
    assert job.raw["task"]["type"] == "classification" and job.metrics["comparison"]["task"]["inferred"] is False
    assert job.metrics["floor"] == {**job.metrics["floor"], "mode": "custom", "met": True}
    assert run_cli(*args, "--floor", "[1]", url=server_url).returncode == 2  # neither default, off nor bounds


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_progress_line_is_cleared_to_the_terminal_width(monkeypatch):
    monkeypatch.setattr("sys.stdout", _Terminal())
    monkeypatch.setenv("COLUMNS", "100")
    stream = _Terminal()
    bar = ProgressBar(stream)
    for status, stage, progress in (("running", "1:quantize:try uint8 activations on a long stage name", 0.5), ("succeeded", "succeeded", 1.0)):
        bar(SimpleNamespace(status=status, stage=stage, progress=progress))
    last = stream.getvalue().split("\r")[-1]
    assert len(last) == 99 and last.rstrip().endswith("succeeded: succeeded") and "activations" not in last
