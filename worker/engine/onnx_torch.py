"""ONNX -> a trainable torch module, for techniques that need gradients or structural edits.

Our own small converter instead of onnx2torch (which needs --no-deps and an import workaround here
and fails on opset 18+ ReduceMean and Reshape(allowzero)): float weight tensors become
nn.Parameters, everything else buffers, and `forward` runs the graph node by node with torch ops.
The module exports back to ONNX with torch's exporter. An operator not in `OPS` is refused with
`unsupported_operator`, naming the operator and the node.
"""

import math
import re

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F

from modelpress.spec.errors import EngineError


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _pads(pads: list[int] | None, dims: int) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] -> F.pad order (last dim first)."""
    pads = pads or [0] * (2 * dims)
    begin, end = pads[:dims], pads[dims:]
    out = []
    for i in reversed(range(dims)):
        out += [begin[i], end[i]]
    return out


def _conv(node, x, w, b=None):
    a = _attrs(node)
    dims = w.dim() - 2
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise EngineError("unsupported_operator", f"Conv auto_pad={a['auto_pad']!r} (node {node.name}) is not supported")
    x = F.pad(x, _pads(a.get("pads"), dims)) if any(a.get("pads", [])) else x
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return conv(x, w, b, stride=a.get("strides", 1), dilation=a.get("dilations", 1), groups=a.get("group", 1))


def _conv_transpose(node, x, w, b=None):
    a = _attrs(node)
    dims = w.dim() - 2
    pads = a.get("pads", [0] * 2 * dims)
    if pads[:dims] != pads[dims:]:
        raise EngineError("unsupported_operator", f"ConvTranspose with asymmetric pads (node {node.name}) is not supported")
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
    return conv(x, w, b, stride=a.get("strides", 1), padding=pads[:dims], output_padding=a.get("output_padding", 0),
                groups=a.get("group", 1), dilation=a.get("dilations", 1))


def _gemm(node, a_, b_, c=None):
    a = _attrs(node)
    a_ = a_.t() if a.get("transA", 0) else a_
    b_ = b_.t() if a.get("transB", 0) else b_
    y = a.get("alpha", 1.0) * (a_ @ b_)
    return y + a.get("beta", 1.0) * c if c is not None else y


def _pool(node, x, kind):
    a = _attrs(node)
    dims = x.dim() - 2
    kernel = a["kernel_shape"]
    pads = a.get("pads", [0] * 2 * dims)
    symmetric = pads[:dims] == pads[dims:]
    if not symmetric:
        x = F.pad(x, _pads(pads, dims), value=-math.inf if kind == "max" else 0.0)
        pads = [0] * 2 * dims
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "max":
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
        return pool(x, kernel, a.get("strides", kernel), pads[:dims], a.get("dilations", 1), ceil_mode=ceil)
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
    return pool(x, kernel, a.get("strides", kernel), pads[:dims], ceil_mode=ceil,
                count_include_pad=bool(a.get("count_include_pad", 0)))


def _reshape(node, x, shape):
    shape = _ints(shape)
    allowzero = _attrs(node).get("allowzero", 0)
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _axes(node, inputs, index=1):
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])
    return _attrs(node).get("axes")


def _reduce(fn):
    def apply(node, x, *rest):
        a = _attrs(node)
        axes = _axes(node, [x, *rest])
        keep = bool(a.get("keepdims", 1))
        if axes is None or len(axes) == 0:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=axes, keepdim=keep)
    return apply


def _slice(node, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st != 1:
            raise EngineError("unsupported_operator", f"Slice with step {st} (node {node.name}) is not supported")
        size = x.shape[ax]
        index[ax] = slice(max(min(s, size), -size), max(min(e, size), -size - 1))
    return x[tuple(index)]


def _clip(node, x, lo=None, hi=None):
    a = _attrs(node)
    lo = lo if lo is not None else a.get("min")
    hi = hi if hi is not None else a.get("max")
    return torch.clamp(x, min=lo, max=hi)


def _split(node, x, split=None):
    a = _attrs(node)
    axis = a.get("axis", 0)
    sizes = _ints(split) if split is not None else a.get("split")
    if sizes is None:
        return torch.chunk(x, len(node.output), dim=axis)
    return torch.split(x, sizes, dim=axis)


OPS = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": lambda n, a, b: a @ b,
    "Add": lambda n, a, b: a + b,
    "Sub": lambda n, a, b: a - b,
    "Mul": lambda n, a, b: a * b,
    "Div": lambda n, a, b: a / b,
    "Pow": lambda n, a, b: torch.pow(a, b),
    "Sqrt": lambda n, x: torch.sqrt(x),
    "Exp": lambda n, x: torch.exp(x),
    "Neg": lambda n, x: -x,
    "Erf": lambda n, x: torch.erf(x),
    "Relu": lambda n, x: F.relu(x),
    "LeakyRelu": lambda n, x: F.leaky_relu(x, _attrs(n).get("alpha", 0.01)),
    "Sigmoid": lambda n, x: torch.sigmoid(x),
    "Tanh": lambda n, x: torch.tanh(x),
    "HardSigmoid": lambda n, x: torch.clamp(_attrs(n).get("alpha", 0.2) * x + _attrs(n).get("beta", 0.5), 0, 1),
    "HardSwish": lambda n, x: F.hardswish(x),
    "Clip": _clip,
    "Softmax": lambda n, x: F.softmax(x, dim=_attrs(n).get("axis", -1)),
    "LogSoftmax": lambda n, x: F.log_softmax(x, dim=_attrs(n).get("axis", -1)),
    "GlobalAveragePool": lambda n, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda n, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "AveragePool": lambda n, x: _pool(n, x, "avg"),
    "MaxPool": lambda n, x: _pool(n, x, "max"),
    "BatchNormalization": None,  # handled in forward: needs the module's training flag
    "Flatten": lambda n, x: x.reshape(math.prod(x.shape[: _attrs(n).get("axis", 1) % (x.dim() + 1)]), -1),
    "Reshape": _reshape,
    "Transpose": lambda n, x: x.permute(*(_attrs(n).get("perm") or list(reversed(range(x.dim()))))),
    "Concat": lambda n, *xs: torch.cat(xs, dim=_attrs(n)["axis"]),
    "Split": _split,
    "Slice": _slice,
    "Identity": lambda n, x: x,
    "Dropout": lambda n, x, *rest: x,
    "Shape": lambda n, x: torch.tensor(list(x.shape), dtype=torch.int64, device=x.device),
    "Gather": lambda n, x, i: torch.index_select(x, _attrs(n).get("axis", 0), i.reshape(-1).long()).reshape(
        *x.shape[: _attrs(n).get("axis", 0)], *i.shape, *x.shape[_attrs(n).get("axis", 0) + 1 :]),
    "Unsqueeze": lambda n, x, *r: _unsqueeze(x, _axes(n, [x, *r])),
    "Squeeze": lambda n, x, *r: _squeeze(x, _axes(n, [x, *r])),
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "Cast": lambda n, x: x.to(_TORCH_DTYPES.get(_attrs(n)["to"], torch.float32)),
    "Pad": lambda n, x, pads=None, value=None, *rest: _pad(n, x, pads, value),
}

_TORCH_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.INT64: torch.int64,
                 onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.FLOAT16: torch.float16,
                 onnx.TensorProto.BOOL: torch.bool, onnx.TensorProto.DOUBLE: torch.float64}


def _pad(node, x, pads=None, value=None):
    mode = _attrs(node).get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None:
        raise EngineError("unsupported_operator", f"Pad mode {mode!r} (node {node.name}) is not supported")
    widths = _pads(_ints(pads) if pads is not None else _attrs(node)["pads"], x.dim())
    if torch_mode != "constant":
        # torch pads only trailing (spatial) dimensions in these modes: drop the unpadded leading ones.
        while len(widths) > 2 and widths[-2:] == [0, 0]:
            widths = widths[:-2]
        if len(widths) // 2 > x.dim() - 2:
            raise EngineError("unsupported_operator", f"Pad mode {mode!r} on batch or channel dims (node {node.name}) is not supported")
        return F.pad(x, widths, mode=torch_mode)
    return F.pad(x, widths, value=float(value) if value is not None else 0.0)


def _unsqueeze(x, axes):
    for axis in sorted(a % (x.dim() + len(axes)) for a in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(x, axes):
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


class OnnxModule(nn.Module):
    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        graph = model.graph
        unsupported = [(n.op_type, n.name or n.output[0]) for n in graph.node if n.op_type not in OPS and n.op_type != "Constant"]
        if unsupported:
            op, name = unsupported[0]
            raise EngineError("unsupported_operator", f"operator {op} (node {name!r}) cannot be converted to a trainable "
                              f"torch module{f'; {len(unsupported) - 1} more unsupported nodes' if len(unsupported) > 1 else ''}")
        self.nodes = list(graph.node)
        initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                if "value" not in _attrs(node):
                    raise EngineError("unsupported_operator", f"Constant without a tensor value (node {node.name!r}) is not supported")
                initializers[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
        self.input_names = [i.name for i in graph.input if i.name not in initializers]
        # Optional hooks (quantization-aware training): weight_hook(node, weight) -> weight for the
        # weight input of compute nodes, output_hook(node, tensor) -> tensor for their outputs.
        self.weight_hook = None
        self.output_hook = None
        # Tensors to keep from the last forward pass (hint losses read intermediate layers).
        self.capture: set[str] = set()
        self.captured: dict[str, torch.Tensor] = {}
        self.output_names = [o.name for o in graph.output]
        self.keys: dict[str, str] = {}
        self.weights = nn.ParameterDict()
        # BatchNorm running statistics are state, not weights: gradients must not reach them.
        statistics = {name for node in graph.node if node.op_type == "BatchNormalization" for name in node.input[3:5]}
        for name, array in initializers.items():
            key = re.sub(r"[^0-9a-zA-Z_]", "_", name) + f"_{len(self.keys)}"
            self.keys[name] = key
            tensor = torch.from_numpy(np.array(array))
            if tensor.is_floating_point() and tensor.numel() > 1 and name not in statistics:
                self.weights[key] = nn.Parameter(tensor)
            else:
                self.register_buffer(key, tensor)

    def _value(self, name: str):
        key = self.keys[name]
        return self.weights[key] if key in self.weights else getattr(self, key)

    def forward(self, *inputs):
        env = dict(zip(self.input_names, inputs))
        for node in self.nodes:
            if node.op_type == "Constant":
                continue
            args = [None if name == "" else (env[name] if name in env else self._value(name)) for name in node.input]
            if node.op_type == "BatchNormalization":
                x, scale, bias, mean, var = args[:5]
                out = F.batch_norm(x, mean, var, scale, bias, training=False, eps=_attrs(node).get("epsilon", 1e-5))
            else:
                if self.weight_hook is not None and node.op_type in COMPUTE_OPS and len(args) > 1 and node.input[1] in self.keys:
                    args[1] = self.weight_hook(node, args[1])
                out = OPS[node.op_type](node, *args)
                if self.output_hook is not None and node.op_type in COMPUTE_OPS:
                    out = self.output_hook(node, out)
            outputs = out if isinstance(out, (tuple, list)) else (out,)
            env.update(zip(node.output, outputs))
            if self.capture:
                self.captured.update((name, env[name]) for name in node.output if name in self.capture)
        results = tuple(env[name] for name in self.output_names)
        return results[0] if len(results) == 1 else results


COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def onnx_to_torch(path) -> OnnxModule:
    return OnnxModule(onnx.load(str(path)))


def trainable_module(path, model_format: str) -> nn.Module:
    """A torch module for any upload format. ONNX: converted here. torch.export: the unlifted
    module (BatchNorm statistics stay frozen, as exported). TorchScript: the loaded module."""
    if model_format == "onnx":
        return onnx_to_torch(path)
    if model_format == "torch_export":
        from worker.engine.formats import check_export_structure

        check_export_structure(path)
        return torch.export.load(str(path)).module()
    if model_format == "torchscript":
        from worker.engine.formats import check_torchscript_graph

        module = torch.jit.load(str(path), map_location="cpu")
        check_torchscript_graph(module)
        return module
    raise EngineError("unsupported_model_format", f"cannot make a torch module from {model_format!r}")


def save_weights(module: OnnxModule, source, output) -> None:
    """Write the module's (trained) parameters back into the ONNX graph they came from."""
    model = onnx.load(str(source))
    for tensor in model.graph.initializer:
        key = module.keys.get(tensor.name)
        if key is not None and key in module.weights:
            tensor.CopyFrom(numpy_helper.from_array(module.weights[key].detach().cpu().numpy().astype(np.float32), tensor.name))
    onnx.save(model, str(output))


def apply_layer(node: onnx.NodeProto, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """One Conv or Gemm node on torch tensors (AdaRound reconstructs single layers)."""
    return _conv(node, x, w, b) if node.op_type == "Conv" else _gemm(node, x, w, b)
