"""The README's first command, as a user runs it: `make run` serves the whole service on one
machine (SQLite, local folder, in-process worker), PORT and MODELPRESS_DATA_DIR honoured."""

from pathlib import Path

import httpx

from tests.jobs_flow import check_quantized_job
from tests.processes import Process, free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent


def test_make_run_serves_the_embedded_service(tmp_path, reference):
    port = free_port()
    data_dir = tmp_path / "mp-data"
    server = Process("make-run", ["make", "-s", "run"], {"PORT": str(port), "MODELPRESS_DATA_DIR": str(data_dir)}, tmp_path, cwd=ROOT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", server, timeout=180)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            ready = http.get("/readyz").json()
            assert ready["worker"] == "embedded" and set(ready["checks"].values()) == {"ok"}
            check_quantized_job(http, reference, tmp_path, reference.onnx)
    finally:
        server.stop()
    assert (data_dir / "modelpress.db").is_file()
    assert any((data_dir / "objects" / "tenants" / "default" / "jobs").rglob("model.onnx"))
