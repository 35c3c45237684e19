"""inspect_model run in service.sandbox: a hostile upload costs one limited child, not the API."""

from pathlib import Path

from service import sandbox
from service.confine import Confinement
from service.models.inspect import ModelInfo

ENTRY = "service.models.inspect_entry"


class SandboxedModelReader:
    """The API's model inspection: each upload read by a warm child that serves it alone (built
    once by create_app, started and closed with the app)."""

    def __init__(self, *, limits: sandbox.Limits, spares: int = 1, confinement: Confinement | None = None):
        self._sandbox = sandbox.WarmSandbox(ENTRY, limits=limits, spares=spares, confinement=confinement)

    def start(self) -> None:
        self._sandbox.start()

    def close(self) -> None:
        self._sandbox.close()

    def idle_pids(self) -> list[int]:
        return self._sandbox.idle_pids()

    def inspect(self, path: Path, *, max_unpacked_bytes: int) -> ModelInfo:
        return _answer(lambda: self._sandbox.run_json(_args(path, max_unpacked_bytes), inputs=(path.resolve(),)))


def inspect_model_sandboxed(path: Path, *, max_unpacked_bytes: int, limits: sandbox.Limits) -> ModelInfo:
    """One cold child for this call (the imports paid each time)."""
    argv = sandbox.python_module(ENTRY, *_args(path, max_unpacked_bytes))
    return _answer(lambda: sandbox.run_json(argv, limits=limits))


def _args(path: Path, max_unpacked_bytes: int) -> list[str]:
    return [str(path.resolve()), str(max_unpacked_bytes)]


def _answer(run) -> ModelInfo:
    info = sandbox.answer_or_refuse(run, subject="model", code_prefix="model")
    return ModelInfo(info["format"], inputs=info["inputs"], outputs=info["outputs"], details=info["details"])
