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


def test_pruned_channels_start_training_from_their_statistics_in_the_original(tmp_path):
    """After pruning, each kept channel's BatchNorm starts from the mean and standard deviation the
    channel had in the unpruned model, so training (batch statistics) sees the original scale."""
    from worker.engine import train_norm
    from worker.engine.prune import channel_graph, importance
    import onnx

    torch.manual_seed(0)
    images = np.random.default_rng(0).random((128, 1, 8, 8)).astype(np.float32)
    path = export_all(MobileNetSmall(widths=(8, 16, 16)).eval(), images, tmp_path, "m")["onnx"]
    statistics = train_norm.output_statistics(path, images, "cpu")
    graph = channel_graph.analyse(onnx.load(str(path)))
    kept = channel_graph.choose(importance.by_name("l2").scores(graph), channel_graph.keep_counts(graph, 0.5, 1))
    outputs = channel_graph.kept_outputs(graph, kept)
    pruned = channel_graph.apply(graph, kept)
    pruned_path = tmp_path / "pruned.onnx"
    onnx.save(pruned, str(pruned_path))
    weights = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    stem = next(n for n in pruned.graph.node if n.op_type == "Conv")
    assert len(outputs[stem.name]) < weights[stem.input[1]].dims[0]
    # The indices are the original channels the pruned stem kept (its input is not cut).
    original_stem = onnx.numpy_helper.to_array(weights[stem.input[1]])
    pruned_stem = onnx.numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == stem.input[1]))
    np.testing.assert_array_equal(pruned_stem, original_stem[outputs[stem.name]])

    targets = {name: (mean[outputs[name]], std[outputs[name]]) if name in outputs else (mean, std)
               for name, (mean, std) in statistics.items()}
    module, norms, _ = trainable(pruned_path, ImageSet(images, None), "cpu", tmp_path, targets)
    seen = {}
    for name, key in norms.names.items():
        norms.norms[key].register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.detach()))
    module.train()
    module(torch.from_numpy(images))
    checked = 0
    for name, out in seen.items():
        if out.shape[2] * out.shape[3] > 1:  # batch statistics over a 1x1 map are not the channel's
            mean, std = targets[name]
            np.testing.assert_allclose(out.mean(dim=(0, 2, 3)).numpy(), mean, atol=1e-3 + 1e-2 * np.abs(mean).max())
            # std is sqrt(var + eps): a channel that is nearly constant comes out at up to sqrt(eps) less
            np.testing.assert_allclose(out.std(dim=(0, 2, 3), unbiased=False).numpy(), std, rtol=0.05, atol=4e-3)
            checked += 1
    assert checked > 5


def test_a_channel_pruning_left_nearly_silent_keeps_its_own_statistics(tmp_path):
    from worker.engine import train_norm
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(0)
    images = np.random.default_rng(0).random((128, 1, 8, 8)).astype(np.float32)
    path = export_all(MobileNetSmall(widths=(8, 16, 16)).eval(), images, tmp_path, "m")["onnx"]
    targets = train_norm.output_statistics(path, images, "cpu")
    model = onnx.load(str(path))
    stem = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = next(t for t in model.graph.initializer if t.name == stem.input[1])
    array = numpy_helper.to_array(weight).copy()
    array[3] *= 1e-4  # as if magnitude pruning had left one tiny weight of channel 3's filter
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    silenced = tmp_path / "silenced.onnx"
    onnx.save(model, str(silenced))
    module, norms, _ = trainable(silenced, ImageSet(images, None), "cpu", tmp_path, targets)
    bn = norms.norms[norms.names[stem.name]]
    own = train_norm.output_statistics(silenced, images, "cpu")[stem.name]
    np.testing.assert_allclose(bn.weight.detach().numpy()[3], own[1][3], rtol=1e-4)  # not blown back up
    others = [c for c in range(len(array)) if c != 3]
    np.testing.assert_allclose(bn.weight.detach().numpy()[others], targets[stem.name][1][others], rtol=1e-5)
    np.testing.assert_allclose(bn.bias.detach().numpy()[others], targets[stem.name][0][others], rtol=1e-5, atol=1e-6)
