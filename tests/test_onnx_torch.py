"""The ONNX -> torch conversion: same outputs as ONNX Runtime, gradients reach the weights, it
trains, it exports back to ONNX, and an unsupported operator is named in the error."""

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.nn import functional as F

from modelpress.spec.errors import EngineError
from worker.engine.formats import normalize_onnx
from worker.engine.onnx_torch import onnx_to_torch, trainable_module


def ort_outputs(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})


@pytest.fixture(scope="module")
def mobilenet_onnx(tmp_path_factory):
    from bench.reference import MobileNetSmall

    path = tmp_path_factory.mktemp("mb") / "mobilenet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(MobileNetSmall(widths=(8, 16, 16)).eval(), (torch.zeros(2, 1, 8, 8),), str(path), dynamo=False,
                          opset_version=17, input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    return path


@pytest.mark.parametrize("which", ["resnet", "mobilenet", "resnet_opset11"])
def test_converted_module_matches_onnx_runtime(reference, mobilenet_onnx, tmp_path, which):
    path = {"resnet": reference.onnx, "mobilenet": mobilenet_onnx}.get(which)
    if which == "resnet_opset11":
        path = tmp_path / "op11.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(reference.module.eval(), (torch.zeros(2, 1, 8, 8),), str(path), dynamo=False, opset_version=11,
                              input_names=["input"], dynamic_axes={"input": {0: "batch"}})
        path = normalize_onnx(path, tmp_path)
    images = reference.eval_images[:64].astype(np.float32) / 255.0
    module = onnx_to_torch(path).eval()
    with torch.no_grad():
        ours = module(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(ours, ort_outputs(path, images)[0], rtol=1e-4, atol=1e-4)


def test_converted_module_trains(reference):
    module = onnx_to_torch(reference.onnx).train()
    assert sum(p.numel() for p in module.parameters()) > 10_000
    images = torch.from_numpy(reference.eval_images[:128].astype(np.float32) / 255.0)
    labels = torch.from_numpy(reference.eval_labels[:128])
    # Scramble the labels: the loss can only fall if the weights really change.
    target = (labels + 1) % 10
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(module(images), target)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in module.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5


def test_converted_module_exports_back_to_onnx(reference, tmp_path):
    module = onnx_to_torch(reference.onnx).eval()
    path = tmp_path / "back.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    images = reference.eval_images[:32].astype(np.float32) / 255.0
    np.testing.assert_allclose(ort_outputs(path, images)[0], ort_outputs(reference.onnx, images)[0], rtol=1e-4, atol=1e-4)


def test_unsupported_operator_is_named(tmp_path):
    node = onnx.helper.make_node("Einsum", ["x", "x"], ["y"], name="mystery_node", equation="ij,jk->ik")
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])])
    path = tmp_path / "einsum.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(EngineError) as error:
        onnx_to_torch(path)
    assert error.value.code == "unsupported_operator"
    assert "Einsum" in error.value.message and "mystery_node" in error.value.message


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_torch_uploads_give_trainable_modules(reference, fmt):
    module = trainable_module(getattr(reference, fmt), {"pt2": "torch_export", "torchscript": "torchscript"}[fmt])
    images = torch.from_numpy(reference.eval_images[:16].astype(np.float32) / 255.0)
    F.cross_entropy(module(images), torch.from_numpy(reference.eval_labels[:16])).backward()
    assert all(p.grad is not None for p in module.parameters())


def test_pad_modes_match_onnx_runtime(tmp_path):
    x = np.random.default_rng(0).normal(size=(1, 2, 4, 5)).astype(np.float32)
    for mode in ("constant", "reflect", "edge"):
        pads = onnx.helper.make_tensor("pads", onnx.TensorProto.INT64, [8], [0, 0, 1, 2, 0, 0, 2, 1])
        node = onnx.helper.make_node("Pad", ["x", "pads"], ["y"], name="pad", mode=mode)
        graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 5])],
                                       [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [pads])
        path = tmp_path / f"pad-{mode}.onnx"
        onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
        with torch.no_grad():
            ours = onnx_to_torch(path)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(ours, ort_outputs(path, x)[0], rtol=1e-6)
