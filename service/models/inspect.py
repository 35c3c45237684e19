"""Recognise an uploaded model from its content (never its file name) and read its signature.

Nothing here executes the upload: pickles are only *scanned* opcode by opcode (pickletools), ONNX is
parsed as protobuf, a torch.export archive's signature is read from its JSON. torch is not imported.
"""

import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.spec.errors import Invalid  # not service.errors: the sandboxed child need not import FastAPI
from modelpress.spec.quantized import holds_quantized_ops
from modelpress.uploads.pickles import code_references

ONNX = "onnx"
TORCH_EXPORT = "torch_export"
TORCHSCRIPT = "torchscript"

MAX_METADATA_MEMBER_BYTES = 256 * 1024 * 1024
MAX_SUBGRAPH_DEPTH = 16
MAX_LOOP_TRIPS = 100_000
# torch.export serialises ScalarType as these numbers (torch/_export/serde/schema.py).
_EXPORT_DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32", 8: "float64", 12: "bool", 13: "bfloat16"}


@dataclass
class ModelInfo:
    format: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    details: dict[str, Any] = field(default_factory=dict)


ARCHIVE_ERRORS = (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error, OSError)


def inspect_model(path: Path, *, max_unpacked_bytes: int = 8 * 1024**3) -> ModelInfo:
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04"):
        try:
            return _inspect_zip(path, max_unpacked_bytes)
        except ARCHIVE_ERRORS as exc:
            raise Invalid(f"the archive cannot be read: {str(exc)[:300]}", code="invalid_archive") from exc
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        with open(path, "rb") as f:
            _refuse_pickle(f.read(MAX_METADATA_MEMBER_BYTES))
    return _inspect_onnx(path, head)


def _refuse_pickle(data: bytes) -> None:
    """Always raises: a pickle is never a model we accept; say which kind it is."""
    code_refs = code_references(data)
    if not code_refs:
        raise Invalid(
            "this is a plain weights file (a state_dict): it has no architecture to compress. Upload "
            "ONNX, a torch.export archive (torch.export.save) or TorchScript (torch.jit.save) instead",
            code="weights_only_file",
        )
    raise Invalid(
        "pickled Python objects are refused: loading them runs code. Upload ONNX, a torch.export "
        "archive (torch.export.save) or TorchScript (torch.jit.save) instead",
        code="pickle_refused",
        references=code_refs[:20],
    )


def _inspect_zip(path: Path, max_unpacked_bytes: int) -> ModelInfo:
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise Invalid(f"the upload looks like a zip archive but cannot be read: {exc}", code="invalid_archive") from exc
    with archive:
        if any(n.lower().endswith(".onnx") for n in names):
            return _inspect_onnx_zip(archive, names, max_unpacked_bytes)
        if any(n.count("/") == 2 and n.split("/")[1] == "models" and n.endswith(".json") for n in names):
            return _inspect_torch_export(archive, names)
        if any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names):
            from service.models.torchscript_code import check_torchscript_code

            check_archive_names(names)
            check_torchscript_code(archive, names)
            version = _read_member(archive, next((n for n in names if n.endswith("/version")), ""), default=b"")
            return ModelInfo(
                TORCHSCRIPT, inputs=[], outputs=[],
                details={"torchscript_version": version.decode(errors="replace").strip(),
                         "note": "TorchScript carries no input shapes; the job's dataset gives them"},
            )
        pickled = next((n for n in names if n.endswith("data.pkl")), None)
        if pickled:
            _refuse_pickle(_read_member(archive, pickled))
    raise Invalid(
        "the zip archive is not a model this service reads (ONNX, torch.export .pt2 or TorchScript)",
        code="unsupported_model_format",
    )


def check_archive_names(names: list[str]) -> None:
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise Invalid(f"archive entry {name!r} points outside the archive", code="unsafe_archive")


def _inspect_onnx_zip(archive: zipfile.ZipFile, names: list[str], max_unpacked_bytes: int) -> ModelInfo:
    """ONNX with its weights in external files, zipped together."""
    check_archive_names(names)
    if sum(info.file_size for info in archive.infolist()) > max_unpacked_bytes:
        raise Invalid(f"the archive unpacks to more than {max_unpacked_bytes} bytes", code="archive_too_large")
    models = [n for n in names if n.lower().endswith(".onnx")]
    if len(models) != 1:
        raise Invalid(f"the archive must hold exactly one .onnx file; it holds {len(models)}", code="invalid_archive")
    import onnx

    folder = models[0].rsplit("/", 1)[0] + "/" if "/" in models[0] else ""
    model_bytes = _read_member(archive, models[0])
    info = _inspect_onnx_bytes(model_bytes, external_ok=True)
    for tensor in _external_tensors(onnx.load_model_from_string(model_bytes)):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        check_archive_names([location])
        if folder + location not in names:
            raise Invalid(f"tensor {tensor.name!r} keeps its data in {location!r}, which is not in the archive",
                          code="external_data_missing")
    info.details.update({"packaging": "zip", "external_data": True})
    return info


def _graphs(graph, depth: int = 0):
    """The graph and every subgraph of its If/Loop/Scan nodes, however deep."""
    import onnx

    if depth > MAX_SUBGRAPH_DEPTH:
        raise Invalid(f"the ONNX graph nests subgraphs deeper than {MAX_SUBGRAPH_DEPTH} levels", code="invalid_onnx")
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g, depth + 1)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _graphs(subgraph, depth + 1)


