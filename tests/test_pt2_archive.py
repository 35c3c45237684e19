""".pt2 archives judged by their structure (issue 17): each member of a torch.export archive must be
of the kind torch.export.save writes there, and nothing torch.export.load would turn into Python
(an unpickled payload, a sympy expression it evals, guards code it execs, an operator looked up
by name outside torch's tensor operators) is accepted.

Found in review: a protocol-0 member, `"use_pickle" : true` with a space, a legacy
`data/constants/model.pt` and a weight file that is a pickle passed the upload scanner, which
matched strings. Then found here: `expr_str` and `guards_code` run Python in the worker (sympify
evals the first at `torch.export.load`; `.module()` execs the second), with weights-only loading on.
"""

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_hostile_inputs import assert_healthy, stored_objects
from tests.test_models_api import assert_problem

MARKER = Path("/tmp/modelpress-pt2-code-ran")  # every payload below would create it if it ran
RUNS_CODE = f"__import__('pathlib').Path('{MARKER}').touch()"


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.offset = torch.tensor([0.5, -0.5, 0.25, 0.0])  # a constant: data/constants/tensor_0

    def forward(self, x):
        return self.conv(x).mean((2, 3)) + self.offset


@pytest.fixture(scope="module")
def pt2_bytes() -> bytes:
    """A dynamic-batch export: its program holds sympy expressions and guards, as real ones do."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(SmallNet().eval(), (torch.zeros(2, 1, 8, 8),), dynamic_shapes={"x": {0: batch}})
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def members_of(content: bytes) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        names = archive.namelist()
        root = names[0].split("/")[0] + "/"
        return root, {n[len(root):]: archive.read(n) for n in names}


def rebuilt(content: bytes, edit) -> bytes:
    root, members = members_of(content)
    edit(members)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(root + name, data)
    return buffer.getvalue()


def edit_json(member: str, change):
    def edit(members):
        document = json.loads(members[member])
        change(document)
        members[member] = json.dumps(document).encode()
    return edit


def replace_text(member: str, old: bytes, new: bytes):
    def edit(members):
        assert old in members[member]
        members[member] = members[member].replace(old, new, 1)
    return edit


def add_member(name: str, data: bytes):
    return lambda members: members.__setitem__(name, data)


def torch_saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


PROTOCOL_0_CODE = f"cos\nsystem\n(S'touch {MARKER}'\ntR.".encode()  # os.system(...) when unpickled


class Touch:
    def __reduce__(self):
        return (__import__("os").system, (f"touch {MARKER}",))


PROTOCOL_2_CODE = pickle.dumps(Touch(), protocol=2)


def with_guard(program):
    program["guards_code"] = [f"{RUNS_CODE} is None"]


def with_expression(program):
    sizes = next(iter(program["graph_module"]["graph"]["tensor_values"].values()))["sizes"]
    sizes[0] = {"as_expr": {"expr_str": f"2+0*len(str({RUNS_CODE}))", "hint": {"as_int": 2}}}


def with_target(target: str):
    def change(program):
        program["graph_module"]["graph"]["nodes"][0]["target"] = target
    return change


def with_opaque_constant(members):
    config = json.loads(members["data/constants/model_constants_config.json"])
    config["config"]["offset"]["path_name"] = "opaque_obj_0"  # torch.export.load: pickle.loads(member)
    members["data/constants/model_constants_config.json"] = json.dumps(config).encode()
    members["data/constants/opaque_obj_0"] = members.pop("data/constants/tensor_0")


def nested(depth: int) -> bytes:
    return b'{"graph_module": ' + b"[" * depth + b"]" * depth + b"}"


def shortened_weight(members):
    members["data/weights/weight_0"] = members["data/weights/weight_0"][:8]


HOSTILE_PT2 = {
    # The five that passed the string-matching scanner.
    "protocol_0_sample_inputs": (add_member("data/sample_inputs/model.pt", PROTOCOL_0_CODE), "pickle_refused"),
    "use_pickle_with_a_space": (replace_text("data/weights/model_weights_config.json", b'"use_pickle": false',
                                             b'"use_pickle" : true'), "pickle_refused"),
    "legacy_constants_model_pt": (add_member("data/constants/model.pt", torch_saved(torch.nn.Linear(2, 2))), "pickle_refused"),
    "weight_file_is_a_pickle": (add_member("data/weights/weight_0", PROTOCOL_2_CODE), "pickle_refused"),
    "constant_file_is_a_protocol_0_pickle": (add_member("data/constants/tensor_0", PROTOCOL_0_CODE), "pickle_refused"),
    # More ways to the unpickler.
    "use_pickle_spelt_with_an_escape": (replace_text("data/weights/model_weights_config.json", b'"use_pickle": false',
                                                     b'"use_pickl\\u0065": true'), "pickle_refused"),
    "use_pickle_given_twice": (replace_text("data/weights/model_weights_config.json", b'"use_pickle": false',
                                            b'"use_pickle": false, "use_pickle": true'), "invalid_archive"),
    "legacy_weights_model_pt": (add_member("data/weights/model.pt", torch_saved({"w": torch.zeros(2)})), "pickle_refused"),
    "weight_file_is_a_torch_save": (add_member("data/weights/weight_0", torch_saved(torch.zeros(36))), "pickle_refused"),
    "opaque_object_constant": (with_opaque_constant, "pickle_refused"),
    # What torch evaluates as Python.
    "guards_code_runs_python": (edit_json("models/model.json", with_guard), "pt2_code_refused"),
    "sympy_expression_runs_python": (edit_json("models/model.json", with_expression), "pt2_code_refused"),
    "operator_found_outside_torch_ops": (edit_json("models/model.json", with_target("torch.os.system")), "export_op_refused"),
    "aten_operator_that_reads_files": (edit_json("models/model.json", with_target("torch.ops.aten.from_file.default")),
                                       "export_op_refused"),
    # Members this service does not read.
    "aotinductor_library": (add_member("data/aotinductor/model/model.so", b"\x7fELF" + b"\x00" * 60), "pt2_member_refused"),
    "unknown_member": (add_member("data/weights/notes.txt", b"hello"), "pt2_member_refused"),
    "unreferenced_weight": (add_member("data/weights/weight_9", b"\x00" * 16), "pt2_member_refused"),
    # Malformed structure.
    "nan_in_a_config": (replace_text("data/weights/model_weights_config.json", b'"is_param": true', b'"is_param": NaN'),
                        "invalid_archive"),
    "deeply_nested_program": (add_member("models/model.json", nested(100_000)), "invalid_archive"),
    "weight_shorter_than_its_shape": (shortened_weight, "invalid_archive"),
    "wrong_archive_version": (add_member("archive_version", b"7"), "invalid_archive"),
}


@pytest.fixture(scope="module")
def archive_client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from service.config import Settings
    from worker.serve import create_app

    data_dir = tmp_path_factory.mktemp("pt2") / "data"
    with TestClient(create_app(Settings(data_dir=data_dir)), raise_server_exceptions=False) as client:
        client.data_dir = data_dir
        yield client


@pytest.mark.parametrize("case", HOSTILE_PT2)
def test_hostile_pt2_archives_are_refused_at_upload(archive_client, pt2_bytes, case):
    edit, code = HOSTILE_PT2[case]
    MARKER.unlink(missing_ok=True)
    before = stored_objects(archive_client)
    response = archive_client.post("/v1/models", files={"file": ("model.pt2", rebuilt(pt2_bytes, edit))})
    assert_problem(response, 422, code)
    assert stored_objects(archive_client) == before
    assert not MARKER.exists()
    assert_healthy(archive_client)


def test_real_exports_are_accepted(archive_client, pt2_bytes, reference):
    for content in (pt2_bytes, reference.pt2.read_bytes()):
        response = archive_client.post("/v1/models", files={"file": ("model.pt2", content)})
        assert response.status_code == 201, response.text
        assert response.json()["format"] == "torch_export"


@pytest.mark.parametrize("case", ["guards_code_runs_python", "sympy_expression_runs_python", "opaque_object_constant"])
def test_the_worker_judges_the_archive_before_torch_loads_it(tmp_path, pt2_bytes, case):
    """As if the archive had slipped past the upload check: the worker refuses it before
    torch.export.load, which would have run the payload (these three do, even weights-only)."""
    from modelpress.spec.errors import EngineError
    from worker.engine.formats import to_onnx
    from worker.engine.onnx_torch import trainable_module

    edit, code = HOSTILE_PT2[case]
    path = tmp_path / "model.pt2"
    path.write_bytes(rebuilt(pt2_bytes, edit))
    MARKER.unlink(missing_ok=True)
    with pytest.raises(EngineError) as refused:
        to_onnx(path, "torch_export", tmp_path, np.zeros((2, 1, 8, 8), np.float32))
    assert refused.value.code == code
    with pytest.raises(EngineError) as refused_for_training:  # distill / fine-tune take a torch module
        trainable_module(path, "torch_export")
    assert refused_for_training.value.code == code
    assert not MARKER.exists()
    assert not (tmp_path / "converted.onnx").exists()
