"""The `prune` step, by concern:

step.py          the driver: iterations, quality before / after pruning / after recovery, metrics
unstructured.py  magnitude and n_m (weights zeroed in place)
channels.py      structured channel pruning: keep counts, ratio search, the pruned graph checked
channel_graph.py which channels must go together, and cutting them (the walk)
op_handlers.py   what each ONNX operator does to channels: one handler per op kind, in a table
groups.py        what the walk finds: groups, weight slices
importance.py    importance criteria, one class each (L1/L2 magnitude, BN scale, Taylor)
recovery.py      recovery fine-tuning through training.fit
"""

from worker.engine.prune.step import prune

__all__ = ["prune"]