def _external_tensors(model) -> list:
    """Tensors that keep their data in files, in the main graph and in every subgraph (a path in a
    Loop body is as dangerous as one at the top)."""
    import onnx

    tensors = []
    for graph in _graphs(model.graph):
        tensors += list(graph.initializer)
        tensors += [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]


def _check_loops_are_bounded(model) -> None:
    """A Loop runs while its condition holds, up to its trip count: one with a trip count of 10**15
    holds a worker for hours. Every Loop must name a constant trip count within the limit."""
    import onnx
    from onnx import numpy_helper

    for graph in _graphs(model.graph):
        constants = {t.name: t for t in graph.initializer}
        constants.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant"
                          for a in n.attribute if a.name == "value" and n.output})
        for node in graph.node:
            if node.op_type != "Loop":
                continue
            trip_name = node.input[0] if node.input else ""
            trip = constants.get(trip_name)
            if trip is None or trip.data_location == onnx.TensorProto.EXTERNAL:
                raise Invalid(f"Loop node {node.name!r} has no constant trip count: its run time cannot be bounded",
                              code="unbounded_loop")
            count = int(numpy_helper.to_array(trip).reshape(-1)[0])
            if count > MAX_LOOP_TRIPS:
                raise Invalid(f"Loop node {node.name!r} runs up to {count} times; at most {MAX_LOOP_TRIPS} are accepted",
                              code="unbounded_loop")


def _read_member(archive: zipfile.ZipFile, name: str, default: bytes | None = None) -> bytes:
    if not name:
        return default or b""
    info = archive.getinfo(name)
    if info.file_size > MAX_METADATA_MEMBER_BYTES:
        raise Invalid(f"archive member {name} is too large to inspect", code="invalid_archive")
    return archive.read(name)


def _inspect_torch_export(archive: zipfile.ZipFile, names: list[str]) -> ModelInfo:
    from pydantic import TypeAdapter, ValidationError

    from modelpress.uploads.pt2_archive import check_export_archive
    from service.models.schemas import TensorSpec

    check_archive_names(names)
    program = check_export_archive(archive, names)
    try:
        graph_module = program["graph_module"]
        tensors = graph_module["graph"]["tensor_values"]
        signature = graph_module["signature"]
        inputs = [_export_tensor(spec["user_input"]["arg"], tensors) for spec in signature["input_specs"] if "user_input" in spec]
        outputs = [_export_tensor(spec["user_output"]["arg"], tensors) for spec in signature["output_specs"] if "user_output" in spec]
        TypeAdapter(list[TensorSpec]).validate_python(inputs + outputs)
    except (KeyError, TypeError, ValueError, AttributeError, ValidationError) as exc:
        raise Invalid(f"the torch.export archive cannot be read: {str(exc)[:300]}", code="invalid_archive") from exc
    details = {"torch_version": program.get("torch_version"), "schema_version": program.get("schema_version")}
    return ModelInfo(TORCH_EXPORT, inputs=inputs, outputs=outputs, details=details)


def _export_tensor(arg: dict, tensors: dict) -> dict[str, Any]:
    name = arg.get("as_tensor", {}).get("name")
    if name is None:
        return {"name": "?", "shape": None, "dtype": "unknown"}
    meta = tensors.get(name, {})
    shape = [size.get("as_int") for size in meta.get("sizes", [])]  # symbolic sizes have no as_int
    return {"name": str(name), "shape": shape, "dtype": _EXPORT_DTYPES.get(meta.get("dtype"), "unknown")}


def _inspect_onnx(path: Path, head: bytes) -> ModelInfo:
    return _inspect_onnx_bytes(path.read_bytes(), external_ok=False)


def _inspect_onnx_bytes(content: bytes, *, external_ok: bool) -> ModelInfo:
    import onnx
    from google.protobuf.message import DecodeError

    head = content[:8]
    try:
        model = onnx.load_model_from_string(content)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        # ModelProto's first field on disk is ir_version (tag 0x08): such a file is ONNX gone bad.
        if head[:1] == b"\x08":
            raise Invalid(f"the ONNX file cannot be parsed (truncated or corrupt): {exc}", code="invalid_onnx") from exc
        raise Invalid(
            "the upload is not a model this service reads (ONNX, torch.export .pt2 or TorchScript)",
            code="unsupported_model_format",
        ) from exc
    if model.ir_version <= 0 or not model.graph.node:
        raise Invalid("the file is not an ONNX model with a graph", code="unsupported_model_format")
    if not external_ok and _external_tensors(model):
        raise Invalid("this ONNX model keeps its weights in external files: upload a .zip holding the .onnx file "
                      "and its data files", code="external_data_unsupported")
    try:
        if not _external_tensors(model):  # the checker would look for external files on our disk
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise Invalid(f"the ONNX model is invalid: {str(exc).splitlines()[0]}", code="invalid_onnx") from exc

    _check_loops_are_bounded(model)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [_onnx_value(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_onnx_value(v) for v in model.graph.output]
    if not outputs:
        raise Invalid("the ONNX model has no outputs: there is nothing to compress or compare", code="model_has_no_outputs")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    op_types = {n.op_type for n in model.graph.node}
    details = {
        "opset": opset,
        "ir_version": model.ir_version,
        "producer": model.producer_name,
        "nodes": len(model.graph.node),
        "quantized": holds_quantized_ops(op_types),
    }
    return ModelInfo(ONNX, inputs=inputs, outputs=outputs, details=details)


def _onnx_value(value) -> dict[str, Any]:
    import onnx

    tensor_type = value.type.tensor_type
    shape = None
    if tensor_type.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    try:
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    except Exception:
        dtype = "unknown"
    return {"name": value.name, "shape": shape, "dtype": dtype}
