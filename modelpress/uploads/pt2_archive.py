"""A torch.export (.pt2) archive judged by its structure before anything loads it.

The layout torch.export.save writes (torch 2.13, archive version 0), under one root folder:

    archive_format ("pt2"), archive_version ("0"), byteorder ("little"), .data/version, .data/serialization_id
    models/<m>.json                              the exported program
    data/weights/<m>_weights_config.json         {"config": {fqn: {path_name, is_param, use_pickle, tensor_meta}}}
    data/weights/weight_<n>                      raw tensor bytes, as the config describes them
    data/constants/<m>_constants_config.json     the same for constants
    data/constants/tensor_<n>
    data/sample_inputs/<m>.pt                    torch.save of the example inputs (a zip holding a pickle)
    extra/<name>                                 extra files, which torch reads as text

What torch.export.load turns into code, and so what is refused (torch's own weights-only flag only
covers the first kind):
- payloads it unpickles: one marked `use_pickle` (torch.load, weights_only=False), a legacy
  `data/{weights,constants}/<m>.pt`, `custom_obj_*` / `opaque_obj_*` constants (pickle.loads), sample
  inputs whose weights-only load fails (it falls back to the full unpickler) → `pickle_refused`;
- strings it evaluates: every `expr_str` (sympy.sympify, which evals) and `guards_code` (exec'd by
  `.module()`) must match a grammar of shape arithmetic → `pt2_code_refused`;
- node targets, looked up by name on `torch`, `operator` and `math` (`torch.os.system` resolves)
  → only registered tensor operators and shape arithmetic, minus file operators → `export_op_refused`;
- every other member (`data/aotinductor/` holds a shared library torch would dlopen) → `pt2_member_refused`.
"""

import re
import zipfile

from modelpress.spec.errors import Invalid
from modelpress.uploads.pickles import code_references, is_pickle_stream
from modelpress.uploads.pt2_program import check_program, read_json

MAX_CONFIG_BYTES = 64 * 1024 * 1024
MAX_PROGRAM_BYTES = 256 * 1024 * 1024
MAX_EXTRA_BYTES = 1024 * 1024
MAX_DIMENSION = 2**48
_MARKERS = {"archive_format": b"pt2", "archive_version": b"0", "byteorder": b"little"}
_MEMBER_KINDS = [
    (re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"), "marker"),
    (re.compile(r"models/(\w+)\.json"), "program"),
    (re.compile(r"data/weights/(\w+)_weights_config\.json"), "weights_config"),
    (re.compile(r"data/constants/(\w+)_constants_config\.json"), "constants_config"),
    (re.compile(r"data/weights/weight_\d+|data/constants/tensor_\d+"), "tensor"),
    (re.compile(r"data/sample_inputs/(\w+)\.pt"), "sample_inputs"),
    (re.compile(r"extra/[\w.-]+"), "extra"),
]
_UNPICKLED = re.compile(r"data/(?:weights|constants)/(?:\w+\.pt|custom_obj_\d+|opaque_obj_\d+)")
# torch.export's ScalarType numbers (torch/_export/serde/schema.py) and their sizes in bytes.
_ITEM_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 12: 1, 13: 2}


