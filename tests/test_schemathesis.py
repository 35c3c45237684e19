"""Property-based requests generated from the API's own OpenAPI spec (schemathesis): no input the
spec admits, nor the malformed ones it derives, gives a server error, an undeclared status, or a
body that does not match the spec."""

import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.config import Settings
from worker.serve import create_app

app = create_app(Settings(data_dir=Path(tempfile.mkdtemp(prefix="modelpress-schemathesis-")) / "data"))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module", autouse=True)
def running_app():
    from fastapi.testclient import TestClient

    with TestClient(app):  # runs the lifespan: the embedded worker is up while cases run
        yield


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_the_api_keeps_its_spec(case):
    # Every check but one: "schema-valid data is accepted" cannot hold for a service that reads
    # what it is sent. A schema-valid upload is any bytes, and a schema-valid job names ids and
    # step params the schema cannot know; their 404s and 422s are the documented answers.
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
