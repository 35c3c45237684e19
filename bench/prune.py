"""Pruning benchmark: modelpress's `prune` step (channels at 30/50/70% fewer MACs, and 90% unstructured
magnitude sparsity with zstd storage) side by side with calling Torch-Pruning's BasePruner directly
with the same importance (group L2 magnitude), the same MAC targets and the same fine-tuning budget
(the same training loop), on the reference CNNs trained on Fashion-MNIST. Prints a table (not a test).

    .venv/bin/python -m bench.prune [--dataset fashion|digits] [--epochs 2] [--finetune-epochs 1] [--threads 1]
"""

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench.reference import MobileNetSmall, ResNetSmall, export_all, load_digits_split, load_fashion_split, train
from worker.engine import evaluate
from modelpress.spec.configs import ChannelPruneConfig, FinetuneSpec, MagnitudePruneConfig
from worker.engine.data import ImageSet
from worker.engine.prune import prune
from worker.engine.registry import StepContext
from worker.engine.training import TrainSpec, fit

TARGETS = (0.7, 0.5, 0.3)  # fraction of the original MACs kept


def torch_pruning(model, example: torch.Tensor, keep_macs: float):
    """Torch-Pruning's BasePruner with GroupMagnitudeImportance(p=2), its default widths (no
    rounding); the ratio found by bisection like ours, counted with its own MAC counter."""
    import torch_pruning as tp

    base_macs, _ = tp.utils.count_ops_and_params(model, example)

    def pruned(ratio):
        candidate = copy.deepcopy(model)
        pruner = tp.pruner.BasePruner(candidate, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=[candidate.head])
        pruner.step()
        return candidate

    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        macs, _ = tp.utils.count_ops_and_params(pruned(mid), example)
        lo, hi = (lo, mid) if macs / base_macs <= keep_macs else (mid, hi)
    return pruned(hi)


def export(model, example: np.ndarray, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.from_numpy(example[:2]),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", choices=["fashion", "digits"], default="fashion")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--train-samples", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)

    train_split, test_split = load_fashion_split() if args.dataset == "fashion" else load_digits_split()
    train_split.images, train_split.labels = train_split.images[: args.train_samples], train_split.labels[: args.train_samples]
    train_set = ImageSet(train_split.images.astype(np.float32) / 255.0, train_split.labels)
    eval_set = ImageSet(test_split.images[:2000].astype(np.float32) / 255.0, test_split.labels[:2000])
    settings = evaluate.RunSettings(threads=args.threads, time_budget_s=3.0)
    lr = FinetuneSpec().lr  # Torch-Pruning's models get our default recovery budget and learning rate
    spec = TrainSpec(epochs=args.finetune_epochs, lr=lr, batch_size=64, optimizer="adamw", schedule="cosine")

    rows = []
    for name, model in (("resnet", ResNetSmall(widths=(32, 64, 128))), ("mobilenet", MobileNetSmall())):
        cache = Path("bench/out") / f"prune-{args.dataset}-{args.epochs}ep"
        weights = cache / f"{name}.pt"
        if weights.is_file():  # trained once, then reused by later runs
            model.load_state_dict(torch.load(weights, weights_only=True))
        else:
            train(model, train_split, epochs=args.epochs)
            cache.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), weights)
        model.eval()
        fp32 = export_all(model, test_split.images, cache, name)["onnx"]
        work = Path(tempfile.mkdtemp(prefix=f"bench-prune-{name}-"))
        before, _ = evaluate.measure(fp32, eval_set, settings)
        rows.append((name, "fp32", before, before, 0.0))
        example = torch.from_numpy(eval_set.images[:1])
        for keep in TARGETS:
            step_dir = work / f"ours-{keep}"
            step_dir.mkdir()
            config = ChannelPruneConfig(target_macs=keep, importance="l2", finetune={"epochs": args.finetune_epochs})
            started = time.perf_counter()
            result = prune(config, StepContext(fp32, fp32, step_dir, {"train": train_set, "eval": eval_set}, lambda *_: None))
            ours_s = time.perf_counter() - started
            after, _ = evaluate.measure(result.model_path, eval_set, settings)
            rows.append((name, f"modelpress channels, {1 - keep:.0%} fewer MACs", after, before, ours_s))

            started = time.perf_counter()
            theirs = torch_pruning(copy.deepcopy(model), example, keep)
            fit(theirs, train_set, spec, progress=lambda *_: None, device="cpu")
            theirs_s = time.perf_counter() - started
            after, _ = evaluate.measure(export(theirs, eval_set.images, work / f"tp-{keep}.onnx"), eval_set, settings)
            rows.append((name, f"Torch-Pruning BasePruner, {1 - keep:.0%} fewer MACs", after, before, theirs_s))

        step_dir = work / "magnitude"
        step_dir.mkdir()
        config = MagnitudePruneConfig(sparsity=0.9, finetune={"epochs": args.finetune_epochs, "distill": True})
        started = time.perf_counter()
        result = prune(config, StepContext(fp32, fp32, step_dir, {"train": train_set, "eval": eval_set}, lambda *_: None))
        after, _ = evaluate.measure(result.model_path, eval_set, settings)
        after = {**after, "size_bytes": result.metrics["size_bytes_compressed"]}
        rows.append((name, "modelpress magnitude 90% + zstd", after, before, time.perf_counter() - started))

    print("| model | variant | params | MACs | x fewer MACs | size KB | p50 b1 ms | speed-up b1 | p50 b32 ms | speed-up b32 | top-1 | drop (pts) | prune+tune s |")
    print("|---" * 13 + "|")
    for name, label, m, base, seconds in rows:
        b1, b32 = m["latency"]["batch_1"]["p50_ms"], m["latency"]["batch_32"]["p50_ms"]
        print(f"| {name} | {label} | {m['nonzero_parameters']:,} | {m['macs']:,} | {base['macs'] / m['macs']:.2f} | "
              f"{m['size_bytes'] / 1024:.0f} | {b1:.3f} | {base['latency']['batch_1']['p50_ms'] / b1:.2f} | {b32:.3f} | "
              f"{base['latency']['batch_32']['p50_ms'] / b32:.2f} | {m['accuracy']['top1']:.4f} | "
              f"{100 * (base['accuracy']['top1'] - m['accuracy']['top1']):.2f} | {seconds:.0f} |")
    env = evaluate.environment(args.threads)
    print(f"\n{args.dataset}, trained {args.epochs} epochs on {len(train_set)} images, fine-tuned {args.finetune_epochs} epoch(s) "
          f"(AdamW {lr:g}, cosine), eval on {len(eval_set)}; {env['cpu']}, {args.threads} thread(s) for latency, "
          f"onnxruntime {env['versions']['onnxruntime']}. Size of the magnitude row: model.onnx.zst; params: non-zero.")


if __name__ == "__main__":
    main()
