"""static_int8: pre-process (shape inference, graph clean-up) -> calibrate on the calibration data ->
write a QDQ model with ONNX Runtime's quantizer -> count which compute nodes ONNX Runtime really
runs in int8 after its graph optimisation (a QDQ pair that ORT cannot fuse leaves the node in
fp32, which is slower than no quantization). qat exports through it with learned ranges.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from modelpress.spec.configs import Int8ExportFields
from modelpress.spec.errors import EngineError
from worker.engine import stoppable
from worker.engine.evaluate import environment, fixed_batch, open_session
from worker.engine.fidelity import top1_agreement
from worker.engine.quantize import calibration_ranges
from worker.engine.quantize.adaround import adaround
from worker.engine.quantize.bias_correction import correct_biases
from worker.engine.quantize.equalize import equalize
from worker.engine.quantize.ops import count_compute_nodes, excluded_nodes
from worker.engine.quantize.tensor_precision import set_precision
from worker.engine.registry import StepContext, StepResult

CALIBRATION_BATCH = 16


class _CalibrationReader:
    """Feeds calibration batches to ORT's calibrator (duck-types CalibrationDataReader).

    ORT's calibrator makes its own InferenceSession and runs it without our RunOptions, so the
    job's stop cannot end a run there: the reader reports progress before every batch instead,
    which is the job's check (cancel, deadline, worker stopping), and so bounds a stop to one
    batch. What that check raised is kept in `stopped`: ORT's quantizer lets it through, but the
    step must re-raise it as it was, not as the quantizer's failure."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int, progress: Callable[[float], None]):
        # Equal batches only: a fixed-batch model cannot take a short last batch, and ORT's
        # histogram calibrators (percentile, entropy) stack the batches' outputs.
        usable = len(images) - len(images) % batch
        self.images, self.batch = images, batch
        self.batches = [images[i : i + batch] for i in range(0, usable, batch)]
        self.input_name = input_name
        self.position = 0
        self.progress = progress
        self.stopped: BaseException | None = None

    def get_next(self):
        try:
            stoppable.check()  # a stop the heartbeat settled
            self.progress(self.position / max(1, len(self.batches)))
        except BaseException as exc:
            self.stopped = exc
            raise
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}

    def rewind(self, progress: Callable[[float], None] | None = None):
        """Back to the first batch; `progress`: how the next pass reports (its stage and share)."""
        self.position = 0
        if progress is not None:
            self.progress = progress


def static_int8(config: Int8ExportFields, ctx: StepContext, model: onnx.ModelProto | None = None, *,
                range_overrides: dict | None = None) -> StepResult:
    """`range_overrides`: activation ranges already known (learned by qat), by tensor name."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    calibration = ctx.data.get("calibration")
    if calibration is None:
        raise EngineError("calibration_data_required", "static int8 needs a calibration dataset (data.calibration)")
    prepared, equalization = _prepared(config, ctx)

    session = open_session(prepared, threads=1)
    images = calibration.images[: config.calibration_samples]
    fixed = fixed_batch(session)
    batch = fixed or min(CALIBRATION_BATCH, len(images))
    if fixed and len(images) < fixed:
        raise EngineError("dataset_too_small", f"the model takes batches of {fixed}; calibration has {len(images)} images")
    # The entropy ranges' pass reports as "calibrate"; each quantize_static pass as build() says.
    reader = _CalibrationReader(session.get_inputs()[0].name, images, batch, lambda done: ctx.progress("calibrate", 0.2))
    del session

    ctx.progress("calibrate", 0.2)
    method, options, wide = _calibration_options(config, prepared, reader, ctx, range_overrides)
    excluded = excluded_nodes(onnx.load(str(prepared), load_external_data=False), config.exclude)
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    # Without VNNI, u8s8 int8 kernels can saturate their 16-bit intermediate sums: 7-bit weights
    # (reduce_range) avoid it. With VNNI the full range is safe.
    reduce_range = not environment(1)["vnni"]

    def build(activation_type: str, stage: str = "calibrate", start: float = 0.2, width: float = 0.45) -> Path:
        """The QDQ model; ORT's calibration pass in it reports as `stage`, from `start` over `width`."""
        output = ctx.workdir / f"quantized-{activation_type}.onnx"
        reader.rewind(lambda done: ctx.progress(stage, start + width * done))
        try:
            quantize_static(
                str(prepared), str(output), reader, quant_format=QuantFormat.QDQ, per_channel=config.per_channel,
                activation_type=types[activation_type], weight_type=types[config.weight_type],
                calibrate_method=method, extra_options=options, nodes_to_exclude=excluded,
                reduce_range=reduce_range and activation_type == "uint8",
            )
        except Exception as exc:
            if reader.stopped is not None:  # the job's stop, raised by the reader inside ORT's calibration
                raise reader.stopped from None
            raise EngineError("quantization_failed", f"ONNX Runtime could not quantize the model: {str(exc)[:1500]}") from exc
        return output

    if config.activation_type != "auto":
        output, selection = build(config.activation_type), None
    else:
        output, selection = select_fastest(build, prepared, images, ctx)
    compact(output)
    chosen = selection["chosen"] if selection else config.activation_type
    repairs = _repairs_on_the_result(config, prepared, output, images, ctx,
                                     weights_reduced=reduce_range and chosen == "uint8")  # as build() quantized them
    ctx.progress("inspect", 0.9)
    return StepResult(output, metrics={
        "method": config.method, "calibration": config.calibration, "calibration_samples": len(images),
        "reduce_range": reduce_range, **({"wide_activations": sorted(wide)} if wide else {}),
        **({"equalization": equalization} if equalization else {}), **repairs, "activation_type": chosen,
        **({"type_selection": selection} if selection else {}), **count_compute_nodes(output, ctx.workdir),
    })


