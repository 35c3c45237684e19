"""Read a TorchScript archive's code before anything loads it.

A TorchScript file is a program: its `code/*.py` members are TorchScript source that `torch.jit.load`
compiles and `forward` runs, and `__setstate__` runs at load. TorchScript's operator set includes
operators with access outside the tensors (`torch.from_file` reads any file the worker can read) and
custom classes or operators registered by native libraries. We accept only the tensor maths: calls
into the `aten`, `prim` and `quantized` namespaces, minus the operators that reach files or
processes. Anything else is refused at upload, and the worker checks the compiled graph again
(`worker.engine.formats`) before it runs the model.
"""

import re
import zipfile

from service.errors import Invalid

# Operators of the allowed namespaces that touch the outside world. Kept in sync with
# worker/engine/formats.py DENIED_TORCHSCRIPT_OPS.
DENIED_OPS = {"from_file", "load", "save", "_load_for_mobile", "_save_for_mobile", "fork", "wait",
              "_fork", "_wait", "rpc_async", "rpc_sync", "remote", "_jit_pass", "set_num_threads",
              "_set_print_stack_traces_on_fatal_signal", "manual_seed"}
ALLOWED_NAMESPACES = {"aten", "prim", "quantized"}
MAX_CODE_BYTES = 64 * 1024 * 1024

_TORCH_CALL = re.compile(rb"\btorch\.([A-Za-z_][A-Za-z0-9_]*)\b")
_OPS_CALL = re.compile(rb"\bops\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
_CUSTOM_CLASS = re.compile(rb"\b(?:__torch__\.)?torch\.classes\.")


def refused_references(code: bytes) -> set[str]:
    """The calls in one TorchScript source member that a model may not make."""
    refused = {f"torch.{m.decode()}" for m in _TORCH_CALL.findall(code) if m.decode() in DENIED_OPS | {"ops", "classes"}}
    refused.discard("torch.ops")  # judged by namespace below
    for namespace, name in _OPS_CALL.findall(code):
        ns, op = namespace.decode(), name.decode()
        if ns not in ALLOWED_NAMESPACES or op in DENIED_OPS:
            refused.add(f"ops.{ns}.{op}")
    if _CUSTOM_CLASS.search(code):
        refused.add("torch.classes")
    return refused


def check_torchscript_code(archive: zipfile.ZipFile, names: list[str]) -> None:
    code_members = [n for n in names if "/code/" in n and n.endswith(".py")]
    if sum(archive.getinfo(n).file_size for n in code_members) > MAX_CODE_BYTES:
        raise Invalid(f"the TorchScript code is larger than {MAX_CODE_BYTES} bytes", code="archive_too_large")
    refused: set[str] = set()
    for member in code_members:
        with archive.open(member) as f:
            refused |= refused_references(f.read(MAX_CODE_BYTES + 1))
    if refused:
        raise Invalid(
            "the TorchScript model calls operators that reach outside its tensors (files, processes, "
            "custom classes or native extensions); export it to ONNX or torch.export instead",
            code="torchscript_op_refused", operators=sorted(refused)[:20],
        )
