"""One internal path for every upload format: the engine works on ONNX.

- ONNX: used as uploaded.
- torch.export (.pt2): `torch.export.load`, then `ep.module()` traced by torch's TorchScript-based
  ONNX exporter (opset 17, dynamic batch). `training=PRESERVE` because an unlifted exported module
  refuses `.train(False)`, which the exporter calls otherwise.
- TorchScript: `torch.jit.load` (TorchScript's own restricted loader, not Python's unpickler), then
  the same exporter. TorchScript carries no input shape; the job's dataset gives one sample.
Conversion failures become `conversion_failed` with the exporter's message (it names the operator).

Every ONNX model is then normalised (`normalize_onnx`), so techniques see one shape of graph:
- a .zip with external weight files is unpacked (entries checked again) and loaded whole;
- weights held in Constant nodes become initializers (quantizers only look at initializers: left
  in Constant nodes, weights stay float while activations are quantized);
- opsets below 13 are converted to 13 with ONNX's version converter (per-channel Q/DQ needs 13).
"""

import os
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from modelpress.spec.errors import EngineError

EXPORT_OPSET = 17
MIN_OPSET = 13
PROTOBUF_LIMIT = 2 * 1024**3 - 1024 * 1024  # one file above this must keep external data


MAX_UNPACKED_BYTES = 16 * 1024**3

# torch.export.load falls back to the full unpickler in some paths; uploads were scanned at upload
# time, and this makes every torch.load in the worker refuse anything but plain tensors as well.
os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


# The upload scan (service/models/torchscript_code.py) reads the source; this reads the compiled
# graph, so a call the text scan could not see (an alias, generated code) is still caught before
# anything runs the model. Keep the two lists in sync.
DENIED_TORCHSCRIPT_OPS = {"from_file", "load", "save", "_load_for_mobile", "_save_for_mobile", "fork", "wait",
                          "_fork", "_wait", "rpc_async", "rpc_sync", "remote", "_jit_pass", "set_num_threads",
                          "_set_print_stack_traces_on_fatal_signal", "manual_seed"}
ALLOWED_TORCHSCRIPT_NAMESPACES = {"aten", "prim", "quantized"}


def torchscript_ops(module) -> set[str]:
    kinds: set[str] = set()
    pending = [module.inlined_graph] + [getattr(m, "inlined_graph", None) for m in module.modules()]
    blocks = [g for g in pending if g is not None]
    while blocks:
        block = blocks.pop()
        for node in block.nodes():
            kinds.add(node.kind())
            blocks.extend(node.blocks())
    return kinds


def check_torchscript_graph(module) -> None:
    refused = sorted(
        kind for kind in torchscript_ops(module)
        if kind.split("::")[0] not in ALLOWED_TORCHSCRIPT_NAMESPACES or kind.split("::")[-1] in DENIED_TORCHSCRIPT_OPS
    )
    if refused:
        raise EngineError("torchscript_op_refused",
                          f"the TorchScript model calls operators that reach outside its tensors: {', '.join(refused[:20])}")


def check_export_structure(path: Path) -> None:
    """The upload's structure check again, before torch.export.load: that load evals the archive's
    shape expressions and `.module()` execs its guards, weights-only flag or not."""
    from modelpress.spec.errors import Invalid
    from modelpress.uploads.pt2_archive import check_export_archive

    try:
        with zipfile.ZipFile(path) as archive:
            check_export_archive(archive, archive.namelist())
    except Invalid as exc:
        raise EngineError(exc.code, exc.message) from exc
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError, zlib.error) as exc:
        raise EngineError("invalid_archive", f"the torch.export archive cannot be read: {exc}") from exc


def to_onnx(path: Path, model_format: str, workdir: Path, example: np.ndarray | None, *, packed: bool = False) -> Path:
    """`packed`: the upload was a zip of an .onnx and its external data (decided at upload by its
    first bytes; never re-guessed here, so a file that is both ONNX and zip cannot switch paths)."""
    if model_format == "onnx":
        return normalize_onnx(path, workdir, packed=packed)
    import torch

    try:
        if model_format == "torch_export":
            check_export_structure(path)
            module = torch.export.load(str(path)).module()
        elif model_format == "torchscript":
            module = torch.jit.load(str(path), map_location="cpu")
            check_torchscript_graph(module)
            module.eval()
        else:
            raise EngineError("unsupported_model_format", f"cannot convert models of format {model_format!r}")
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError("model_load_failed", f"the {model_format} model cannot be loaded: {exc}") from exc
    check_finite_weights((name, value.detach().numpy()) for name, value in module.state_dict().items()
                         if value.is_floating_point())
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


