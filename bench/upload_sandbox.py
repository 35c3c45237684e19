"""Upload inspection in the API process vs in the sandboxed child (`python -m bench.upload_sandbox`).

Prints a table: median wall time of `inspect_model` in-process, through a cold sandboxed child
(started per call, imports onnx each time) and through the API's warm child (SandboxedModelReader:
onnx imported before the upload arrives; the next child starts in the background while the bench
waits for it, as an upload would wait for its user), and through a warm child in its own
namespaces (service/confine.py: the upload hard-linked into its folder; "n/a" where the kernel
refuses them), on a small one-node ONNX and a ~100 MiB one (a float32 weight of zeros), with the
default limits.
"""

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service import confine
from service.config import Settings
from service.models.inspect import inspect_model
from service.models.sandboxed import SandboxedModelReader, inspect_model_sandboxed


def onnx_of_size(megabytes: float) -> bytes:
    weight = numpy_helper.from_array(np.zeros(max(1, int(megabytes * 1024**2 / 4)), np.float32), "w")
    node = helper.make_node("Add", ["x", "w"], ["y"])
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [weight.dims[0]])  # noqa: E731
    graph = helper.make_graph([node], "bench", [value("x")], [value("y")], [weight])
    buffer = io.BytesIO()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), buffer)
    return buffer.getvalue()


def median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    limits = Settings().model_parse_limits
    with tempfile.TemporaryDirectory() as folder:  # stands for the data folder
        confinement = confine.Confinement.of(folder, inbox_root=Path(folder) / "tmp" / "sandbox")
        readers = [SandboxedModelReader(limits=limits)]
        if confine.available(confinement):
            readers.append(SandboxedModelReader(limits=limits, confinement=confinement))
        for reader in readers:
            reader.start()

        def warm(reader: SandboxedModelReader, path: Path) -> float:
            wait_until_warm(reader)
            return median_ms(lambda: inspect_with(reader, path), 1)

        print("| model | size MiB | in-process ms | cold child ms | warm child ms | warm confined ms | warm added ms |")
        print("|---|---|---|---|---|---|---|")
        try:
            for label, megabytes in (("small", 0.01), ("~100 MiB", 100)):
                path = Path(folder) / f"{megabytes}.onnx"
                path.write_bytes(onnx_of_size(megabytes))
                direct = median_ms(lambda: inspect_model(path), args.repeats)
                cold = median_ms(lambda: inspect_model_sandboxed(path, max_unpacked_bytes=2**32, limits=limits), args.repeats)
                hot = [statistics.median(warm(reader, path) for _ in range(args.repeats)) for reader in readers]
                confined = f"{hot[1]:.1f}" if len(hot) > 1 else "n/a"
                size = path.stat().st_size / 1024**2
                print(f"| {label} | {size:.2f} | {direct:.1f} | {cold:.1f} | {hot[0]:.1f} | {confined} | {hot[0] - direct:+.1f} |")
        finally:
            for reader in readers:
                reader.close()


def inspect_with(reader: SandboxedModelReader, path: Path) -> None:
    reader.inspect(path, max_unpacked_bytes=2**32)


def wait_until_warm(reader: SandboxedModelReader) -> None:
    """Until the waiting child has done its imports: then it sleeps in read(), its CPU time still."""
    while not reader.idle_pids():
        time.sleep(0.01)
    pid, last = reader.idle_pids()[0], -1
    while True:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        state, cpu_ticks = fields[0], int(fields[11]) + int(fields[12])
        if state == "S" and cpu_ticks == last:
            return
        last = cpu_ticks
        time.sleep(0.25)

if __name__ == "__main__":
    main()
