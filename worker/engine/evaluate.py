"""Measure a model and compare it with another, on the same data and the same settings.

Everything here is measured: file size on disk, ONNX Runtime latency after warm-up with pinned
threads, outputs on the evaluation data. Nothing is estimated.
"""

import importlib.metadata
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from worker.engine.data import ImageSet
from worker.engine import stoppable
from worker.engine.device import gpu_name, pick_device
from worker.engine.fidelity import accuracy, fidelity
from worker.engine.graph_stats import graph_stats
from modelpress.spec.errors import EngineError
from modelpress.spec.labels import MAX_EVAL_SAMPLES

LARGE_BATCH = 32


@dataclass
class RunSettings:
    threads: int = 1
    max_eval_samples: int = MAX_EVAL_SAMPLES
    warmup_runs: int = 3
    min_timed_runs: int = 10
    max_timed_runs: int = 200
    time_budget_s: float = 1.5  # per batch size, after warm-up


def open_session(path: Path | bytes, threads: int) -> ort.InferenceSession:
    """A session on a model file, or on a serialized model (`bytes`)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EngineError("model_not_runnable", f"ONNX Runtime cannot load the model: {str(exc)[:1000]}") from exc


def fixed_batch(session: ort.InferenceSession) -> int | None:
    """The batch size the model insists on, or None if the batch is dynamic."""
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


def run_outputs(session: ort.InferenceSession, images: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    name = session.get_inputs()[0].name
    fixed = fixed_batch(session)
    batch = fixed or batch
    # A fixed-batch model cannot take a short last batch; those few samples are left out.
    usable = len(images) - len(images) % batch if fixed else len(images)
    chunks = [stoppable.run(session, {name: images[start : start + batch]}) for start in range(0, usable, batch)]
    if not chunks:
        raise EngineError("dataset_too_small", f"the model needs batches of {batch} images; the data has {len(images)}")
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def latency(session: ort.InferenceSession, sample: np.ndarray, batch: int, settings: RunSettings) -> dict | None:
    fixed = fixed_batch(session)
    if fixed is not None and fixed != batch:
        return None
    name = session.get_inputs()[0].name
    inputs = np.ascontiguousarray(np.repeat(sample[:1], batch, axis=0))
    for _ in range(settings.warmup_runs):
        stoppable.run(session, {name: inputs})
    timings = []
    started = time.perf_counter()
    while len(timings) < settings.max_timed_runs and (
        len(timings) < settings.min_timed_runs or time.perf_counter() - started < settings.time_budget_s
    ):
        t0 = time.perf_counter()
        stoppable.run(session, {name: inputs})
        timings.append(time.perf_counter() - t0)
    ms = np.array(timings) * 1000.0
    p50 = float(np.percentile(ms, 50))
    return {
        "batch": batch, "runs": len(timings),
        "p50_ms": round(p50, 4), "p95_ms": round(float(np.percentile(ms, 95)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "throughput_per_s": round(batch * 1000.0 / p50, 2),
    }


def measure(path: Path, data: ImageSet, settings: RunSettings) -> tuple[dict, list[np.ndarray]]:
    """Size, latency at batch 1 and LARGE_BATCH, and the model's outputs on the data."""
    session = open_session(path, settings.threads)
    data = data.head(settings.max_eval_samples)
    report = {
        "size_bytes": path.stat().st_size,
        **graph_stats(path),
        "latency": {
            "batch_1": latency(session, data.images, 1, settings),
            f"batch_{LARGE_BATCH}": latency(session, data.images, LARGE_BATCH, settings),
            "threads": settings.threads,
        },
    }
    outputs = run_outputs(session, data.images)
    if data.labels is not None:
        report["accuracy"] = accuracy(outputs[0], data.labels[: len(outputs[0])])
    return report, outputs


def environment(threads: int) -> dict:
    flags = set()
    model_name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    versions = {}
    for package in ("onnxruntime", "onnx", "torch", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": model_name, "cpu_count": os.cpu_count(),
        "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}), "amx": "amx_int8" in flags,
        "avx512": "avx512f" in flags, "threads": threads, "torch_device": pick_device(), "gpu": gpu_name(),
        "versions": versions,
    }


def quality(path: Path, data: ImageSet | None, reference: list[np.ndarray] | None = None, max_samples: int = 2000) -> dict | None:
    """Accuracy (labelled data) and agreement with a reference model's outputs, without latency:
    what a step reports between its own stages (right after pruning, after recovery)."""
    if data is None:
        return None
    data = data.head(max_samples)
    outputs = run_outputs(open_session(path, threads=1), data.images)
    result: dict = {"samples": len(outputs[0])}
    if data.labels is not None and (top := accuracy(outputs[0], data.labels[: len(outputs[0])])):
        result["top1"] = top["top1"]
    if reference is not None:
        first = fidelity(reference, outputs)[0]
        result["cosine_mean"] = round(first["cosine_mean"], 6)
        if "top1_agreement" in first:
            result["top1_agreement"] = first["top1_agreement"]
    return result