def check_export_archive(archive: zipfile.ZipFile, names: list[str]) -> dict:
    """Raise Invalid unless every member is of a kind torch.export.save writes and none would run
    code when loaded; return the program (models/<m>.json) parsed."""
    root, members = _members_by_kind(names)
    for marker, expected in _MARKERS.items():
        if _read(archive, root + marker, 64).strip() != expected:
            raise Invalid(f"{marker} is not {expected.decode()!r}: not a torch.export archive this service reads",
                          code="invalid_archive")
    (model,) = _one("program", members)
    needed = {}
    for kind, folder, prefix in (("weights_config", "data/weights/", "weight_"), ("constants_config", "data/constants/", "tensor_")):
        if members[kind] != [model]:
            raise Invalid(f"the archive needs exactly one {kind.replace('_', ' ')} for model {model!r}", code="pt2_member_refused")
        config_name = f"{root}{folder}{model}_{kind.split('_')[0]}_config.json"
        for path, size in _payload_sizes(read_json(archive, config_name, MAX_CONFIG_BYTES), config_name, prefix).items():
            needed[folder + path] = max(size, needed.get(folder + path, 0))
    tensors = set(members["tensor"])
    if set(needed) != tensors:
        missing, unused = sorted(set(needed) - tensors), sorted(tensors - set(needed))
        raise Invalid(f"tensor members missing {missing[:5]} or not described by a config {unused[:5]}",
                      code="pt2_member_refused", members=(missing + unused)[:20])
    for name, size in needed.items():
        _check_tensor_bytes(archive, root + name, size)
    if members["sample_inputs"] != [model]:
        raise Invalid(f"the archive needs the sample inputs of model {model!r}", code="pt2_member_refused")
    _check_sample_inputs(archive, f"{root}data/sample_inputs/{model}.pt")
    for extra in members["extra"]:
        _read(archive, root + extra, MAX_EXTRA_BYTES)
    program = read_json(archive, f"{root}models/{model}.json", MAX_PROGRAM_BYTES)
    check_program(program)
    return program


def _members_by_kind(names: list[str]) -> tuple[str, dict[str, list[str]]]:
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise Invalid("a torch.export archive keeps every member under one folder", code="pt2_member_refused")
    root = roots.pop() + "/"
    members: dict[str, list[str]] = {kind: [] for _, kind in _MEMBER_KINDS}
    unpickled, unknown = [], []
    for name in names:
        relative = name[len(root):]
        if _UNPICKLED.fullmatch(relative):
            unpickled.append(relative)
            continue
        match = next(((kind, m) for pattern, kind in _MEMBER_KINDS if (m := pattern.fullmatch(relative))), None)
        if match is None:
            unknown.append(relative)
        else:
            kind, found = match
            members[kind].append(found.group(1) if found.groups() else relative)
    if unpickled:
        raise Invalid(f"{unpickled[0]} is a payload torch.export.load unpickles; pickled objects are refused "
                      "(loading them runs code). Export again with torch.export.save", code="pickle_refused",
                      references=unpickled[:20])
    if unknown:
        raise Invalid(f"members this service does not read in a torch.export archive: {unknown[:5]}",
                      code="pt2_member_refused", members=unknown[:20])
    return root, members


def _one(kind: str, members: dict[str, list[str]]) -> list[str]:
    if len(members[kind]) != 1:
        raise Invalid(f"a torch.export archive holds one exported program; this one holds {len(members[kind])}",
                      code="pt2_member_refused")
    return members[kind]


