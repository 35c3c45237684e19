"""inspect_model run in service.sandbox: a hostile upload costs one limited child, not the API."""

from pathlib import Path

from service import sandbox
from service.errors import Invalid
from service.models.inspect import ModelInfo


def inspect_model_sandboxed(path: Path, *, max_unpacked_bytes: int, limits: sandbox.Limits) -> ModelInfo:
    argv = sandbox.python_module("service.models.inspect_entry", str(path.resolve()), str(max_unpacked_bytes))
    try:
        answer = sandbox.run_json(argv, limits=limits)
    except sandbox.SandboxTimeout as exc:
        raise Invalid(f"reading the model took too long: {exc}", code="model_parse_timeout") from exc
    except sandbox.SandboxOutOfMemory as exc:
        raise Invalid(f"reading the model needs too much memory: {exc}", code="model_parse_out_of_memory") from exc
    except sandbox.SandboxFailed as exc:
        # The parser crashed on these bytes: the upload is what is wrong (the log keeps the details).
        raise Invalid("the model cannot be read: its parser failed on it", code="model_parse_failed") from exc
    if "invalid" in answer:
        refused = answer["invalid"]
        raise Invalid(refused["message"], code=refused["code"], **refused.get("extra", {}))
    info = answer["info"]
    return ModelInfo(info["format"], inputs=info["inputs"], outputs=info["outputs"], details=info["details"])
