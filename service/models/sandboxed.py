"""inspect_model run in service.sandbox: a hostile upload costs one limited child, not the API."""

from pathlib import Path

from service import sandbox
from service.errors import Invalid
from service.models.inspect import ModelInfo

ENTRY = "service.models.inspect_entry"


class SandboxedModelReader:
    """The API's model inspection: each upload read by a warm child that serves it alone (built
    once by create_app, started and closed with the app)."""

    def __init__(self, *, limits: sandbox.Limits, spares: int = 1):
        self._sandbox = sandbox.WarmSandbox(ENTRY, limits=limits, spares=spares)

    def start(self) -> None:
        self._sandbox.start()

    def close(self) -> None:
        self._sandbox.close()

    def idle_pids(self) -> list[int]:
        return self._sandbox.idle_pids()

    def inspect(self, path: Path, *, max_unpacked_bytes: int) -> ModelInfo:
        return _answer(lambda: self._sandbox.run_json(_args(path, max_unpacked_bytes)))


def inspect_model_sandboxed(path: Path, *, max_unpacked_bytes: int, limits: sandbox.Limits) -> ModelInfo:
    """One cold child for this call (the imports paid each time)."""
    argv = sandbox.python_module(ENTRY, *_args(path, max_unpacked_bytes))
    return _answer(lambda: sandbox.run_json(argv, limits=limits))


def _args(path: Path, max_unpacked_bytes: int) -> list[str]:
    return [str(path.resolve()), str(max_unpacked_bytes)]


def _answer(run) -> ModelInfo:
    try:
        answer = run()
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
