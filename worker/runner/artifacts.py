"""What a finished job leaves: metrics.json, report.html, recipe.json, beside the model and the
step's extra files; each uploaded under the delivery's token."""

import hashlib
import json
import math
from pathlib import Path

from service.jobs import runner_api
from service.jobs.runner_api import Heartbeat
from service.storage import tenant_prefix
from worker.engine.errors import JobCancelled, JobSuperseded
from worker.engine.report import render as render_report
from worker.recipe import decided_steps

METRICS_SCHEMA_VERSION = 1


def finite(value):
    """Metrics as strict JSON: a NaN or infinite number (a model that outputs NaN) becomes null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_and_store(job, token: str, deps, work: Path, metrics: dict, model: Path, extra: dict[str, Path]) -> None:
    metrics_file = work / "metrics.json"
    metrics_file.write_text(json.dumps(metrics, indent=2, allow_nan=False))
    report_file = work / "report.html"
    # The drawn eval images go inside the report (data URIs): one self-contained file.
    pictures = {entry["file"]: (work / entry["file"]).read_bytes() for entry in (metrics.get("examples") or {}).get("images", [])}
    report_file.write_text(render_report(metrics, job_id=job.id, pictures=pictures))
    # A complete POST /v1/jobs body, every default filled in and every measured choice decided:
    # posting it back builds the same model (worker/recipe.py).
    steps_decided, decisions = decided_steps(job.spec["steps"], metrics["steps"])
    recipe_file = work / "recipe.json"
    # The task the run judged the model as (given or inferred) and the floor it applied: a replay
    # is judged alike, even on a server whose inference or defaults changed.
    recipe_file.write_text(json.dumps({
        "model_id": job.model_id, "steps": steps_decided, "data": job.spec["data"],
        "task": metrics["comparison"]["task"]["task"], "floor": job.spec.get("floor", "default"),
        "provenance": {"job_id": job.id, "preset": job.spec.get("preset"), "versions": metrics["environment"]["versions"],
                       "decided": decisions},
    }, indent=2))
    for name, path in (("model.onnx", model), *extra.items(), ("metrics.json", metrics_file),
                       ("report.html", report_file), ("recipe.json", recipe_file)):
        store_artifact(deps, job.id, token, name, path, tenant_id=job.tenant_id)


def store_artifact(deps, job_id: str, token: str, name: str, path: Path, *, tenant_id: str) -> None:
    """Each delivery writes under its own token, and the row is switched to the new object only
    after the upload completed: a delivery that dies half-way leaves no half-written artifact, and a
    cancelled or superseded one leaves no object either."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    key = f"{tenant_prefix(tenant_id)}jobs/{job_id}/{token}/{name}"
    deps.store.put_file(key, path)
    verdict = runner_api.record_artifact(sessions=deps.session_factory, job_id=job_id, token=token, name=name,
                                         size_bytes=path.stat().st_size, sha256=digest.hexdigest(), storage_key=key)
    if verdict is not Heartbeat.CONTINUE:
        deps.store.delete(key)
        raise JobCancelled() if verdict is Heartbeat.CANCEL else JobSuperseded()
