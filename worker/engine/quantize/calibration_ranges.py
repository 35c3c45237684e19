"""MSE calibration (ONNX Runtime has none): for every tensor ORT would quantize, pick the range
that minimises the mean squared error of uint8 quantization on the calibration data, trading
clipping error against rounding error. The ranges go to ORT as per-tensor rmin/rmax overrides."""

from pathlib import Path

import numpy as np
import onnx

from worker.engine import stoppable
from worker.engine.quantize import qmath
from worker.engine.evaluate import open_session
from worker.engine.quantize.layers import expose_outputs

SAMPLES = 32
VALUES_PER_TENSOR = 200_000
SHRINK = np.linspace(0.25, 1.0, 31)


def _best_range(values: np.ndarray) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())
    best, best_error = (lo, hi), np.inf
    for factor in SHRINK:
        params = qmath.affine_qparams(lo * factor, hi * factor, 8, signed=False)
        error = float(np.mean((qmath.dequantize(qmath.quantize(values, params), params) - values) ** 2))
        if error < best_error:
            best, best_error = (lo * factor, hi * factor), error
    return best


def entropy_ranges(model_path: Path, reader, workdir: Path) -> dict:
    """ORT's entropy (KL) calibrator with 2048 histogram bins, as TensorRT's entropy calibration
    uses. Through quantize_static it keeps 128 bins for 128 quantized levels, which returns exactly
    the min/max range (measured here): the calibrator is called directly and its ranges passed on."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(str(model_path), augmented_model_path=str(workdir / "entropy-augmented.onnx"),
                                   calibrate_method=CalibrationMethod.Entropy,
                                   extra_options={"num_bins": 2048, "num_quantized_bins": 128})
    reader.rewind()
    calibrator.collect_data(reader)
    ranges = calibrator.compute_data()
    overrides = {}
    for name in ranges:
        lo, hi = ranges[name].range_value
        overrides[name] = [{"rmin": np.float32(np.min(lo)), "rmax": np.float32(np.max(hi))}]
    return overrides


def mse_ranges(model_path: Path, images: np.ndarray, batch: int, workdir: Path) -> dict:
    model = onnx.load(str(model_path))
    initializers = {t.name for t in model.graph.initializer}
    # The float activations ORT calibrates: node outputs and graph inputs, not weights.
    tensors = [model.graph.input[0].name] + [out for node in model.graph.node for out in node.output
                                             if out and out not in initializers]
    session = open_session(expose_outputs(model, tensors, workdir / "mse-calibration.onnx"), threads=1)
    names = [o.name for o in session.get_outputs()]
    feed = session.get_inputs()[0].name
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    sample = images[: max(batch, SAMPLES - SAMPLES % batch)]
    for start in range(0, len(sample) - len(sample) % batch or len(sample), batch):
        for name, value in zip(names, stoppable.run(session, {feed: sample[start : start + batch]})):
            if np.issubdtype(value.dtype, np.floating):
                collected[name].append(value.reshape(-1))
    rng = np.random.default_rng(0)
    overrides = {}
    for name, parts in collected.items():
        if not parts:
            continue
        values = np.concatenate(parts).astype(np.float64)
        if values.size > VALUES_PER_TENSOR:
            values = rng.choice(values, VALUES_PER_TENSOR, replace=False)
        lo, hi = _best_range(values)
        overrides[name] = [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
    return overrides