def _prepared(config: Int8ExportFields, ctx: StepContext) -> tuple[Path, dict | None]:
    """The model the quantizer reads: ORT's pre-processing (shape inference, graph clean-up), then
    cross-layer equalization when asked; and the equalization's figures."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    ctx.progress("preprocess", 0.05)
    prepared = ctx.workdir / "prepared.onnx"
    try:
        quant_pre_process(str(ctx.model_path), str(prepared), skip_symbolic_shape=True)
    except Exception:
        # Pre-processing is an optimisation; quantizing the model as it is still works.
        prepared = ctx.model_path
    if not getattr(config, "equalize", False):
        return prepared, None
    ctx.progress("equalize", 0.1)
    equalized = onnx.load(str(prepared))
    equalization = equalize(equalized)
    prepared = ctx.workdir / "equalized.onnx"
    onnx.save(equalized, str(prepared))
    return prepared, equalization


def _calibration_options(config: Int8ExportFields, prepared: Path, reader: "_CalibrationReader", ctx: StepContext,
                         range_overrides: dict | None) -> tuple[object, dict, set[str]]:
    """ORT's calibration method and `extra_options`, with every per-tensor override merged: ranges
    of our own (entropy, mse, qat's learned ones) and 16-bit activations; and the 16-bit tensors."""
    from onnxruntime.quantization import CalibrationMethod, QuantType

    # minmax and percentile are ORT's own; entropy and mse ranges are computed here and handed to
    # ORT as per-tensor overrides (see calibration_ranges).
    method = CalibrationMethod.Percentile if config.calibration == "percentile" else CalibrationMethod.MinMax
    overrides: dict = {}
    if config.calibration == "mse":
        overrides = calibration_ranges.mse_ranges(prepared, reader.images, reader.batch, ctx.workdir)
    elif config.calibration == "entropy":
        overrides = calibration_ranges.entropy_ranges(prepared, reader, ctx.workdir)
    graph = onnx.load(str(prepared), load_external_data=False)
    if range_overrides:
        known = {out for node in graph.graph.node for out in node.output}
        overrides = {**overrides, **{k: v for k, v in range_overrides.items() if k in known}}
    wide = wide_tensors(graph, getattr(config, "wide_activations", []))
    overrides = {**overrides, **{
        name: [{**overrides.get(name, [{}])[0], "quant_type": QuantType.QUInt16}] for name in wide}}
    options = {"CalibPercentile": config.percentile, **({"TensorQuantOverrides": overrides} if overrides else {})}
    return method, options, wide


def _repairs_on_the_result(config: Int8ExportFields, prepared: Path, output: Path, images: np.ndarray,
                           ctx: StepContext, *, weights_reduced: bool) -> dict:
    """The repairs that rewrite the QDQ model in place (AdaRound, bias correction, per-tensor
    precision), in that order; their figures by name, for the step's metrics."""
    figures: dict = {}
    if getattr(config, "adaround", False):
        ctx.progress("adaround", 0.7)
        figures["adaround"] = adaround(prepared, output, images, ctx.workdir,
                                       weight_range=(-64, 64) if weights_reduced else (-128, 127))
    if getattr(config, "bias_correction", "off") != "off":
        ctx.progress("bias correction", 0.8)
        figures["bias_correction"] = correct_biases(prepared, output, images, config.bias_correction, ctx.workdir)
    precision = getattr(config, "tensor_precision", {})
    if precision:  # last: on the weights AdaRound and bias correction left, as the rung measured them
        set_precision(output, precision, prepared)
        figures["tensor_precision"] = dict(sorted(precision.items()))
    return {name: value for name, value in figures.items() if value}


def wide_tensors(model: onnx.ModelProto, names: list[str]) -> set[str]:
    """Output tensors of the nodes named, or of the op types named, to quantize to 16 bits."""
    return {out for node in model.graph.node if node.name in names or node.op_type in names for out in node.output}


# `activation_type: auto` keeps uint8 (ONNX Runtime's default) unless int8 is faster by this fraction.
TIE_DEFAULT = "uint8"
CLEAR_WIN = 0.15


def select_fastest(build, float_model: Path, images: np.ndarray, ctx: StepContext) -> tuple[Path, dict]:
    """Quantize with unsigned and with signed activations, time both in ONNX Runtime on the
    calibration images, keep the clearly fastest whose top-1 agreement with the float model is within
    half a point of the best."""
    from worker.engine.evaluate import RunSettings, latency, run_outputs

    sample = images[:64]
    reference = run_outputs(open_session(float_model, threads=1), sample)[0]
    candidates = []
    for index, activation_type in enumerate(("uint8", "int8")):
        stage, start = f"try {activation_type} activations", 0.3 + 0.25 * index
        ctx.progress(stage, start)
        path = build(activation_type, stage, start, 0.15)  # its calibration, then timing and scoring
        session = open_session(path, threads=1)
        batch = fixed_batch(session) or 32
        timing = latency(session, sample, batch, RunSettings(time_budget_s=0.5, max_timed_runs=50))
        outputs = run_outputs(session, sample)[0]
        agreement = top1_agreement(reference, outputs) if reference.ndim == 2 else \
            float(-np.abs(outputs - reference).mean())
        candidates.append({"activation_type": activation_type, "path": path, "p50_ms": timing["p50_ms"],
                           "batch": batch, "agreement": agreement, **count_compute_nodes(path, ctx.workdir)})
    best_agreement = max(c["agreement"] for c in candidates)
    eligible = [c for c in candidates if c["agreement"] >= best_agreement - 0.005]
    fastest = min(eligible, key=lambda c: c["p50_ms"])
    default = next((c for c in eligible if c["activation_type"] == TIE_DEFAULT), fastest)
    # A clear win only: timings within noise of each other (a busy machine swings them by several
    # percent) keep ONNX Runtime's default, so the same model gives the same artifact run after run.
    chosen = fastest if fastest["p50_ms"] < default["p50_ms"] * (1 - CLEAR_WIN) else default
    report = {"chosen": chosen["activation_type"],
              "candidates": [{k: v for k, v in c.items() if k != "path"} for c in candidates]}
    return chosen["path"], report


def compact(path: Path) -> None:
    """Drop what only describes the graph: the shape annotations pre-processing added (ONNX Runtime
    infers them again) and doc strings; and give the tensors the quantizer added (scales, zero
    points, quantized weights, Q/DQ outputs) short names. On a small model those long names were
    more than half of the file. Compute nodes keep their names and outputs: exclusions and the
    per-layer report refer to them."""
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    model.graph.doc_string = ""
    model.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
    kept = {v.name for v in [*model.graph.input, *model.graph.output]}
    renamed: dict[str, str] = {}
    for tensor in model.graph.initializer:
        if tensor.name not in kept:
            renamed[tensor.name] = tensor.name = f"w{len(renamed)}"
    taken = {node.name for node in model.graph.node if node.op_type not in ("QuantizeLinear", "DequantizeLinear")}
    for index, node in enumerate(model.graph.node):
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node.name = next(name for suffix in range(len(taken) + 1) if (name := f"q{index}" + "_" * suffix) not in taken)
            for position, name in enumerate(node.output):
                if name not in kept:
                    renamed[name] = node.output[position] = f"t{len(renamed)}"
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            if name in renamed:
                node.input[position] = renamed[name]
    onnx.save(model, str(path))
