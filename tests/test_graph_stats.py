"""Parameters and MACs read off the graph, checked against counts done by hand."""

import warnings

import numpy as np
import onnx
import torch

from worker.engine.graph_stats import graph_stats


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)  # 8x8 output
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.depthwise(torch.relu(self.conv(x))), 1))


def test_parameters_and_macs_match_a_hand_count(tmp_path):
    model = Small().eval()
    with torch.no_grad():
        model.fc.weight[:, :100] = 0.0  # known zeros
    path = tmp_path / "small.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    stats = graph_stats(path)
    assert stats["parameters"] == sum(p.numel() for p in model.parameters())
    assert stats["nonzero_parameters"] == stats["parameters"] - 10 * 100
    assert np.isclose(stats["sparsity"], 1000 / stats["parameters"], atol=1e-6)
    conv = 8 * 8 * 8 * (3 * 3 * 3)
    depthwise = 8 * 8 * 8 * (1 * 3 * 3)
    fc = 10 * 512
    assert stats["macs"] == conv + depthwise + fc


def test_quantized_model_keeps_its_parameter_count(client, reference, tmp_path):
    from tests.jobs_flow import submit, upload_dataset, upload_model, wait_finished

    original_bytes = reference.onnx.read_bytes()
    model = upload_model(client, reference.onnx)
    data = upload_dataset(client, reference.calib_npz)
    job, _ = wait_finished(client, submit(client, model["id"], data["id"], None)["id"])
    assert job["status"] == "succeeded", job["error"]
    before, after = job["metrics"]["original"], job["metrics"]["compressed"]
    # Counted here, not by graph_stats: every weight of the exported CNN is a float initializer.
    by_hand = sum(int(np.prod(tensor.dims)) for tensor in onnx.load(str(reference.onnx)).graph.initializer)
    assert before["parameters"] == after["parameters"] == by_hand
    assert before["macs"] == after["macs"] > 0
    assert reference.onnx.read_bytes() == original_bytes  # the original is untouched
