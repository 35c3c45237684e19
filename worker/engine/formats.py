"""One internal path for every upload format: the engine works on ONNX.

- ONNX: used as uploaded.
- torch.export (.pt2): `torch.export.load`, then `ep.module()` traced by torch's TorchScript-based
  ONNX exporter (opset 17, dynamic batch). `training=PRESERVE` because an unlifted exported module
  refuses `.train(False)`, which the exporter calls otherwise.
- TorchScript: `torch.jit.load` (TorchScript's own restricted loader, not Python's unpickler), then
  the same exporter. TorchScript carries no input shape; the job's dataset gives one sample.
Conversion failures become `conversion_failed` with the exporter's message (it names the operator).
"""

import warnings
from pathlib import Path

import numpy as np

from worker.engine.errors import EngineError

EXPORT_OPSET = 17


def to_onnx(path: Path, model_format: str, workdir: Path, example: np.ndarray | None) -> Path:
    if model_format == "onnx":
        return path
    import torch

    try:
        if model_format == "torch_export":
            module = torch.export.load(str(path)).module()
        elif model_format == "torchscript":
            module = torch.jit.load(str(path), map_location="cpu")
            module.eval()
        else:
            raise EngineError("unsupported_model_format", f"cannot convert models of format {model_format!r}")
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError("model_load_failed", f"the {model_format} model cannot be loaded: {exc}") from exc
    if example is None:
        raise EngineError("input_shape_unknown", "the model has no input shape and the job has no dataset to take one from")

    sample = torch.from_numpy(np.ascontiguousarray(example[:2]))
    output = workdir / "converted.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (sample,), str(output), dynamo=False, opset_version=EXPORT_OPSET,
                training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
                input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
    except Exception as exc:
        raise EngineError("conversion_failed", f"the {model_format} model cannot be converted to ONNX: {str(exc)[:2000]}") from exc
    return output
