"""Distillation benchmark: the same student, the same training budget, three ways — hard labels
only, distilled with labels (alpha 0.5, T 4), distilled label-free (alpha 0) — over several seeds,
with the teacher the reference ResNet trained on Fashion-MNIST; then the prune -> distill -> static
int8 recipe through the engine's steps against the fp32 teacher. Prints tables (not a test).

    .venv/bin/python -m bench.distill [--dataset fashion|digits] [--epochs 2] [--seeds 3]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.reference import ResNetSmall, export_all, load_digits_split, load_fashion_split, train
from worker.engine import evaluate
from modelpress.spec.configs import ChannelPruneConfig, DistillConfig, StaticInt8Config
from worker.engine.data import ImageSet
from worker.engine.distill import distill
from worker.engine.prune import prune
from worker.engine.quantize import quantize
from worker.engine.registry import StepContext
from worker.engine.training import TrainSpec, fit

TEACHER_WIDTHS, STUDENT_WIDTHS = (32, 64, 128), (16, 32, 64)  # about 4x fewer parameters


def top1(module, data: ImageSet) -> float:
    module.eval()
    with torch.no_grad():
        logits = torch.cat([module(torch.from_numpy(data.images[i : i + 500])) for i in range(0, len(data), 500)])
    return float((logits.argmax(1).numpy() == data.labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", choices=["fashion", "digits"], default="fashion")
    # A teacher trained as briefly as the students (2 epochs: 0.884 top-1, the students 0.883) has
    # nothing to teach; a teacher trained longer is what a team would bring.
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2, help="the student's training budget")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)

    train_split, test_split = load_fashion_split() if args.dataset == "fashion" else load_digits_split()
    train_split.images, train_split.labels = train_split.images[: args.train_samples], train_split.labels[: args.train_samples]
    train_set = ImageSet(train_split.images.astype(np.float32) / 255.0, train_split.labels)
    eval_set = ImageSet(test_split.images[:2000].astype(np.float32) / 255.0, test_split.labels[:2000])

    cache = Path("bench/out") / f"prune-{args.dataset}-{args.teacher_epochs}ep"  # shared with bench.prune
    teacher = ResNetSmall(widths=TEACHER_WIDTHS)
    weights = cache / "resnet.pt"
    if weights.is_file():
        teacher.load_state_dict(torch.load(weights, weights_only=True))
    else:
        train(teacher, train_split, epochs=args.teacher_epochs)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(teacher.state_dict(), weights)
    teacher_onnx = export_all(teacher.eval(), test_split.images, cache, "resnet")["onnx"]
    teacher_top1 = top1(teacher, eval_set)
    student_params = sum(p.numel() for p in ResNetSmall(widths=STUDENT_WIDTHS).parameters())
    teacher_params = sum(p.numel() for p in teacher.parameters())

    variants = {"hard labels only": 1.0, "distilled with labels (alpha 0.5, T 4)": 0.5, "distilled label-free (alpha 0)": 0.0}
    results = {name: [] for name in variants}
    for seed in range(args.seeds):
        for name, alpha in variants.items():
            torch.manual_seed(seed)
            student = ResNetSmall(widths=STUDENT_WIDTHS)  # the same initial weights for every variant of a seed
            spec = TrainSpec(epochs=args.epochs, lr=3e-3, batch_size=64, optimizer="adamw", schedule="cosine", seed=seed,
                             alpha=alpha, temperature=4.0)
            fit(student, train_set, spec, progress=lambda *_: None, device="cpu",
                teacher_path=None if alpha == 1.0 else teacher_onnx)
            results[name].append(top1(student, eval_set))

    print(f"| student ({student_params:,} params; teacher {teacher_params:,}, top-1 {teacher_top1:.4f}) | "
          + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | mean | spread (max-min) |")
    print("|---" * (args.seeds + 3) + "|")
    for name, scores in results.items():
        print(f"| {name} | " + " | ".join(f"{s:.4f}" for s in scores) + f" | {np.mean(scores):.4f} | {max(scores) - min(scores):.4f} |")

    # The recipe through the engine's own steps, as a job runs them.
    work = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    data = {"train": train_set, "eval": eval_set, "calibration": ImageSet(train_set.images[:256], None)}
    settings = evaluate.RunSettings(threads=args.threads, time_budget_s=3.0)
    before, _ = evaluate.measure(teacher_onnx, eval_set, settings)
    current, rows = teacher_onnx, []
    started = time.perf_counter()
    for label, config, handler in (
        ("prune channels, target_params 0.45", ChannelPruneConfig(target_params=0.45), prune),
        (f"distill {args.epochs + 1} epochs (alpha 0.5, T 4)", DistillConfig(epochs=args.epochs + 1), distill),
        ("quantize static_int8", StaticInt8Config(), quantize),
    ):
        step_dir = work / label.split()[0]
        step_dir.mkdir()
        current = handler(config, StepContext(current, teacher_onnx, step_dir, data, lambda *_: None)).model_path
        after, _ = evaluate.measure(current, eval_set, settings)
        rows.append((label, after))
    seconds = time.perf_counter() - started
    print("\n| recipe step | size KB | x smaller | p50 b1 ms | p50 b32 ms | top-1 | drop (pts) |")
    print("|---" * 7 + "|")
    for label, m in [("fp32 teacher", before), *rows]:
        print(f"| {label} | {m['size_bytes'] / 1024:.0f} | {before['size_bytes'] / m['size_bytes']:.2f} | "
              f"{m['latency']['batch_1']['p50_ms']:.3f} | {m['latency']['batch_32']['p50_ms']:.3f} | {m['accuracy']['top1']:.4f} | "
              f"{100 * (before['accuracy']['top1'] - m['accuracy']['top1']):.2f} |")
    env = evaluate.environment(args.threads)
    print(f"\n{args.dataset}: teacher trained {args.teacher_epochs} epochs, students {args.epochs} epochs (AdamW 3e-3, cosine) on "
          f"{len(train_set)} images, eval on {len(eval_set)}; recipe {seconds:.0f} s; {env['cpu']}, onnxruntime {env['versions']['onnxruntime']}")


if __name__ == "__main__":
    main()
