"""Hostile uploads found in review: code hidden inside a torch.export archive, non-finite numbers,
oversized multipart framing, impossible array headers."""

import io
import json
import zipfile

import numpy as np
import torch

from tests.test_models_api import assert_problem, upload


def rewritten_pt2(source, replace: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(buffer, "w") as copy:
        for info in original.infolist():
            suffix = next((k for k in replace if info.filename.endswith(k)), None)
            copy.writestr(info.filename, replace[suffix] if suffix else original.read(info.filename))
    return buffer.getvalue()


def test_pt2_with_a_pickled_module_inside_is_refused(client, reference):
    evil = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2), evil)  # a full pickle of a module, not plain tensors
    content = rewritten_pt2(reference.pt2, {"data/sample_inputs/model.pt": evil.getvalue()})
    body = assert_problem(upload(client, content, "model.pt2"), 422, "pickle_refused")
    assert any("Linear" in ref for ref in body["references"]), body


def test_pt2_that_asks_for_the_unpickler_is_refused(client, reference):
    with zipfile.ZipFile(reference.pt2) as archive:
        name = next(n for n in archive.namelist() if n.endswith("model_weights_config.json"))
        config = archive.read(name).replace(b'"use_pickle": false', b'"use_pickle": true', 1)
    content = rewritten_pt2(reference.pt2, {"model_weights_config.json": config})
    assert_problem(upload(client, content, "model.pt2"), 422, "pickle_refused")


def test_pt2_with_a_malformed_signature_is_refused(client, reference):
    with zipfile.ZipFile(reference.pt2) as archive:
        name = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        program = json.loads(archive.read(name))
    program["graph_module"]["signature"]["input_specs"][-1]["user_input"]["arg"] = ["not", "a", "dict"]
    content = rewritten_pt2(reference.pt2, {"models/model.json": json.dumps(program).encode()})
    assert_problem(upload(client, content, "model.pt2"), 422, "invalid_archive")
    assert client.get("/v1/models").status_code == 200


def test_non_finite_preprocessing_is_refused(client, reference):
    response = client.post("/v1/datasets", files={"file": ("d.npz", reference.eval_npz.read_bytes())},
                           data={"preprocess": '{"mean": [NaN], "std": [1.0]}'})
    assert_problem(response, 422, "invalid_preprocess")
    assert client.get("/v1/datasets").status_code == 200


def test_overlong_multipart_boundary_is_a_4xx(client):
    boundary = "b" * 300
    body = f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m\"\r\n\r\nxx\r\n--{boundary}--\r\n"
    response = client.post("/v1/models", content=body.encode(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert_problem(response, 422, "malformed_multipart")


def test_impossible_array_headers_are_refused(client):
    for shape in ((-5, 8, 8), (4, 2**62, 8, 8)):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
            archive.writestr("images.npy", header.getvalue() + b"\x00" * 64)
        response = client.post("/v1/datasets", files={"file": ("d.npz", buffer.getvalue())})
        assert_problem(response, 422, "invalid_dataset")


def test_corrupt_zip_entries_are_a_4xx(client, reference):
    content = bytearray(reference.eval_npz.read_bytes())
    content[200:260] = b"\xff" * 60  # inside the compressed data: the CRC no longer matches
    response = client.post("/v1/datasets", files={"file": ("d.npz", bytes(content))})
    assert response.status_code == 422 and response.json()["code"] in ("invalid_dataset", "invalid_labels")
