"""Importance criteria of channel pruning: one small class per criterion, chosen by name from the
prune config (`importance`), apart from the driver that uses the scores (as Torch-Pruning keeps
its `Importance` classes apart from its pruners).

Every criterion scores a channel of a prunable group the same way: the mean over every weight
slice that carries it (producers' rows, consumers' columns), each slice's per-position scores
divided by their mean first, so every weight counts alike whatever its scale (a wide Linear's
columns would otherwise outweigh a convolution's rows). A criterion says which slices it reads
and what one position of a slice scores. One that needs gradients says so (`needs_gradients`);
the driver then computes them (`TaylorImportance.gradients`) and hands them in.
"""

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
from onnx import numpy_helper

from worker.engine import stoppable
from worker.engine.prune.groups import ChannelGraph, Slice

TAYLOR_SAMPLES = 512  # calibration samples whose gradients the Taylor criterion sums
TAYLOR_BATCH = 64

Scores = dict[int, np.ndarray]  # root group -> a score per channel


class Importance(ABC):
    name: ClassVar[str]
    needs_gradients: ClassVar[bool] = False

    def reads(self, graph: ChannelGraph, slice_: Slice) -> bool:
        """Whether this slice counts: weights, not BatchNorm statistics or per-channel constants."""
        return slice_.role != "param"

    @abstractmethod
    def position_scores(self, weights: np.ndarray, slice_: Slice, gradients: dict[str, np.ndarray] | None) -> np.ndarray | None:
        """A score per position of the slice; `weights` is [positions, everything else]. None:
        the slice gives no score (a weight without gradient)."""

    def scores(self, graph: ChannelGraph, gradients: dict[str, np.ndarray] | None = None) -> Scores:
        scores, counts = self._accumulate(graph, gradients)
        return {r: scores[r] / np.maximum(counts[r], 1) for r in scores}

    def _accumulate(self, graph: ChannelGraph, gradients) -> tuple[Scores, Scores]:
        inits = {t.name: t for t in graph.model.graph.initializer}
        roots = graph.prunable()
        scores = {r: np.zeros(graph.groups[r].size) for r in roots}
        counts = {r: np.zeros(graph.groups[r].size) for r in roots}
        arrays: dict[str, np.ndarray] = {}
        for slice_ in graph.slices:
            if not self.reads(graph, slice_):
                continue
            array = arrays.get(slice_.initializer)
            if array is None:
                array = arrays[slice_.initializer] = numpy_helper.to_array(inits[slice_.initializer]).astype(np.float64)
            moved = np.moveaxis(array, slice_.axis, 0).reshape(array.shape[slice_.axis], -1)
            per_position = self.position_scores(moved, slice_, gradients)
            if per_position is None:
                continue
            per_position = per_position / max(float(per_position.mean()), 1e-12)
            cmap = slice_.channel_map
            for gid in np.unique(cmap[:, 0]):
                if gid < 0 or graph.root(int(gid)) not in scores:
                    continue
                root = graph.root(int(gid))
                where = cmap[:, 0] == gid
                np.add.at(scores[root], cmap[where, 1], per_position[where])
                np.add.at(counts[root], cmap[where, 1], 1)
        return scores, counts


class MagnitudeImportance(Importance):
    """The Lp norm of each channel's weights (p = 1 or 2)."""

    def __init__(self, p: int):
        self.p = p
        self.name = f"l{p}"

    def position_scores(self, weights, slice_, gradients):
        if self.p == 1:
            return np.abs(weights).sum(axis=1)
        return np.sqrt((weights**2).sum(axis=1))


class BNScaleImportance(Importance):
    """|gamma| of the BatchNorm nodes of a group (network slimming); groups without one (BatchNorm
    folded into the convolution by the export) are scored by L2 magnitude instead."""

    name = "bn_scale"

    def reads(self, graph, slice_):
        return slice_.initializer in {n.input[1] for n in graph.model.graph.node if n.op_type == "BatchNormalization"}

    def position_scores(self, weights, slice_, gradients):
        return np.abs(weights).sum(axis=1)

    def scores(self, graph, gradients=None):
        scores, counts = self._accumulate(graph, gradients)
        missing = [r for r in scores if not counts[r].any()]
        if missing:
            fallback = MagnitudeImportance(2).scores(graph)
            for r in missing:
                scores[r], counts[r] = fallback[r], np.ones_like(fallback[r])
        return {r: scores[r] / np.maximum(counts[r], 1) for r in scores}


class TaylorImportance(Importance):
    """|w * dL/dw| summed over each channel's weights: the first-order estimate of how much the loss
    changes when the channel goes. Needs the gradients of a few calibration batches."""

    name = "taylor"
    needs_gradients = True

    def position_scores(self, weights, slice_, gradients):
        grad = (gradients or {}).get(slice_.initializer)
        if grad is None:
            return None
        grad = np.moveaxis(grad.astype(np.float64), slice_.axis, 0).reshape(weights.shape)
        return np.abs(weights * grad).sum(axis=1)

    @staticmethod
    def gradients(path: Path, data, device: str) -> dict[str, np.ndarray]:
        """dL/dw of every weight of the model at `path` over up to TAYLOR_SAMPLES samples; without
        labels the loss is the cross-entropy against the model's own predictions."""
        import torch
        from torch.nn import functional as F

        from worker.engine.onnx_torch import onnx_to_torch

        module = onnx_to_torch(path).to(device)
        images = torch.from_numpy(data.images[:TAYLOR_SAMPLES])
        labels = None if data.labels is None else torch.from_numpy(data.labels[:TAYLOR_SAMPLES])
        for start in range(0, len(images), TAYLOR_BATCH):
            stoppable.check()  # between batches: a torch forward/backward cannot be stopped
            batch = images[start : start + TAYLOR_BATCH].to(device)
            logits = module(batch)
            logits = logits[0] if isinstance(logits, tuple) else logits
            target = labels[start : start + TAYLOR_BATCH].to(device) if labels is not None else logits.detach().argmax(1)
            F.cross_entropy(logits, target, reduction="sum").backward()
        inverse = {key: name for name, key in module.keys.items()}
        return {inverse[key]: p.grad.detach().cpu().numpy() for key, p in module.weights.items() if p.grad is not None}


CRITERIA: dict[str, Importance] = {c.name: c for c in (MagnitudeImportance(1), MagnitudeImportance(2), BNScaleImportance(),
                                                        TaylorImportance())}


def by_name(name: str) -> Importance:
    """The criterion a prune config names (ChannelPruneConfig.importance)."""
    return CRITERIA[name]
