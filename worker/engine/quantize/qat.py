"""The `qat` method of the quantize step: quantization-aware fine-tuning, then the same QDQ int8
export as static_int8.

The model becomes a trainable torch module (onnx_torch). During training, every compute node's
weight is fake-quantized (int8, symmetric, per output channel) and its output fake-quantized (uint8,
affine, range tracked as a moving average), both with the straight-through estimator, so the
weights learn to live with the rounding. The trained weights go back into the ONNX graph, and
static_int8 quantizes it with the learned activation ranges as per-tensor overrides. Training is
training.fit's (the same loss, checkpoints and resume; the ranges are checkpointed with the
weights). GPU when the worker has one.
"""

import numpy as np
import onnx
import torch

from modelpress.spec.configs import QatConfig
from worker.engine.device import pick_device
from modelpress.spec.errors import EngineError
from worker.engine.evaluate import open_session
from worker.engine.onnx_torch import onnx_to_torch, save_weights
from worker.engine.quantize.static_int8 import static_int8
from worker.engine.quantize.weights import output_axis
from worker.engine.registry import StepContext, StepResult
from worker.engine.training import TrainSpec, fit

MOMENTUM = 0.1


def fake_quantize_weight(node, weight: torch.Tensor) -> torch.Tensor:
    axis = output_axis(node, weight)  # works for torch tensors as for numpy arrays
    dims = [d for d in range(weight.dim()) if d != axis]
    scale = weight.detach().abs().amax(dim=dims, keepdim=True).clamp_min(1e-8) / 127.0
    quantized = torch.clamp(torch.round(weight / scale), -127, 127) * scale
    return weight + (quantized - weight).detach()  # straight-through estimator


class ActivationRanges:
    """Moving-average min/max of each compute node's output, and uint8 fake quantization with it."""

    def __init__(self):
        self.ranges: dict[str, tuple[float, float]] = {}
        self.training = True

    def state(self) -> dict:
        return {"ranges": dict(self.ranges)}

    def restore(self, state: dict) -> None:
        self.ranges = {name: (float(lo), float(hi)) for name, (lo, hi) in state["ranges"].items()}

    def __call__(self, node, output: torch.Tensor) -> torch.Tensor:
        name = node.output[0]
        if self.training or name not in self.ranges:
            lo, hi = float(output.detach().min()), float(output.detach().max())
            if name in self.ranges:
                old_lo, old_hi = self.ranges[name]
                lo, hi = old_lo + MOMENTUM * (lo - old_lo), old_hi + MOMENTUM * (hi - old_hi)
            self.ranges[name] = (lo, hi)
        lo, hi = self.ranges[name]
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max((hi - lo) / 255.0, 1e-8)
        zero_point = round(-lo / scale)
        quantized = (torch.clamp(torch.round(output / scale) + zero_point, 0, 255) - zero_point) * scale
        return output + (quantized - output).detach()


def qat(config: QatConfig, ctx: StepContext, model: onnx.ModelProto) -> StepResult:
    train = ctx.data.get("train")
    if train is None:
        raise EngineError("train_data_required", "qat needs training data (data.train or data.split)")
    if train.labels is None and not config.distill:
        raise EngineError("train_labels_required", "qat without labels needs distill: true (the original model teaches)")
    session = open_session(ctx.model_path, threads=1)
    if isinstance(session.get_inputs()[0].shape[0], int):
        raise EngineError("unsupported_model_input", "qat needs a model with a dynamic batch dimension")
    torch.manual_seed(config.seed)
    device = pick_device()
    # Train the graph as it will be exported: ORT's pre-processing folds BatchNorm into the
    # convolutions, so the learned activation ranges belong to tensors that still exist then.
    prepared = ctx.workdir / "qat-prepared.onnx"
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(ctx.model_path), str(prepared), skip_symbolic_shape=True)
    except Exception:
        prepared = ctx.model_path
    module = onnx_to_torch(prepared).to(device)
    ranges = ActivationRanges()
    module.weight_hook, module.output_hook = fake_quantize_weight, ranges
    with torch.no_grad():  # also the first range of every output: from two samples, before any step
        classes = module(torch.from_numpy(train.images[:2]).to(device)).shape[-1]
    if train.labels is not None and int(train.labels.max()) >= classes:
        raise EngineError("invalid_labels", f"the training labels go up to {int(train.labels.max())}; the model has {classes} outputs")

    # With the original as teacher: half KL (T = 1), half cross-entropy, KL alone without labels.
    alpha = 1.0 if not config.distill else 0.5 if train.labels is not None else 0.0
    spec = TrainSpec.of(config, seed=config.seed, alpha=alpha, temperature=1.0, shuffle="one_stream")
    training = fit(module, train, spec, progress=lambda stage, f: ctx.progress(f"qat {stage}", 0.8 * f), device=device,
                   teacher_path=ctx.original_path if config.distill else None, checkpoints=ctx.checkpoints,
                   extra_state=ranges)

    module.eval().cpu()
    trained = ctx.workdir / "qat-float.onnx"
    save_weights(module, prepared, trained)
    overrides = {name: [{"rmin": np.float32(min(lo, 0.0)), "rmax": np.float32(max(hi, 0.0))}] for name, (lo, hi) in ranges.ranges.items()}
    export_ctx = StepContext(trained, ctx.original_path, ctx.workdir, {"calibration": train}, lambda s, f: ctx.progress(s, 0.8 + 0.2 * f))
    result = static_int8(config.export_config(), export_ctx, range_overrides=overrides)
    result.metrics.update({"method": "qat", "epochs": config.epochs, "train_samples": len(train), "device": device,
                           "distill": config.distill, "loss_per_epoch": [epoch["loss"] for epoch in training["history"]],
                           "steps": training["steps"], "resumed_from_epoch": training["resumed_from_epoch"]})
    return result