def _payload_sizes(config, name: str, prefix: str) -> dict[str, int]:
    """The bytes each tensor member must hold, from a weights or constants config."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise Invalid(f"{name} has no config object", code="invalid_archive")
    sizes: dict[str, int] = {}
    for fqn, entry in entries.items():
        path = entry.get("path_name") if isinstance(entry, dict) else None
        if not isinstance(path, str):
            raise Invalid(f"{name}: entry {fqn!r} names no member", code="invalid_archive")
        if path.startswith(("custom_obj_", "opaque_obj_")) or entry.get("use_pickle") is True:
            raise Invalid(f"{name}: {fqn!r} is stored pickled; pickled objects are refused (loading them runs code)",
                          code="pickle_refused", references=[fqn[:200]])
        if entry.get("use_pickle") is not False or not re.fullmatch(re.escape(prefix) + r"\d+", path):
            raise Invalid(f"{name}: entry {fqn!r} is not a raw tensor ({prefix}<n>, use_pickle false)",
                          code="invalid_archive")
        sizes[path] = max(_tensor_extent_bytes(entry.get("tensor_meta"), f"{name}: {fqn!r}"), sizes.get(path, 0))
    return sizes


def _tensor_extent_bytes(meta, where: str) -> int:
    """How far into its member a tensor reaches: the storage must hold every strided element."""
    try:
        item = _ITEM_BYTES[meta["dtype"]]
        sizes = [_bounded_int(s["as_int"]) for s in meta["sizes"]]
        strides = [_bounded_int(s["as_int"]) for s in meta["strides"]]
        offset = _bounded_int(meta["storage_offset"]["as_int"])
    except (KeyError, TypeError, ValueError) as exc:
        raise Invalid(f"{where} has no readable tensor description (dtype, sizes, strides): {exc!r}"[:400],
                      code="invalid_archive") from exc
    if len(sizes) != len(strides) or len(sizes) > 64:
        raise Invalid(f"{where}: sizes and strides do not match", code="invalid_archive")
    if 0 in sizes:
        return 0
    return (offset + sum((size - 1) * stride for size, stride in zip(sizes, strides)) + 1) * item


def _bounded_int(value) -> int:
    if type(value) is not int or not 0 <= value <= MAX_DIMENSION:
        raise ValueError(f"{value!r} is not a size between 0 and {MAX_DIMENSION}")
    return value


def _check_tensor_bytes(archive: zipfile.ZipFile, name: str, needed: int) -> None:
    size = archive.getinfo(name).file_size
    with archive.open(name) as stream:
        head = stream.read(4)
    if head == b"PK\x03\x04" or (head and _is_pickle(archive, name)):
        raise Invalid(f"{name} should hold raw tensor bytes but holds a pickle or a torch.save file; pickled "
                      "objects are refused (loading them runs code)", code="pickle_refused", references=[name[:200]])
    if size and size < needed:
        raise Invalid(f"{name} holds {size} bytes; its tensor needs {needed}", code="invalid_archive")


def _is_pickle(archive: zipfile.ZipFile, name: str) -> bool:
    with archive.open(name) as stream:
        return is_pickle_stream(stream)


def _read(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise Invalid(f"the archive has no {name.split('/', 1)[-1]}", code="invalid_archive") from None
    if info.file_size > limit:
        raise Invalid(f"{name} is larger than {limit} bytes", code="invalid_archive")
    with archive.open(info) as stream:
        return stream.read(limit + 1)


# torch.save's own zip layout (torch/serialization.py), under one root folder.
_SAVED_MEMBERS = re.compile(r"data\.pkl|byteorder|version|\.data/version|\.data/serialization_id|\.format_version"
                            r"|\.storage_alignment|data/\d+")


def _check_sample_inputs(archive: zipfile.ZipFile, name: str) -> None:
    """torch.save of the example inputs. torch loads it weights-only and, when that fails, with the
    full unpickler: so it must be torch.save's zip, and its pickle may name only tensor globals."""
    if archive.getinfo(name).file_size > MAX_PROGRAM_BYTES:
        raise Invalid(f"{name} is larger than {MAX_PROGRAM_BYTES} bytes", code="invalid_archive")
    with archive.open(name) as stream:
        if stream.read(4) != b"PK\x03\x04":
            stream.seek(0)
            if is_pickle_stream(stream):
                raise Invalid(f"{name} is a bare pickle; pickled objects are refused (loading them runs code)",
                              code="pickle_refused", references=[name[:200]])
            raise Invalid(f"{name} is not a torch.save file", code="invalid_archive")
    with archive.open(name) as stream, zipfile.ZipFile(stream) as saved:
        inner = saved.namelist()
        roots = {n.split("/", 1)[0] for n in inner}
        relative = [n.split("/", 1)[-1] for n in inner]
        if len(roots) != 1 or any(not _SAVED_MEMBERS.fullmatch(r) for r in relative) or "data.pkl" not in relative:
            raise Invalid(f"{name} is not laid out as torch.save writes: {inner[:5]}", code="pt2_member_refused")
        pickled = saved.getinfo(f"{roots.pop()}/data.pkl")
        if pickled.file_size > MAX_CONFIG_BYTES:
            raise Invalid(f"{name}: its pickle is larger than {MAX_CONFIG_BYTES} bytes", code="invalid_archive")
        references = code_references(saved.read(pickled))
    if references:
        raise Invalid(f"{name} holds pickled Python objects; they are refused (loading them runs code)",
                      code="pickle_refused", references=references[:20])
