"""The API under load, beside bare baselines, every server started here on loopback:

- requests/s, p50 and p99 of GET /v1/jobs/{id}, GET /v1/jobs?limit=20, POST /v1/jobs and /healthz
  with `wrk` at 50 and 200 connections, on the embedded default (SQLite, one process) and on
  PostgreSQL + Redis (MODELPRESS_API_WORKERS processes), beside a bare FastAPI app with as many
  processes;
- a 1 GB ONNX upload to the embedded API beside a bare ASGI sink, and the API's RSS growth during it;
- job throughput of trivial jobs (a tiny model, static int8) with 1 and 2 Celery workers.

    python -m bench.api                       # ~5 minutes; --seconds 5 per wrk run
    python -m bench.api --skip upload,jobs    # reads only

Needs `wrk` (installed with apt-get if missing), PostgreSQL at BENCH_PG (default
postgresql://postgres@127.0.0.1:5432/test; a fresh database is made and dropped) and Redis at
BENCH_REDIS (default redis://127.0.0.1:6379/14, flushed: never the database a test run is
using, or each takes the other's job messages). Prints a markdown table.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np

from tests.processes import Process, free_port, wait_for, wait_http

PG_ADMIN = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/14")
SEEDED_JOBS = 50
GB = 10**9


def ensure_wrk() -> str:
    if shutil.which("wrk") is None:
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, capture_output=True, timeout=300)
    return shutil.which("wrk")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(match) -> float:
    parsed = match and re.fullmatch(r"([\d.]+)(us|ms|s)", match.group(1))
    return float(parsed.group(1)) * _UNITS[parsed.group(2)] if parsed else float("nan")  # no request answered


def wrk(url: str, connections: int, seconds: int, script: Path | None = None) -> dict:
    args = [shutil.which("wrk"), "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    if script is not None:
        args += ["-s", str(script)]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=seconds + 30).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        # Anchored: the Req/Sec line's "+/- Stdev" column (e.g. "67.50%") must not match.
        "p50": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M)),
        "p99": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M)),
        "errors": (int(errors.group(1)) if errors else 0),
        "socket_errors": socket_errors.group(1).strip() if socket_errors else "",
    }


# --- fixtures: a tiny model and dataset, seeded jobs, a 1 GB model ----------------------------------

def tiny_model(work: Path) -> tuple[Path, Path]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    onnx_path = work / "tiny.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(onnx_path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    rng = np.random.default_rng(0)
    data_path = work / "tiny.npz"
    np.savez(data_path, images=rng.integers(0, 255, (32, 1, 8, 8), dtype=np.uint8), labels=rng.integers(0, 10, 32))
    return onnx_path, data_path


def large_model(path: Path, size_bytes: int = GB) -> Path:
    """One MatMul whose weight is `size_bytes` of float32 zeros: a valid ONNX file of that size."""
    import onnx
    from onnx import TensorProto, helper

    rows = 16384
    columns = size_bytes // (4 * rows)
    weight = helper.make_tensor("weight", TensorProto.FLOAT, [rows, columns], np.zeros(rows * columns, np.float32).tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "weight"], ["output"])], "large",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, columns])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def _metrics_like_a_real_job() -> dict:
    """The shape docs/METRICS.md describes, ~6 KB like a quantized ResNet's (40 layers)."""
    latency = {"p50_ms": 0.81, "p95_ms": 0.9, "p99_ms": 1.1, "throughput_per_s": 1234.5, "runs": 200}
    measurement = {"size_bytes": 1234567, "parameters": 300000, "nonzero_parameters": 299000, "sparsity": 0.003,
                   "macs": 41000000, "latency": {"batch_1": latency, "batch_32": latency, "threads": 1},
                   "accuracy": {"top1": 0.91, "top5": 0.99, "samples": 360}}
    return {
        "schema_version": 1, "model_id": "mdl_bench", "model_format": "onnx", "eval_dataset": "ds_bench", "eval_samples": 360,
        "original": measurement, "compressed": {**measurement, "size_bytes": 339000},
        "comparison": {"size_ratio": 3.64, "speedup_batch_1": 2.73, "speedup_batch_32": 2.96, "accuracy_drop": 0.003,
                       "fidelity": [{"output": 0, "shape": [None, 10], "cosine_mean": 0.999, "cosine_min": 0.98,
                                     "max_abs_error": 0.2, "mean_abs_error": 0.01, "top1_agreement": 0.99, "kl_softmax": 0.001}]},
        "layers": [{"layer": f"/stages/stages.{i}/conv{i % 3}/Conv", "op": "Conv", "tensor": f"/stages/stages.{i}/conv/Conv_output_0",
                    "sqnr_db": 30.0 + i / 10} for i in range(40)],
        "steps": [{"type": "quantize", "size_bytes": 339000, "method": "static_int8", "calibration_samples": 256,
                   "int8_compute_nodes": 14, "float_compute_nodes": 0}],
        "environment": {"cpu": "bench", "cpu_count": os.cpu_count(), "threads": 1, "torch_device": "cpu"},
    }


