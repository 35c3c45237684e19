"""The training loop's building blocks: BatchNorm put back for training is the identity until it
learns, and folding it out gives an ONNX graph that computes exactly what the trained module does."""

import numpy as np
import onnxruntime as ort
import torch

from bench.reference import MobileNetSmall, export_all
from worker.engine.data import ImageSet
from worker.engine.training import TrainSpec, fit, trainable, write_back


def ort_run(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def test_batchnorm_for_training_is_exact_before_and_after(tmp_path):
    torch.manual_seed(0)
    images = np.random.default_rng(0).random((96, 1, 8, 8)).astype(np.float32)
    path = export_all(MobileNetSmall(widths=(8, 16, 16)).eval(), images, tmp_path, "m")["onnx"]
    original = ort_run(path, images)
    module, norms, source = trainable(path, ImageSet(images, None), "cpu", tmp_path)
    assert norms is not None and len(norms.norms) > 10  # every convolution (BatchNorm was folded by the export)
    module.eval()
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(images)).numpy(), original, rtol=1e-3, atol=1e-4)
    untouched = tmp_path / "untouched.onnx"
    write_back(module, norms, source, untouched)
    np.testing.assert_allclose(ort_run(untouched, images), original, rtol=1e-3, atol=1e-4)

    labels = np.random.default_rng(1).integers(0, 10, len(images))
    fit(module, ImageSet(images, labels), TrainSpec(epochs=2, lr=1e-2), progress=lambda *_: None, device="cpu")
    module.eval()
    with torch.no_grad():
        trained = module(torch.from_numpy(images)).numpy()
    assert np.abs(trained - original).max() > 1e-2  # it learned
    folded = tmp_path / "folded.onnx"
    write_back(module, norms, source, folded)
    np.testing.assert_allclose(ort_run(folded, images), trained, rtol=1e-3, atol=1e-3)
