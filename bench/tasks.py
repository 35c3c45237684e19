"""Task benchmark: int8 quantization of the reference task models (bench/task_models.py: detector,
CTC recognizer, segmenter, embedder) by plain ONNX Runtime `quantize_static` (defaults, and the best
of a few settings), by NNCF's `nncf.quantize` (ONNX backend), and by modelpress's default static
int8 job through the real service (embedded app). Per result: the task metric against labels, the
label-free task fidelity against the fp32 original (the floor's metrics), size, ORT speed-up at
batch 1 and 32 (1 thread), quantization wall time and whether it meets the default floor.

    .venv/bin/python -m bench.tasks [--tiny] [--only detector] [--readme]
"""

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.quantize import ort_static
from bench.task_models import NAMES, TaskModel, build
from modelpress.spec.configs.task import parse_task
from modelpress.spec.floor import DEFAULT_FLOORS
from worker.engine import evaluate
from worker.engine.data import Targets, load_dataset
from worker.engine.tasks import ctc, detection, labelled, segmentation
from worker.engine.tasks.measure import task_fidelity
from worker.engine.tasks.scored import truth_sequences

LABELLED_METRIC = {"detection": "map50", "ctc": "exact_match", "segmentation": "miou", "embedding": "verification_accuracy"}
METRIC_NAMES = {"map50": "mAP@0.5", "exact_match": "exact match", "miou": "mIoU", "verification_accuracy": "verification acc."}


def labelled_scores(task: dict, output: np.ndarray, targets: Targets) -> dict:
    """The task metric against the labels, with worker.engine.tasks.labelled's functions. Detections
    go through the task's class-wise NMS first (`nms_iou`, 0.7 as Ultralytics' val), as the job does."""
    parsed = parse_task(task)
    if parsed.type == "detection":
        truth = [(targets.boxes[targets.box_images == i], targets.box_classes[targets.box_images == i]) for i in range(len(output))]
        predicted = detection.decode_yolo(output, box_format=parsed.decoder.box_format, confidence=detection.MAP_CONFIDENCE,
                                          nms_iou=parsed.nms_iou)
        return labelled.detection_map(truth, predicted)
    if parsed.type == "segmentation":
        return labelled.segmentation_scores(targets.masks, segmentation.masks(output, parsed.layout))
    if parsed.type == "ctc":
        return labelled.ctc_scores(truth_sequences(parsed, targets), ctc.greedy_decode(output, blank=parsed.blank, layout=parsed.layout))
    return labelled.verification_accuracy(output, targets.pairs, targets.pair_same)


@dataclass
class Result:
    model: str
    variant: str
    path: Path
    seconds: float | None  # quantization wall time
    note: str = ""
    figures: dict = field(default_factory=dict)


def measure(result: Result, task: dict, images: np.ndarray, targets: Targets, reference: list[np.ndarray] | None,
            settings: evaluate.RunSettings) -> list[np.ndarray]:
    session = evaluate.open_session(result.path, settings.threads)
    outputs = evaluate.run_outputs(session, images)
    result.figures = {
        "size_kb": result.path.stat().st_size / 1024,
        "labelled": labelled_scores(task, outputs[0].astype(np.float64), targets),
        "latency": {batch: evaluate.latency(session, images, batch, settings)["p50_ms"] for batch in (1, evaluate.LARGE_BATCH)},
    }
    if reference is not None:
        result.figures["task"] = task_fidelity(reference, outputs, task)
    return outputs


# --- the quantizers --------------------------------------------------------------------------------

def ort_variants(fp32: Path, calibration: np.ndarray, work: Path) -> dict[str, tuple[Path, float]]:
    from onnxruntime.quantization import CalibrationMethod, QuantType

    settings = {
        "defaults": {},
        "per-channel S8S8": {"per_channel": True},
        "per-channel U8S8": {"per_channel": True, "activation_type": QuantType.QUInt8},
        "per-channel S8S8 entropy": {"per_channel": True, "calibrate_method": CalibrationMethod.Entropy},
    }
    made = {}
    for label, options in settings.items():
        started = time.perf_counter()
        path = ort_static(fp32, calibration, work / f"ort-{label.replace(' ', '-')}.onnx", **options)
        made[label] = (path, time.perf_counter() - started)
    return made


def nncf_quantize(fp32: Path, calibration: np.ndarray, out: Path) -> tuple[Path, float]:
    import nncf
    import onnx

    started = time.perf_counter()
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))], lambda batch: {"input": batch})
    quantized = nncf.quantize(onnx.load(str(fp32)), dataset, subset_size=len(calibration))
    onnx.save(quantized, str(out))
    return out, time.perf_counter() - started


def modelpress_job(http, model: TaskModel, out: Path) -> tuple[Path, float, str, dict]:
    """modelpress's default static int8 job through the API: (model, step seconds, status, metrics)."""
    uploaded = http.post("/v1/models", files={"file": (model.onnx.name, model.onnx.read_bytes())},
                         data={"task": json.dumps(model.task)})
    assert uploaded.status_code == 201, uploaded.text
    datasets = {}
    for role, path in (("eval", model.eval_npz), ("calibration", model.calib_npz)):
        response = http.post("/v1/datasets", files={"file": (path.name, path.read_bytes())})
        assert response.status_code == 201, response.text
        datasets[role] = response.json()["id"]
    response = http.post("/v1/jobs", json={"model_id": uploaded.json()["id"], "data": datasets,
                                           "steps": [{"type": "quantize", "params": {"method": "static_int8"}}]})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 900
    while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job {job_id} did not finish"
        time.sleep(0.2)
    status = job["status"] + (f" ({job['error']['code']})" if job["error"] else "")
    artifact = http.get(f"/v1/jobs/{job_id}/artifacts/model.onnx")
    assert artifact.status_code == 200, (status, job["error"])
    out.write_bytes(artifact.content)
    return out, job["metrics"]["steps"][0]["seconds"], status, job["metrics"]


