"""The tests' settings come only from what each test gives: an exported production environment
(DATABASE_URL, BROKER_URL, STORAGE_URL, MODELPRESS_*) changes neither a test's `Settings` nor the
servers it starts (tests/conftest.py forgets those variables when the suite starts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent

# What a production host might export; every value differs from the setting's default.
PRODUCTION = {
    "DATABASE_URL": "postgresql+psycopg://modelpress:secret@db.prod.example:5432/modelpress",
    "BROKER_URL": "redis://redis.prod.example:6379/0",
    "STORAGE_URL": "s3://modelpress-prod/objects",
    "S3_ENDPOINT_URL": "https://s3.prod.example",
    "MODELPRESS_DATA_DIR": "/srv/modelpress",
    "MODELPRESS_ENV": "production",
    "MODELPRESS_AUTH": "on",
    "MODELPRESS_MAX_JOB_ATTEMPTS": "9",
    "MODELPRESS_BROKER_PREFIX": "prod:",
    "PORT": "9000",
    # pydantic-settings matches names case-insensitively, and reads a field without an alias by its name.
    "database_url": "postgresql+psycopg://other@db2.prod.example/modelpress",
    "DEFAULT_TENANT": "prod-tenant",
}

# In a fresh interpreter with the production environment: load the suite's conftest, as pytest does
# first, then build settings the way conftest's `settings` fixture does.
PROBE = """
import json, os, sys
import tests.conftest as conftest
from service.config import Settings
names = conftest.service_environment_names()
print(json.dumps({"settings": Settings(data_dir=sys.argv[1]).model_dump(mode="json"),
                  "left": sorted(key for key in os.environ if key.lower() in names)}))
"""


def test_an_exported_production_environment_reaches_no_test_settings(tmp_path):
    env = {**os.environ, **PRODUCTION}
    result = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "data")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    # Nothing left for a server the test starts (tests.processes passes os.environ on) ...
    assert seen["left"] == []
    settings = seen["settings"]
    # ... and the settings are the embedded defaults, the given data folder only.
    assert settings["database_url"] == settings["broker_url"] == settings["storage_url"] == ""
    assert settings["s3_endpoint_url"] == "" and settings["broker_key_prefix"] == ""
    assert (settings["environment"], settings["auth"], settings["max_job_attempts"]) == ("development", "auto", 3)
    assert (settings["port"], settings["default_tenant"]) == (8000, "default")
    assert settings == Settings(data_dir=tmp_path / "data").model_dump(mode="json")


def test_every_setting_read_from_the_environment_is_forgotten():
    from tests.conftest import service_environment_names

    names = service_environment_names()
    assert {key.lower() for key in PRODUCTION} <= names
    # Each field's aliases, so a setting added later is covered without editing the list.
    assert len(names) >= len(Settings.model_fields)
