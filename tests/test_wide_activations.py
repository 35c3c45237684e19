"""16-bit activations for chosen tensors (`wide_activations`, static_int8): a YOLO-style output that
concatenates pixel boxes (0..640) with 0..1 class scores cannot share one 8-bit scale (about 2.5
per step: every score becomes 0 or 2.5). Measured on AMD EPYC (avx2, avx512_vnni): the score rows'
cosine to the float model is 0.02 with the Concat in uint8 and 1.0000 (largest error 0.0098) with
it in uint16; the convolutions stay int8."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from sklearn.datasets import load_digits

from modelpress.spec.configs import parse_step
from tests.test_equalize import outputs
from worker.engine.data import ImageSet
from worker.engine.registry import StepContext, handler_for


class ConcatHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.box = torch.nn.Conv2d(16, 4, 1)
        self.cls = torch.nn.Conv2d(16, 3, 1)

    def forward(self, x):
        features = torch.relu(self.body(x))
        boxes = torch.sigmoid(self.box(features)).flatten(2) * 640.0
        scores = torch.sigmoid(self.cls(features) * 3).flatten(2)
        return torch.cat([boxes, scores], 1)  # (N, 4 + 3, anchors), as Ultralytics exports


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide") / "detector.onnx"
    torch.onnx.export(ConcatHead().eval(), torch.zeros(1, 1, 8, 8), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    images = load_digits().images.astype(np.float32)[:, None] / 16.0
    return path, images[:256], images[256:768]


def quantize(path, workdir, calibration, wide):
    config = parse_step("quantize", {"method": "static_int8", "activation_type": "uint8", "wide_activations": wide})
    workdir.mkdir()
    return handler_for(config)(config, StepContext(path, path, workdir, {"calibration": ImageSet(calibration, None)},
                                                   lambda s, f: None))


def cosine(a, b):
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("wide", [["Concat"], ["/Concat_2"]], ids=["op-type", "node-name"])
def test_a_16_bit_concat_keeps_the_score_rows(tmp_path, detector, wide):
    path, calibration, images = detector
    reference = outputs(path, images)
    plain = outputs(quantize(path, tmp_path / "plain", calibration, []).model_path, images)
    result = quantize(path, tmp_path / "wide", calibration, wide)
    widened = outputs(result.model_path, images)
    assert cosine(reference[:, 4:], plain[:, 4:]) < 0.5  # 8 bits collapse the scores
    assert cosine(reference[:, 4:], widened[:, 4:]) > 0.999
    assert np.abs(reference[:, 4:] - widened[:, 4:]).max() < 0.05
    assert cosine(reference[:, :4], widened[:, :4]) > 0.999
    assert "y" in result.metrics["wide_activations"]
    model = onnx.load(str(result.model_path))
    zero_points = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantize_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    # The output's quantizer is 16-bit; the convolutions' weights are still int8.
    assert any(zero_points[n.input[2]].dtype == np.uint16 for n in quantize_nodes if len(n.input) > 2)
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer) >= 3
    assert result.metrics["float_compute_nodes"] == 0