# --- the table -------------------------------------------------------------------------------------

def floor_text(task_type: str, task_result: dict | None) -> tuple[str, str]:
    """(the floor metrics as text, meets the default floor)."""
    if task_result is None:
        return "—", "—"
    fidelity = task_result.get("fidelity") or {}
    shown = ", ".join(f"{metric} {fidelity.get(metric, float('nan')):.4f}" for metric, _, _ in DEFAULT_FLOORS[task_type])
    return shown, "yes" if not task_result.get("floor_shortfalls") else "no"


def run_model(model: TaskModel, http, work: Path, settings: evaluate.RunSettings) -> list[Result]:
    eval_set = load_dataset(model.eval_npz, dataset_format="npz", layout="NCHW", preprocess=None, model_shape=None, role="eval")
    calibration = load_dataset(model.calib_npz, dataset_format="npz", layout="NCHW", preprocess=None, model_shape=None, role="calibration").images
    task, images, targets = model.task, eval_set.images, eval_set.targets
    original = Result(model.name, "fp32 original", model.onnx, None)
    reference = measure(original, task, images, targets, None, settings)
    results = [original]
    ort = ort_variants(model.onnx, calibration, work)
    ort_results = []
    for label, (path, seconds) in ort.items():
        result = Result(model.name, f"ORT quantize_static {label}", path, seconds)
        measure(result, task, images, targets, reference, settings)
        ort_results.append(result)
    primary = DEFAULT_FLOORS[parse_task(task).type][0][0]
    # The best ORT setting by fidelity (the defaults among them): meets the floor first, then its
    # first floor metric.
    best = max(ort_results, key=lambda r: (not r.figures["task"]["floor_shortfalls"], r.figures["task"]["fidelity"][primary]))
    results += [ort_results[0], Result(model.name, best.variant.replace("quantize_static", "best:"), best.path, best.seconds,
                                       figures=best.figures)]
    path, seconds = nncf_quantize(model.onnx, calibration, work / "nncf.onnx")
    results.append(Result(model.name, "NNCF quantize (ONNX)", path, seconds))
    measure(results[-1], task, images, targets, reference, settings)
    path, seconds, status, _ = modelpress_job(http, model, work / "modelpress.onnx")
    results.append(Result(model.name, "modelpress default job", path, seconds, note=status))
    measure(results[-1], task, images, targets, reference, settings)
    return results


def table(results: list[Result], tasks: dict[str, str]) -> str:
    lines = ["| model | variant | task metric (labels) | label-free fidelity (floor metrics) | size KB | speed-up b1 | speed-up b32 | quantize s | meets floor | job status |",
             "|---" * 10 + "|"]
    base = {}
    for r in results:
        task_type = tasks[r.model]
        metric = LABELLED_METRIC[task_type]
        if r.seconds is None:
            base[r.model] = r.figures["latency"]
        fidelity, meets = floor_text(task_type, r.figures.get("task"))
        speed = [base[r.model][b] / r.figures["latency"][b] for b in (1, evaluate.LARGE_BATCH)]
        lines.append(f"| {r.model} | {r.variant} | {METRIC_NAMES[metric]} {r.figures['labelled'][metric]:.4f} | {fidelity} | "
                     f"{r.figures['size_kb']:.0f} | {speed[0]:.2f} | {speed[1]:.2f} | "
                     f"{'—' if r.seconds is None else format(r.seconds, '.1f')} | {meets} | {r.note or '—'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="the tests' small models (seconds to train)")
    parser.add_argument("--only", choices=NAMES, action="append")
    parser.add_argument("--out", type=Path, default=Path("bench/out/task-models"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    import torch
    from fastapi.testclient import TestClient

    from service.config import Settings
    from worker.serve import create_app

    torch.set_num_threads(1)
    settings = evaluate.RunSettings(threads=args.threads, time_budget_s=1.0)
    size = "tiny" if args.tiny else "bench"
    models = [build(name, size, args.out) for name in args.only or NAMES]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as tmp, \
            TestClient(create_app(Settings(data_dir=Path(tmp) / "data")), raise_server_exceptions=False) as http:
        for model in models:
            work = Path(tmp) / model.name
            work.mkdir()
            results += run_model(model, http, work, settings)
            print(f"{model.name}: done", flush=True)
    tasks = {m.name: parse_task(m.task).type for m in models}
    print(table(results, tasks))
    data = {m.name: {k: (len(v) if k != "images" else list(v.shape)) for k, v in m.eval_data().items()} for m in models}
    env = evaluate.environment(args.threads)
    import importlib.metadata
    print(f"\n{size} models {data}; {env['cpu']} ({env['cpu_count']} cores), VNNI={env['vnni']}, {args.threads} thread(s), "
          f"onnxruntime {env['versions']['onnxruntime']}, nncf {importlib.metadata.version('nncf')}, torch {env['versions']['torch']}, "
          f"{time.strftime('%Y-%m-%d')}")
    if args.json:
        args.json.write_text(json.dumps([{"model": r.model, "variant": r.variant, "seconds": r.seconds, "note": r.note,
                                          "figures": r.figures} for r in results], default=str, indent=1))


if __name__ == "__main__":
    main()
