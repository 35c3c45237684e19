"""Error codes of docs/ERRORS.md that no other test produced, each through the HTTP API on the
embedded default (tests/test_error_catalogue.py fails when a documented code has no test)."""

import io

import numpy as np

from service.uploads import MAX_FIELD_BYTES, MAX_FIELDS
from tests.jobs_flow import upload_model
from tests.test_models_api import assert_problem


def test_two_file_parts_are_refused(client, reference):
    content = reference.onnx.read_bytes()
    response = client.post("/v1/models", files=[("file", ("a.onnx", content)), ("file", ("b.onnx", content))])
    assert_problem(response, 422, "multiple_files")
    assert client.get("/v1/models").json()["items"] == []


def test_a_form_field_over_the_limit_is_refused(client, reference):
    name = "n" * (MAX_FIELD_BYTES + 1)  # one byte over: the limit itself is accepted below
    response = client.post("/v1/models", files={"file": ("m.onnx", reference.onnx.read_bytes())}, data={"name": name})
    assert_problem(response, 422, "field_too_long")
    accepted = client.post("/v1/models", files={"file": ("m.onnx", reference.onnx.read_bytes())},
                           data={"name": "n" * 100})
    assert accepted.status_code == 201, accepted.text


def test_more_form_fields_than_the_limit_are_refused(client, reference):
    fields = {f"extra{i}": "x" for i in range(MAX_FIELDS + 1)}
    response = client.post("/v1/models", files={"file": ("m.onnx", reference.onnx.read_bytes())}, data=fields)
    assert_problem(response, 422, "too_many_fields")


def test_split_of_a_one_sample_dataset_is_refused(client, reference):
    buffer = io.BytesIO()
    np.savez(buffer, images=np.zeros((1, 1, 8, 8), np.float32), labels=np.zeros(1, np.int64))
    dataset = client.post("/v1/datasets", files={"file": ("one.npz", buffer.getvalue())})
    assert dataset.status_code == 201, dataset.text
    model = upload_model(client, reference.onnx)
    response = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"type": "quantize"}],
                                             "data": {"split": {"dataset": dataset.json()["id"]}}})
    assert_problem(response, 422, "dataset_too_small")
    assert client.get("/v1/jobs").json()["items"] == []
