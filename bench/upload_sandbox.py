"""Upload inspection in the API process vs in the sandboxed child (`python -m bench.upload_sandbox`).

Prints a table: median wall time of `inspect_model` in-process and through service.sandbox, on a
small one-node ONNX and a ~100 MiB one (a float32 weight of zeros), with the default limits.
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

from service.config import Settings
from service.models.inspect import inspect_model
from service.models.sandboxed import inspect_model_sandboxed


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
    print("| model | size MiB | in-process ms | sandboxed ms | added ms |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for label, megabytes in (("small", 0.01), ("~100 MiB", 100)):
            path = Path(folder) / f"{megabytes}.onnx"
            path.write_bytes(onnx_of_size(megabytes))
            direct = median_ms(lambda: inspect_model(path), args.repeats)
            boxed = median_ms(lambda: inspect_model_sandboxed(path, max_unpacked_bytes=2**32, limits=limits), args.repeats)
            size = path.stat().st_size / 1024**2
            print(f"| {label} | {size:.2f} | {direct:.1f} | {boxed:.1f} | {boxed - direct:+.1f} |")


if __name__ == "__main__":
    main()