def seed_finished_jobs(database_url: str, model_id: str, dataset_id: str) -> str:
    """SEEDED_JOBS succeeded jobs, written straight to the database (running them would take
    minutes and load the CPU the bench measures on). Returns one job id."""
    from service.db import make_engine, make_session_factory, utcnow
    from service.jobs.service import headline_of
    from service.jobs.tables import JobRow

    metrics = _metrics_like_a_real_job()
    spec = {"steps": [{"type": "quantize", "params": {"method": "static_int8"}}], "data": {"calibration": dataset_id}}
    engine = make_engine(database_url)
    now = utcnow()
    with make_session_factory(engine)() as session:
        for i in range(SEEDED_JOBS):
            created = now - timedelta(seconds=SEEDED_JOBS - i)
            session.add(JobRow(id=f"job_bench{i:04d}{uuid.uuid4().hex[:8]}", tenant_id="default", model_id=model_id,
                               status="succeeded", stage="succeeded", progress=1.0, spec=spec, queue="cpu", metrics=metrics,
                               headline=headline_of(metrics), attempts=1, created_at=created, started_at=created,
                               finished_at=created))
        session.commit()
        job_id = session.query(JobRow.id).order_by(JobRow.created_at.desc()).first()[0]
    engine.dispose()
    return job_id


def upload(http: httpx.Client, path: Path, route: str) -> dict:
    with open(path, "rb") as handle:
        response = http.post(route, files={"file": (path.name, handle)})
    assert response.status_code in (200, 201), response.text[:500]
    return response.json()


# --- servers -----------------------------------------------------------------------------------------

@contextmanager
def server(name: str, args: list[str], env: dict, logs: Path, health: str = "/healthz"):
    port = free_port()
    process = Process(name, args, {**env, "PORT": str(port), "HOST": "127.0.0.1"}, logs)
    try:
        wait_http(f"http://127.0.0.1:{port}{health}", process, timeout=120)
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.stop()


def uvicorn_app(target: str, workers: int, logs: Path, name: str):
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
            "--log-level", "warning", "--no-access-log"]
    return _started(Process(name, args, {}, logs), f"http://127.0.0.1:{port}")


@contextmanager
def _started(process: Process, url: str):
    try:
        wait_http(f"{url}/healthz", process, timeout=60)
        yield url, process
    finally:
        process.stop()


@contextmanager
def postgres_database():
    import psycopg

    name = f"modelpress_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+psycopg://')}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush_redis() -> None:
    import redis

    redis.Redis.from_url(REDIS).flushdb()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# --- measurements ------------------------------------------------------------------------------------

def measure_reads(rows: list, label: str, base: str, job_id: str, post_script: Path, args) -> None:
    reads = [("GET /v1/jobs/{id}", f"{base}/v1/jobs/{job_id}", None), ("GET /v1/jobs?limit=20", f"{base}/v1/jobs?limit=20", None),
             ("/healthz", f"{base}/healthz", None)]
    # Submissions last, at every connection count: on the embedded default each one is a job its
    # worker thread then runs, which would load the machine under the reads measured after it.
    runs = [(c, *route) for c in args.connections for route in reads]
    runs += [(c, "POST /v1/jobs", f"{base}/v1/jobs", post_script) for c in args.connections]
    for connections, route, url, script in runs:
        rows.append({"server": label, "route": route, "connections": connections, **wrk(url, connections, args.seconds, script)})
        print(_row_line(rows[-1]), flush=True)


def measure_bare(rows: list, workers: int, logs: Path, args) -> None:
    with uvicorn_app("bench.api_bare:app", workers, logs, f"bare-{workers}") as (base, _):
        for connections in args.connections:
            for route, path in (("bare GET job-like JSON", "/job"), ("bare /healthz", "/healthz")):
                rows.append({"server": f"bare FastAPI ({workers} proc)", "route": route, "connections": connections,
                             **wrk(f"{base}{path}", connections, args.seconds)})
                print(_row_line(rows[-1]), flush=True)


