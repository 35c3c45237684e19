"""What a quantize step's search judges its candidates by (`Promise`): the accuracy guard (top-1
criteria on the first output), the job's safety floor (the task's fidelity figures against the
float model: worker/engine/tasks/, modelpress/spec/floor.py), or both. Used by guard.py's search
and its rungs."""

from dataclasses import dataclass
from typing import Any

import numpy as np

from modelpress.spec.configs import GuardSpec
from modelpress.spec.floor import margin
from worker.engine.data import ImageSet
from worker.engine.evaluate import open_session, run_outputs
from worker.engine.fidelity import top1_agreement
from worker.engine.tasks.floor import overrides_of
from worker.engine.tasks.measure import task_fidelity


@dataclass(frozen=True)
class Promise:
    """What a candidate is judged by: the accuracy guard (top-1 criteria on the first output), the
    job's safety floor (its task's fidelity figures against the float model), or both."""

    guard: GuardSpec | None
    task: dict | None = None
    floor: Any = "off"

    def score(self, path, data: ImageSet, reference: list[np.ndarray]) -> dict:
        return self.score_outputs(run_outputs(open_session(path, threads=1), data.images), data.labels, reference)

    def score_outputs(self, outputs: list[np.ndarray], labels: np.ndarray | None, reference: list[np.ndarray]) -> dict:
        score: dict = {}
        if self.guard is not None:
            score["top1_agreement"] = top1_agreement(reference[0], outputs[0])
            if labels is not None:
                score["accuracy"] = float(np.mean(outputs[0].argmax(1) == labels[: len(outputs[0])]))
        if self.floor != "off":
            overrides = overrides_of(self.floor)
            task = task_fidelity(reference, outputs, given=self.task, floor_overrides=overrides)
            slack = None if task.get("fidelity") is None else margin(task["task"]["type"], task["fidelity"], overrides)
            if slack is not None:  # a task with a floor, measured: else the floor judges nothing here
                score["floor"] = {"task": task["task"]["type"], "margin": slack, "shortfalls": task["floor_shortfalls"]}
        return score

    def meets(self, score: dict, original: dict) -> bool:
        floor_met = "floor" not in score or not score["floor"]["shortfalls"]
        return floor_met and (self.guard is None or _guard_meets(score, original, self.guard))

    def value(self, score: dict) -> tuple:
        """Higher is better: a candidate meeting the floor first, then the guard's figure, then the
        floor's margin."""
        floor = score.get("floor")
        floor_met, slack = (True, 0.0) if floor is None else (not floor["shortfalls"], floor["margin"])
        guard_value = 0.0 if self.guard is None else (
            score["top1_agreement"] if self.guard.min_top1_agreement is not None else score["accuracy"])
        return floor_met, guard_value, slack


def _guard_meets(score: dict, original: dict, guard: GuardSpec) -> bool:
    if guard.min_top1_agreement is not None:
        return score["top1_agreement"] >= guard.min_top1_agreement
    if guard.min_accuracy is not None:
        return score["accuracy"] >= guard.min_accuracy
    return original["accuracy"] - score["accuracy"] <= guard.max_accuracy_drop + 1e-12
