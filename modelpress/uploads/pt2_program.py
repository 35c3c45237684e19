"""The JSON of a torch.export archive: parsed with bounds, and the strings torch would evaluate as
Python held to grammars of shape arithmetic (see modelpress/uploads/pt2_archive.py for why).

- `expr_str` (sympy expressions of symbolic sizes, in `srepr` form: `Mul(Integer(2), Symbol('s94',
  positive=True, integer=True))`): torch passes them to `sympy.sympify`, which evals. Only sympy's
  constructors and torch's shape functions, symbol names, integers and arithmetic are accepted: no
  attribute access, no subscripts, no other strings, no powers.
- `guards_code` (`L['x'].size()[0] >= 2`): `.module()` execs it. Only input sizes and strides,
  integers, comparisons and arithmetic are accepted.
- node `target`s: torch resolves them with getattr on `torch`, `operator` or `math`, so
  `torch.os.system` would become a call. Only registered operators of the tensor namespaces (minus
  file operators) and the shape arithmetic that export records are accepted.
"""

import json
import re
import zipfile

from modelpress.spec.errors import Invalid

MAX_JSON_DEPTH = 256
MAX_EXPRESSION_CHARS = 4096

_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Add", "Mul", "Max", "Min", "Mod", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge",
    "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality", "And", "Or", "Not",
    "true", "false", "True", "False", "oo", "positive", "integer", "nonnegative", "real", "finite",
    # torch.utils._sympy.functions, as the deserializer names them (PowByNatural and FloatPow left out:
    # a power of two literals is a hang, not a shape).
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift",
    "RShift", "IntTrueDiv", "FloatTrueDiv", "ToFloat", "TruncToInt", "RoundToInt", "Identity",
}
_SYMBOL_NAME = re.compile(r"[a-z]+\d+")
_SYMPY_TOKENS = re.compile(r"\s*(?:'[a-z]+\d+'|[A-Za-z][A-Za-z0-9]*|\d{1,20}|//|==|!=|<=|>=|[-+*/%(),=<>])")
_INPUT = r"L(?:\['[A-Za-z_][A-Za-z0-9_]*'\]|\[\d{1,6}\])+"
_GUARD_TOKENS = re.compile(r"\s*(?:" + _INPUT + r"(?:\.size\(\)\[\d{1,3}\]|\.stride\(\)\[\d{1,3}\]|\.storage_offset\(\))?"
                           r"|\d{1,20}|and\b|or\b|not\b|//|==|!=|<=|>=|[-+*%()<>])")

_OP_TARGET = re.compile(r"torch\.ops\.(aten|prims|quantized|quantized_decomposed)\.([A-Za-z_][A-Za-z0-9_]*)\.[A-Za-z_][A-Za-z0-9_]*")
# Operators of those namespaces that reach files or processes (as for TorchScript uploads).
_DENIED_OPS = {"from_file", "load", "save", "_load_for_mobile", "_save_for_mobile"}
_SHAPE_TARGETS = {f"_operator.{name}" for name in (
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "abs", "pow", "eq", "ne", "lt", "le",
    "gt", "ge", "and_", "or_", "not_")} | {f"math.{name}" for name in ("ceil", "floor", "trunc", "sqrt")} | {
    f"torch.{name}" for name in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum", "sym_sqrt",
                                 "_sym_sqrt")}


def read_json(archive: zipfile.ZipFile, name: str, limit: int):
    """A JSON member parsed strictly: within `limit` bytes, no NaN/Infinity, no key given twice (torch
    keeps the last; a scan that kept the first would see a different archive), nesting bounded."""
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise Invalid(f"{name} is larger than {limit} bytes", code="invalid_archive")
    with archive.open(info) as stream:
        text = stream.read(limit + 1)
    try:
        if _depth(text) > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise Invalid(f"{name} is not valid JSON: {str(exc)[:300]}", code="invalid_archive") from exc


def _depth(text: bytes) -> int:
    """The deepest bracket nesting, strings skipped: checked before json.loads, which recurses."""
    depth = deepest = 0
    for token in re.finditer(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', text):
        char = token.group()[:1]
        if char in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif char in (b"]", b"}"):
            depth -= 1
    return deepest


def _unique_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a key is given twice: {sorted(k for k in set(keys) if keys.count(k) > 1)[:3]}")
    return dict(pairs)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def check_program(program) -> None:
    if not isinstance(program, dict):
        raise Invalid("models/<m>.json is not an exported program", code="invalid_archive")
    guards = program.get("guards_code", [])
    if not isinstance(guards, list) or not all(isinstance(g, str) for g in guards):
        raise Invalid("guards_code is not a list of strings", code="invalid_archive")
    for guard in guards:
        _check_tokens(guard, _GUARD_TOKENS, "a guard")
    ranges = program.get("range_constraints", {})
    if not isinstance(ranges, dict) or not all(_SYMBOL_NAME.fullmatch(k) for k in ranges):
        raise Invalid("range_constraints names something other than shape symbols", code="pt2_code_refused",
                      references=[str(k)[:200] for k in list(ranges)[:5]] if isinstance(ranges, dict) else [])
    pending = [program]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            if isinstance(value.get("expr_str"), str):
                _check_sympy(value["expr_str"])
            if "target" in value and "inputs" in value and "outputs" in value:
                _check_target(value["target"])
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def _check_sympy(expression: str) -> None:
    _check_tokens(expression, _SYMPY_TOKENS, "a shape expression")
    names = set(re.findall(r"(?<!')\b[A-Za-z][A-Za-z0-9]*\b(?!')", expression))
    unknown = sorted(n for n in names if n not in _SYMPY_NAMES and not _SYMBOL_NAME.fullmatch(n))
    if unknown:
        raise Invalid(f"a shape expression calls {unknown[:5]}: torch would evaluate it as Python",
                      code="pt2_code_refused", references=[expression[:200]])


def _check_tokens(text: str, tokens: re.Pattern, what: str) -> None:
    position = 0
    while len(text) <= MAX_EXPRESSION_CHARS and position < len(text):
        match = tokens.match(text, position)
        if match is None or match.end() == position:
            break
        position = match.end()
    if len(text) > MAX_EXPRESSION_CHARS or text[position:].strip():
        raise Invalid(f"{what} in the program is not shape arithmetic: torch would evaluate it as Python",
                      code="pt2_code_refused", references=[text[:200]])


def _check_target(target) -> None:
    if not isinstance(target, str):
        raise Invalid("a node of the program has no operator name", code="invalid_archive")
    operator = _OP_TARGET.fullmatch(target)
    if target in _SHAPE_TARGETS or (operator and operator.group(2) not in _DENIED_OPS):
        return
    raise Invalid(f"the program calls {target[:200]!r}, which is not a tensor operator this service runs "
                  "(allowed: torch.ops.aten/prims/quantized, shape arithmetic)", code="export_op_refused",
                  operators=[target[:200]])
