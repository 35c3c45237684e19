"""The repair ladder's per-tensor precision rung: which quantized tensors break the task, and the
fewest of them to move up (an activation to 16 bits, a weight to float) for the promise to hold.

1. Statistics collected once: the base is the best candidate so far, a QDQ model whose scales its
   own calibration set. Nothing is calibrated again: every variant below is a graph edit of it
   (worker/engine/quantize/tensor_precision.py).
2. Sensitivity of every quantized tensor (each QuantizeLinear's input: Conv, Concat, Add, Mul,
   Sigmoid/HardSigmoid, Softmax and the model's outputs alike, and every int8 weight): the base
   with only that tensor quantized and the rest float, judged by the promise (the floor's task
   fidelity margin, or the guard's figure) against the float model on RANK_SAMPLES tuning images,
   ties broken by the first output's SQNR. Only-this-one, not all-but-this-one: on the bench
   recognizer (CTC exact match 0.92 as built, 0.9675 with every activation at 16 bits, 0.9125 with
   every weight float) no single tensor mends the strings by itself, and leaving one out moved
   exact match by noise (0.89..0.93), while the damage each tensor does alone ranks cleanly
   (0.955 for the classifier's output down to 1.0 for the hard-sigmoids).
3. Greedy: the most sensitive tensors move up one at a time, the cumulative model judged on all
   the tuning images, until the promise holds, MAX_MOVES, or the deadline. Up to MAX_MOVES + the
   tensor count short runs, no calibration.

The decision is values, `{"tensor_precision": {key: "int16" | "float"}}`: static_int8 applies them
to the same build, so the ladder's candidate, the artifact and a replay of the recipe are the same
bytes.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from worker.engine.evaluate import open_session, run_outputs
from worker.engine.quantize.layers import sqnr_db
from worker.engine.quantize.tensor_precision import apply_precision, float_weights, quantized_tensors

RANK_SAMPLES = 128  # tuning images each tensor's sensitivity is measured on
MAX_MOVES = 64  # tensors moved up at most (each costs one run on the tuning images)
MAX_TENSORS = 400  # tensors ranked at most (each costs one run on RANK_SAMPLES images)
REPORTED = 10  # most sensitive tensors listed in the metrics

# (outputs, reference outputs, how many images) -> (meets the promise, value: higher is better)
Judge = Callable[[list[np.ndarray], list[np.ndarray], int], tuple[bool, tuple]]


@dataclass(frozen=True)
class PrecisionRung:
    base: Path  # the best candidate so far (a QDQ model)
    float_model: Path  # the float model it was quantized from: where a weight moved to float comes from
    judge: Judge
    images: np.ndarray  # the tuning images
    reference: list[np.ndarray]  # the float model's outputs on them
    deadline: float  # time.monotonic() past which no more variant is run

    def decide(self) -> tuple[dict[str, str], dict]:
        """(the chosen precisions, a report: the most sensitive tensors and each move's figure)."""
        started = time.monotonic()
        model = onnx.load(str(self.base))
        tensors = quantized_tensors(model)[:MAX_TENSORS]
        weights = float_weights(onnx.load(str(self.float_model)), [t["tensor"] for t in tensors if t["kind"] == "weight"])
        movable = [t for t in tensors if t["kind"] == "activation" or t["tensor"] in weights]
        ranked = self.rank(model, movable, weights)
        choices, moves, meets = {}, [], False
        for tensor in ranked[:MAX_MOVES]:
            if time.monotonic() > self.deadline:
                break
            choices[tensor["tensor"]] = "int16" if tensor["kind"] == "activation" else "float"
            meets, value = self.run(apply_precision(model, choices, weights), len(self.images))
            moves.append({"tensor": tensor["tensor"], "to": choices[tensor["tensor"]], "value": _rounded(value)})
            if meets:
                break
        report = {"tensors": len(tensors), "rank_samples": min(RANK_SAMPLES, len(self.images)),
                  "most_sensitive": ranked[:REPORTED], "moves": moves, "seconds": round(time.monotonic() - started, 2)}
        return (choices if moves and meets else {}), report

    def rank(self, model: onnx.ModelProto, tensors: list[dict], weights: dict) -> list[dict]:
        """Most sensitive first: the promise's value with only that tensor quantized, lowest first."""
        every_float = {t["tensor"]: "float" for t in tensors}
        scored = []
        for tensor in tensors:
            if time.monotonic() > self.deadline:
                break
            alone = {key: precision for key, precision in every_float.items() if key != tensor["tensor"]}
            outputs = self.outputs(apply_precision(model, alone, weights), RANK_SAMPLES)
            _, value = self.judge(outputs, [r[: len(outputs[0])] for r in self.reference], len(outputs[0]))
            sqnr = sqnr_db(self.reference[0][: len(outputs[0])], outputs[0].astype(np.float32))
            scored.append({**tensor, "value_alone": _rounded(value), "sqnr_db_alone": round(min(sqnr, 999.0), 3)})
        return sorted(scored, key=lambda t: (t["value_alone"], t["sqnr_db_alone"], t["tensor"]))

    def outputs(self, model: onnx.ModelProto, count: int) -> list[np.ndarray]:
        return run_outputs(open_session(model.SerializeToString(), threads=1), self.images[:count])

    def run(self, model: onnx.ModelProto, count: int) -> tuple[bool, tuple]:
        outputs = self.outputs(model, count)  # a fixed-batch model may leave a short last batch out
        return self.judge(outputs, [r[: len(outputs[0])] for r in self.reference], len(outputs[0]))


def _rounded(value: tuple) -> list:
    return [round(v, 6) if isinstance(v, float) else v for v in value]
