"""Pickles read as opcode streams (pickletools), never loaded: which globals a pickle would import,
and whether some bytes are a pickle at all."""

import pickletools
from typing import IO

# Globals a plain `torch.save(state_dict)` file references; anything else means the pickle would
# rebuild arbitrary objects (an nn.Module, or worse) when loaded.
WEIGHTS_ONLY_GLOBALS = {
    "collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_parameter",
    "torch._utils _rebuild_parameter_with_state", "torch device", "torch._tensor _rebuild_from_type_v2",
}
# Opcodes through which a pickle imports or calls something; a stream without any of them can only
# build plain values (numbers, strings, lists), so raw tensor bytes that happen to parse are not refused.
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1", "EXT2",
                 "EXT4", "PROTO"}


def code_references(data: bytes) -> list[str]:
    """Globals a pickle would import when loaded, other than those of plain tensors."""
    globals_used: set[str] = set()
    recent_strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                globals_used.add(str(arg))
            elif opcode.name == "STACK_GLOBAL":
                globals_used.add(" ".join(recent_strings[-2:]) if len(recent_strings) >= 2 else "?")
            elif isinstance(arg, str):
                recent_strings.append(arg)
    except Exception:
        globals_used.add("?")
    return sorted(g for g in globals_used if g not in WEIGHTS_ONLY_GLOBALS and not _is_storage(g))


def _is_storage(global_name: str) -> bool:
    module, _, name = global_name.partition(" ")
    return module in ("torch", "torch.storage") and name.endswith("Storage")


def is_pickle_stream(stream: IO[bytes]) -> bool:
    """True when the bytes, from the first, are a pickle (any protocol) that imports or calls
    something and ends at its STOP. Read incrementally: a large tensor that is not a pickle fails
    at one of its first bytes."""
    may_run_code = False
    try:
        for opcode, _, _ in pickletools.genops(stream):
            may_run_code |= opcode.name in _CODE_OPCODES
            if opcode.name == "STOP":
                return may_run_code
    except Exception:
        return False
    return False
