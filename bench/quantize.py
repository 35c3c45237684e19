"""Quantization benchmark: every method of modelpress's `quantize` step, side by side with calling
ONNX Runtime's quantize_static with its defaults, with per-channel, and with U8S8, on the same
trained reference CNNs and the same data. Prints a table (not a test).

    .venv/bin/python -m bench.quantize [--dataset fashion|digits] [--epochs N] [--threads 1]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.reference import MobileNetSmall, ResNetSmall, export_all, load_digits_split, load_fashion_split, train
from worker.engine import evaluate
from modelpress.spec.configs import parse_step
from worker.engine.data import ImageSet
from worker.engine.fidelity import fidelity
from worker.engine.quantize import count_compute_nodes, quantize
from worker.engine.registry import StepContext


def ort_static(model: Path, calibration: np.ndarray, out: Path, **options) -> Path:
    from onnxruntime.quantization import QuantFormat, quantize_static

    class Reader:
        def __init__(self):
            self.batches = iter([{"input": calibration[i : i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, **options)
    return out


def ours(fp32: Path, work: Path, calib_data: ImageSet, **params) -> Path:
    step_dir = work / ("step-" + "-".join(f"{k}{v}" for k, v in params.items()))
    step_dir.mkdir()
    config = parse_step("quantize", params)
    return quantize(config, StepContext(fp32, fp32, step_dir, {"calibration": calib_data}, lambda *_: None)).model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", choices=["fashion", "digits"], default="fashion")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)

    train_split, test_split = load_fashion_split() if args.dataset == "fashion" else load_digits_split()
    train_split.images, train_split.labels = train_split.images[: args.train_samples], train_split.labels[: args.train_samples]
    eval_set = ImageSet(test_split.images[:2000].astype(np.float32) / 255.0, test_split.labels[:2000])
    calibration = ImageSet(train_split.images[:256].astype(np.float32) / 255.0, None)
    settings = evaluate.RunSettings(threads=args.threads, time_budget_s=3.0)

    rows = []
    for name, model in (("resnet", ResNetSmall(widths=(32, 64, 128))), ("mobilenet", MobileNetSmall())):
        cache = Path("bench/out") / f"quantize-{args.dataset}-{args.epochs}ep"
        fp32 = cache / f"{name}.onnx"
        if not fp32.is_file():  # trained once, then reused by later runs
            train(model, train_split, epochs=args.epochs)
            export_all(model, test_split.images, cache, name)
        work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        before, reference = evaluate.measure(fp32, eval_set, settings)
        from onnxruntime.quantization import QuantType

        candidates = {
            "modelpress static_int8 (defaults)": ours(fp32, work, calibration),
            "modelpress static_int8 mse": ours(fp32, work, calibration, calibration="mse"),
            "modelpress static_int8 entropy": ours(fp32, work, calibration, calibration="entropy"),
            "modelpress dynamic_int8": ours(fp32, work, calibration, method="dynamic_int8"),
            "modelpress weight_only int8": ours(fp32, work, calibration, method="weight_only", bits=8),
            "modelpress weight_only int4": ours(fp32, work, calibration, method="weight_only", bits=4),
            "modelpress codebook 4-bit": ours(fp32, work, calibration, method="codebook", bits=4),
            "modelpress fp16": ours(fp32, work, calibration, method="fp16"),
            "ORT quantize_static defaults": ort_static(fp32, calibration.images, work / "ort-default.onnx"),
            "ORT per-channel": ort_static(fp32, calibration.images, work / "ort-pc.onnx", per_channel=True),
            "ORT per-channel U8S8": ort_static(fp32, calibration.images, work / "ort-u8s8.onnx", per_channel=True,
                                               activation_type=QuantType.QUInt8),
        }
        rows.append((name, "fp32", before, None, None))
        for label, path in candidates.items():
            after, outputs = evaluate.measure(path, eval_set, settings)
            nodes = count_compute_nodes(path, work)
            rows.append((name, label, after, before, (fidelity(reference, outputs)[0], nodes)))

    header = "| model | variant | size KB | x smaller | p50 b1 ms | speed-up b1 | p50 b32 ms | speed-up b32 | top-1 | drop (pts) | agreement | int8/fp32 convs |"
    print(header)
    print("|---" * 12 + "|")
    for name, label, m, base, extra in rows:
        b1, b32 = m["latency"]["batch_1"]["p50_ms"], m["latency"]["batch_32"]["p50_ms"]
        if extra is not None and "top1_agreement" not in extra[0]:
            continue
        if base is None:
            print(f"| {name} | {label} | {m['size_bytes']/1024:.0f} | 1.00 | {b1:.3f} | 1.00 | {b32:.3f} | 1.00 | {m['accuracy']['top1']:.4f} | — | — | — |")
            continue
        fid, nodes = extra
        print(f"| {name} | {label} | {m['size_bytes']/1024:.0f} | {base['size_bytes']/m['size_bytes']:.2f} | {b1:.3f} | "
              f"{base['latency']['batch_1']['p50_ms']/b1:.2f} | {b32:.3f} | {base['latency']['batch_32']['p50_ms']/b32:.2f} | "
              f"{m['accuracy']['top1']:.4f} | {100*(base['accuracy']['top1']-m['accuracy']['top1']):.2f} | "
              f"{fid['top1_agreement']:.4f} | {nodes['int8_compute_nodes']}/{nodes['float_compute_nodes']} |")
    env = evaluate.environment(args.threads)
    print(f"\n{args.dataset}, {args.epochs} epochs on {len(train_split.images)} images, eval on {len(eval_set)}; "
          f"{env['cpu']}, VNNI={env['vnni']}, {args.threads} thread(s), onnxruntime {env['versions']['onnxruntime']}")


if __name__ == "__main__":
    main()