def _post_script(work: Path, model_id: str, dataset_id: str) -> Path:
    script = work / f"post-{model_id}.lua"
    body = f'{{"model_id": "{model_id}", "steps": [{{"type": "quantize"}}], "data": {{"calibration": "{dataset_id}"}}}}'
    script.write_text(f"wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n")
    return script


def _row_line(row: dict) -> str:
    extra = f"  non-2xx {row['errors']}" if row["errors"] else ""
    extra += f"  socket errors: {row['socket_errors']}" if row["socket_errors"] else ""
    return f"{row['server']:<28} {row['route']:<24} c={row['connections']:<4} {row['rps']:>8.0f} req/s  p50 {row['p50']:>8.2f} ms  p99 {row['p99']:>8.2f} ms{extra}"


def reads_embedded(rows: list, work: Path, tiny: tuple[Path, Path], args) -> None:
    data_dir = work / "embedded"
    with server("api-embedded", [sys.executable, "-m", "service"], {"MODELPRESS_DATA_DIR": str(data_dir), "LOG_LEVEL": "WARNING"},
                work, health="/readyz") as (base, _), httpx.Client(base_url=base, timeout=60) as http:
        model, dataset = upload(http, tiny[0], "/v1/models"), upload(http, tiny[1], "/v1/datasets")
        job_id = seed_finished_jobs(f"sqlite:///{data_dir / 'modelpress.db'}", model["id"], dataset["id"])
        measure_reads(rows, "API embedded (SQLite)", base, job_id, _post_script(work, model["id"], dataset["id"]), args)


def reads_postgres(rows: list, work: Path, tiny: tuple[Path, Path], args) -> None:
    from service.config import Settings
    from service.migrate import upgrade

    flush_redis()
    with postgres_database() as database_url:
        upgrade(database_url)
        env = {"DATABASE_URL": database_url, "BROKER_URL": REDIS, "STORAGE_URL": str(work / "pg-objects"),
               "MODELPRESS_DATA_DIR": str(work / "pg-data"), "LOG_LEVEL": "WARNING"}
        workers = Settings(broker_url=REDIS).effective_api_workers
        with server("api-postgres", [sys.executable, "-m", "service"], env, work) as (base, _), \
                httpx.Client(base_url=base, timeout=60) as http:
            model, dataset = upload(http, tiny[0], "/v1/models"), upload(http, tiny[1], "/v1/datasets")
            job_id = seed_finished_jobs(database_url, model["id"], dataset["id"])
            measure_reads(rows, f"API PostgreSQL ({workers} proc)", base, job_id, _post_script(work, model["id"], dataset["id"]), args)
    flush_redis()
    return workers


