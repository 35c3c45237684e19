"""inspect_dataset run in service.sandbox: zip and .npy parsing and Pillow's decoding of every
image happen in a limited child, so a decompression bomb or a decoder bug costs a 422."""

from dataclasses import dataclass
from pathlib import Path

from service import sandbox
from service.confine import Confinement
from service.datasets.inspect import DatasetInfo

ENTRY = "service.datasets.inspect_entry"


@dataclass(frozen=True)
class DatasetBounds:
    max_bytes: int
    max_samples: int
    max_image_pixels: int


class SandboxedDatasetReader:
    """The API's dataset inspection: each upload read by a warm child that serves it alone."""

    def __init__(self, *, limits: sandbox.Limits, spares: int = 1, confinement: Confinement | None = None):
        self._sandbox = sandbox.WarmSandbox(ENTRY, limits=limits, spares=spares, confinement=confinement)

    def start(self) -> None:
        self._sandbox.start()

    def close(self) -> None:
        self._sandbox.close()

    def idle_pids(self) -> list[int]:
        return self._sandbox.idle_pids()

    def inspect(self, path: Path, *, bounds: DatasetBounds, layout: str | None) -> DatasetInfo:
        args = [str(path.resolve()), str(bounds.max_bytes), str(bounds.max_samples), str(bounds.max_image_pixels),
                layout or ""]
        info = sandbox.answer_or_refuse(lambda: self._sandbox.run_json(args, inputs=(path.resolve(),)), subject="dataset", code_prefix="dataset")
        return DatasetInfo(**info)