def _unpack(path: Path, workdir: Path) -> Path:
    target = workdir / "unpacked"
    with zipfile.ZipFile(path) as archive:
        if sum(info.file_size for info in archive.infolist()) > MAX_UNPACKED_BYTES:
            raise EngineError("archive_too_large", f"the model archive unpacks to more than {MAX_UNPACKED_BYTES} bytes")
        for name in archive.namelist():
            resolved = (target / name).resolve()
            if not resolved.is_relative_to(target.resolve()):
                raise EngineError("unsafe_archive", f"archive entry {name!r} points outside the archive")
        archive.extractall(target)
    models = sorted(target.rglob("*.onnx"))
    if len(models) != 1:
        raise EngineError("invalid_archive", f"the archive must hold exactly one .onnx file; it holds {len(models)}")
    return models[0]


def constants_to_initializers(model: onnx.ModelProto) -> int:
    keep, moved = [], 0
    for node in model.graph.node:
        tensor = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and tensor is not None and len(node.attribute) == 1:
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            moved += 1
        else:
            keep.append(node)
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return moved


def _identity_initializers(model: onnx.ModelProto) -> None:
    """Identity(initializer) -> an initializer of its own (exporters emit these for shared weights)."""
    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
            inits[copy.name] = copy
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _unshare_initializers(model: onnx.ModelProto) -> None:
    """A weight used by two nodes gets a copy per node, so each can be sliced by its own map."""
    inits = {t.name: t for t in model.graph.initializer}
    seen: set[str] = set()
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            if name not in inits or inits[name].data_type != onnx.TensorProto.FLOAT or len(inits[name].dims) == 0:
                continue
            if name in seen:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__{node.name or len(seen)}"
                model.graph.initializer.append(copy)
                node.input[position] = copy.name
            seen.add(name)


def untie_weights(model: onnx.ModelProto) -> None:
    """Every weight an initializer of its own, used by one node: what slicing (pruning) and
    training need. Exporters share equal tensors between nodes and route some through Constant
    or Identity nodes; training those shared would tie weights the model never tied."""
    constants_to_initializers(model)
    _identity_initializers(model)
    _unshare_initializers(model)


def check_finite_weights(named_arrays) -> None:
    """NaN or Inf weights make every output and every comparison meaningless: refuse them by name."""
    bad = [name for name, array in named_arrays if array.dtype.kind == "f" and not np.isfinite(array).all()]
    if bad:
        raise EngineError("non_finite_weights", f"the model has NaN or infinite weights in {len(bad)} tensor(s): "
                          f"{', '.join(bad[:10])}")


def normalize_onnx(path: Path, workdir: Path, *, packed: bool = False) -> Path:
    source = _unpack(path, workdir) if packed else path
    try:
        model = onnx.load(str(source))  # external data is read relative to the model's folder
    except Exception as exc:
        raise EngineError("invalid_onnx", f"the ONNX model cannot be loaded: {exc}") from exc
    check_finite_weights((t.name, numpy_helper.to_array(t)) for t in model.graph.initializer)
    changed = source != path
    if model.ir_version >= 4 and constants_to_initializers(model):
        changed = True
    # Every node gets a name: exclusions, the per-layer report and ORT's quantizer refer to nodes by name.
    used = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}" if f"{node.op_type}_{index}" not in used else f"{node.op_type}_{index}_{len(used)}"
            used.add(node.name)
            changed = True
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET)
    if opset < MIN_OPSET:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            raise EngineError("opset_conversion_failed", f"the model's opset {opset} cannot be converted to {MIN_OPSET}: {exc}") from exc
        changed = True
    if not changed:
        return path
    output = workdir / "normalized.onnx"
    large = model.ByteSize() > PROTOBUF_LIMIT
    onnx.save(model, str(output), save_as_external_data=large, location="normalized.onnx.data" if large else None)
    return output
