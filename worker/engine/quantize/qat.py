"""The `qat` method of the quantize step: quantization-aware fine-tuning, then the same QDQ int8
export as static_int8.

The model becomes a trainable torch module (onnx_torch). During training, every compute node's
weight is fake-quantized (int8, symmetric, per output channel) and its output fake-quantized (uint8,
affine, range tracked as a moving average), both with the straight-through estimator, so the
weights learn to live with the rounding. The trained weights go back into the ONNX graph, and
static_int8 quantizes it with the learned activation ranges as per-tensor overrides. GPU when the
worker has one.
"""

import numpy as np
import onnx
import torch
from torch.nn import functional as F

from modelpress.spec.configs import QatConfig
from worker.engine.device import pick_device
from modelpress.spec.errors import EngineError
from worker.engine.evaluate import open_session, run_outputs
from worker.engine.onnx_torch import onnx_to_torch, save_weights
from worker.engine.quantize.static_int8 import static_int8
from worker.engine.quantize.weights import output_axis
from worker.engine.registry import StepContext, StepResult

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

    images = torch.from_numpy(train.images)
    labels = None if train.labels is None else torch.from_numpy(train.labels)
    with torch.no_grad():
        classes = module(images[:2].to(device)).shape[-1]
    if labels is not None and int(labels.max()) >= classes:
        raise EngineError("invalid_labels", f"the training labels go up to {int(labels.max())}; the model has {classes} outputs")
    teacher = None
    if config.distill:  # the teacher only runs forward, once per sample
        teacher = torch.from_numpy(run_outputs(open_session(ctx.original_path, threads=1), train.images)[0])
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = max(1, (len(images) + config.batch_size - 1) // config.batch_size)
    losses = []
    module.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for step, start in enumerate(range(0, len(images), config.batch_size)):
            batch = order[start : start + config.batch_size]
            logits = module(images[batch].to(device))
            if teacher is not None:
                soft = F.softmax(teacher[batch].to(device), dim=1)
                loss = F.kl_div(F.log_softmax(logits, dim=1), soft, reduction="batchmean")
                if labels is not None:
                    loss = 0.5 * loss + 0.5 * F.cross_entropy(logits, labels[batch].to(device))
            else:
                loss = F.cross_entropy(logits, labels[batch].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            ctx.progress(f"qat epoch {epoch + 1}/{config.epochs}", 0.8 * (epoch * steps_per_epoch + step + 1) / (config.epochs * steps_per_epoch))
        losses.append(round(total / steps_per_epoch, 5))

    module.eval().cpu()
    trained = ctx.workdir / "qat-float.onnx"
    save_weights(module, prepared, trained)
    overrides = {name: [{"rmin": np.float32(min(lo, 0.0)), "rmax": np.float32(max(hi, 0.0))}] for name, (lo, hi) in ranges.ranges.items()}
    export_ctx = StepContext(trained, ctx.original_path, ctx.workdir, {"calibration": train}, lambda s, f: ctx.progress(s, 0.8 + 0.2 * f))
    result = static_int8(config.export_config(), export_ctx, range_overrides=overrides)
    result.metrics.update({"method": "qat", "epochs": config.epochs, "train_samples": len(images), "loss_per_epoch": losses,
                           "device": device, "distill": config.distill})
    return result
