"""Engine outputs for fixed inputs, hashed: run it on two trees and compare the files to show a
refactor changed no artifact (qat, channel pruning with every importance, MAC target, iterative
finetune, magnitude + distill finetune, distill from_teacher; MobileNet and ResNet). Not a test.

    PYTHONPATH=<tree> OMP_NUM_THREADS=1 .venv/bin/python bench/identity.py out.json [filter]
"""
import hashlib, json, sys, tempfile
from pathlib import Path
import numpy as np, torch, onnx
from bench.reference import MobileNetSmall, ResNetSmall, export_all
from worker.engine.data import ImageSet
from worker.engine.registry import StepContext, handler_for
from modelpress.spec.configs import parse_step

def h(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]

out = {}
root = Path(tempfile.mkdtemp())
rng = np.random.default_rng(0)
images = rng.random((160, 1, 8, 8)).astype(np.float32)
labels = rng.integers(0, 10, len(images))
torch.manual_seed(0)
models = {"mobilenet": export_all(MobileNetSmall(widths=(8, 16, 16)).eval(), images, root, "m")["onnx"],
          "resnet": export_all(ResNetSmall(widths=(8, 16, 16)).eval(), images, root, "r")["onnx"]}
train, unl, ev = ImageSet(images, labels), ImageSet(images, None), ImageSet(images[:64], labels[:64])
cases = [
    ("quantize", {"method": "qat", "epochs": 2, "lr": 1e-3}, {"train": train}),
    ("quantize", {"method": "qat", "distill": True, "seed": 0}, {"train": train}),
    ("quantize", {"method": "qat", "distill": True}, {"train": unl}),
    ("quantize", {"method": "qat", "epochs": 1, "seed": 3, "batch_size": 32}, {"train": train}),
    ("prune", {"method": "channels", "ratio": 0.5, "round_to": 1}, {"eval": ev}),
    ("prune", {"method": "channels", "ratio": 0.5, "round_to": 4, "importance": "l1"}, {"eval": ev}),
    ("prune", {"method": "channels", "ratio": 0.5, "round_to": 1, "importance": "bn_scale"}, {"eval": ev}),
    ("prune", {"method": "channels", "ratio": 0.4, "round_to": 1, "importance": "taylor"}, {"calibration": train, "eval": ev}),
    ("prune", {"method": "channels", "target_macs": 0.5, "round_to": 2}, {"eval": ev}),
    ("prune", {"method": "channels", "ratio": 0.5, "round_to": 1, "iterations": 2, "finetune": {"epochs": 1}}, {"train": train, "eval": ev}),
    ("prune", {"method": "magnitude", "sparsity": 0.5, "min_weights": 10, "finetune": {"epochs": 1, "distill": True}}, {"train": train, "eval": ev}),
    ("distill", {"from_teacher": {"prune_channels": 0.5, "round_to": 1}, "epochs": 1}, {"train": train, "eval": ev}),
]
only = sys.argv[2] if len(sys.argv) > 2 else ""
for name, path in models.items():
    for i, (kind, params, data) in enumerate(cases):
        if only and only not in json.dumps(params):
            continue
        work = root / f"{name}-{i}"; work.mkdir()
        config = parse_step(kind, params)
        ctx = StepContext(Path(path), Path(path), work, data, lambda s, f: None)
        try:
            result = handler_for(config)(config, ctx)
            m = result.metrics
            key = {k: m.get(k) for k in ("loss_per_epoch", "macs", "parameters", "ratio_found")}
            out[f"{name} {kind} {json.dumps(params)}"] = [h(result.model_path), json.dumps(key, default=str)[:300]]
        except Exception as exc:
            out[f"{name} {kind} {json.dumps(params)}"] = ["error", repr(exc)[:200]]
        print(list(out.items())[-1], flush=True)
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
