"""The `quantize` step: static int8 QDQ with ONNX Runtime's quantizer.

pre-process (shape inference, graph clean-up) -> calibrate on the calibration data -> write a QDQ
model -> count which compute nodes ONNX Runtime really runs in int8 after its graph optimisation
(a QDQ pair that ORT cannot fuse leaves the node in fp32, which is slower than no quantization).
"""

from pathlib import Path

import numpy as np
import onnx

from worker.engine.configs import QuantizeConfig
from worker.engine.errors import EngineError
from worker.engine.evaluate import fixed_batch, open_session
from worker.engine.registry import StepContext, StepResult, register

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulNBits"}
INT8_COMPUTE_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearGlobalAveragePool"}
FLOAT_COMPUTE_OPS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "NhwcFusedConv"}
CALIBRATION_BATCH = 16


class _CalibrationReader:
    """Feeds calibration batches to ORT's calibrator (duck-types CalibrationDataReader)."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int):
        # Equal batches only: a fixed-batch model cannot take a short last batch, and ORT's
        # histogram calibrators (percentile, entropy) stack the batches' outputs.
        usable = len(images) - len(images) % batch
        self.batches = [images[i : i + batch] for i in range(0, usable, batch)]
        self.input_name = input_name
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}

    def rewind(self):
        self.position = 0


def count_compute_nodes(model_path: Path, workdir: Path) -> dict:
    """Op types of the compute-heavy nodes after ORT's own graph optimisation."""
    import onnxruntime as ort

    optimized = workdir / "ort-optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    return {
        "int8_compute_nodes": sum(op in INT8_COMPUTE_OPS for op in ops),
        "float_compute_nodes": sum(op in FLOAT_COMPUTE_OPS for op in ops),
    }


@register("quantize")
def quantize(config: QuantizeConfig, ctx: StepContext) -> StepResult:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(ctx.model_path), load_external_data=False)
    if {n.op_type for n in model.graph.node} & QUANTIZED_OPS:
        raise EngineError("already_quantized", "the model already holds quantized operators; it is not quantized again")
    calibration = ctx.data.get("calibration")
    if calibration is None:
        raise EngineError("calibration_data_required", "static int8 needs a calibration dataset (data.calibration)")

    ctx.progress("preprocess", 0.05)
    prepared = ctx.workdir / "prepared.onnx"
    try:
        quant_pre_process(str(ctx.model_path), str(prepared), skip_symbolic_shape=True)
    except Exception:
        # Pre-processing is an optimisation; quantizing the model as it is still works.
        prepared = ctx.model_path

    session = open_session(prepared, threads=1)
    images = calibration.images[: config.calibration_samples]
    fixed = fixed_batch(session)
    batch = fixed or min(CALIBRATION_BATCH, len(images))
    if fixed and len(images) < fixed:
        raise EngineError("dataset_too_small", f"the model takes batches of {fixed}; calibration has {len(images)} images")
    reader = _CalibrationReader(session.get_inputs()[0].name, images, batch)
    del session

    ctx.progress("calibrate", 0.2)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.calibration]
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    output = ctx.workdir / "quantized.onnx"
    try:
        quantize_static(
            str(prepared), str(output), reader, quant_format=QuantFormat.QDQ, per_channel=config.per_channel,
            activation_type=types[config.activation_type], weight_type=types[config.weight_type],
            calibrate_method=method, extra_options={"CalibPercentile": config.percentile},
        )
    except Exception as exc:
        raise EngineError("quantization_failed", f"ONNX Runtime could not quantize the model: {str(exc)[:1500]}") from exc

    ctx.progress("inspect", 0.9)
    return StepResult(output, metrics={
        "method": config.method, "calibration_samples": len(images), **count_compute_nodes(output, ctx.workdir),
    })