def uploads(work: Path, size_bytes: int, tiny_model_path: Path) -> list[dict]:
    model = large_model(work / "large.onnx", size_bytes)
    size = model.stat().st_size
    results = []
    with uvicorn_app("bench.api_bare:sink", 1, work, "sink") as (base, _), httpx.Client(base_url=base, timeout=600) as http:
        start = time.monotonic()
        received = upload(http, model, "/upload")["received"]
        assert received >= size
        results.append({"target": "bare ASGI sink", "seconds": time.monotonic() - start, "growth": None})
    with server("api-upload", [sys.executable, "-m", "service"], {"MODELPRESS_DATA_DIR": str(work / "upload-data"),
                                                                  "LOG_LEVEL": "WARNING"}, work, health="/readyz") as (base, api), \
            httpx.Client(base_url=base, timeout=600) as http:
        upload(http, tiny_model_path, "/v1/models")  # the first upload imports onnx: not the upload's growth
        before = peak = rss_bytes(api.proc.pid)
        done = threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_bytes(api.proc.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.monotonic()
        try:
            upload(http, model, "/v1/models")
        finally:
            done.set()
            sampler.join()
        results.append({"target": "API POST /v1/models (embedded)", "seconds": time.monotonic() - start, "growth": peak - before})
    model.unlink()
    for result in results:
        result["mb_s"] = size / result["seconds"] / 1e6
        growth = "" if result["growth"] is None else f", RSS growth {result['growth'] / 2**20:.0f} MiB"
        print(f"upload {size / GB:.2f} GB to {result['target']}: {result['mb_s']:.0f} MB/s ({result['seconds']:.1f} s){growth}", flush=True)
    return results


def job_throughput(work: Path, tiny: tuple[Path, Path], worker_counts: list[int], jobs: int) -> list[dict]:
    from service.migrate import upgrade

    results = []
    for count in worker_counts:
        flush_redis()
        with postgres_database() as database_url:
            upgrade(database_url)
            env = {"DATABASE_URL": database_url, "BROKER_URL": REDIS, "STORAGE_URL": str(work / f"jobs-{count}-objects"),
                   "MODELPRESS_DATA_DIR": str(work / f"jobs-{count}-data"), "LOG_LEVEL": "WARNING"}
            workers = [Process(f"celery-{count}-{i}", [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "cpu",
                                                        "--pool", "solo", "--loglevel", "INFO", "-n", f"bench{i}@%h"], env, work)
                       for i in range(count)]
            try:
                for worker in workers:
                    wait_for(lambda w=worker: "ready" in w.output() or not w.alive(), 120, "celery worker")
                with server(f"api-jobs-{count}", [sys.executable, "-m", "service"], env, work) as (base, _), \
                        httpx.Client(base_url=base, timeout=60) as http:
                    model, dataset = upload(http, tiny[0], "/v1/models"), upload(http, tiny[1], "/v1/datasets")
                    body = {"model_id": model["id"], "steps": [{"type": "quantize"}], "data": {"calibration": dataset["id"]}}

                    def run(n: int) -> float:
                        start = time.monotonic()
                        ids = [http.post("/v1/jobs", json=body).json()["id"] for _ in range(n)]
                        for job_id in ids:
                            wait_for(lambda j=job_id: http.get(f"/v1/jobs/{j}").json()["status"] in ("succeeded", "failed"), 600, "job")
                        failed = [j for j in ids if http.get(f"/v1/jobs/{j}").json()["status"] != "succeeded"]
                        assert not failed, http.get(f"/v1/jobs/{failed[0]}").json()["error"]
                        return time.monotonic() - start

                    run(count)  # warm-up: each worker imports its engine on its first job
                    seconds = run(jobs)
                    results.append({"workers": count, "jobs": jobs, "seconds": seconds, "per_s": jobs / seconds})
                    print(f"{count} Celery worker(s): {jobs} jobs in {seconds:.1f} s = {jobs / seconds:.2f} jobs/s", flush=True)
            finally:
                for worker in workers:
                    worker.stop()
    flush_redis()
    return results


def report(rows: list, upload_results: list, job_results: list, args) -> None:
    print(f"\n{_cpu()}, {os.cpu_count()} cores; wrk -t1, {args.seconds} s per run; shared machine: numbers are noisy\n")
    print("| server | route | conns | req/s | p50 ms | p99 ms | non-2xx |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['server']} | {row['route']} | {row['connections']} | {row['rps']:.0f} | {row['p50']:.2f} | {row['p99']:.2f} | {row['errors']} |")
    if upload_results:
        print(f"\n| upload {args.upload_gb:g} GB | MB/s | seconds | API RSS growth |\n|---|---:|---:|---:|")
        for r in upload_results:
            growth = "" if r["growth"] is None else f"{r['growth'] / 2**20:.0f} MiB"
            print(f"| {r['target']} | {r['mb_s']:.0f} | {r['seconds']:.1f} | {growth} |")
    if job_results:
        one = job_results[0]["per_s"]
        print("\n| Celery workers | jobs | seconds | jobs/s | vs 1 worker |\n|---:|---:|---:|---:|---:|")
        for r in job_results:
            print(f"| {r['workers']} | {r['jobs']} | {r['seconds']:.1f} | {r['per_s']:.2f} | {r['per_s'] / one:.2f}x |")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--connections", type=lambda s: [int(c) for c in s.split(",")], default=[50, 200])
    parser.add_argument("--upload-gb", type=float, default=1.0, help="size of the uploaded model")
    parser.add_argument("--jobs", type=int, default=12, help="trivial jobs per throughput run")
    parser.add_argument("--skip", default="", help="comma-separated: embedded, postgres, upload, jobs")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    ensure_wrk()
    rows, upload_results, job_results = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        work = Path(tmp)
        tiny = tiny_model(work)
        if "embedded" not in skip:
            measure_bare(rows, 1, work, args)
            reads_embedded(rows, work, tiny, args)
        if "postgres" not in skip:
            from service.config import Settings

            workers = Settings(broker_url=REDIS).effective_api_workers
            if workers != 1 or "embedded" in skip:
                measure_bare(rows, workers, work, args)
            reads_postgres(rows, work, tiny, args)
        if "upload" not in skip:
            upload_results = uploads(work, int(args.upload_gb * GB), tiny[0])
        if "jobs" not in skip:
            job_results = job_throughput(work, tiny, [1, 2], args.jobs)
    report(rows, upload_results, job_results, args)


if __name__ == "__main__":
    main()
