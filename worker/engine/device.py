"""Where torch work runs: CUDA when the worker has a GPU, the CPU otherwise. Steps that train
(distillation, QAT, fine-tuning) take their device from here; ONNX Runtime evaluation stays on the
CPU so latencies are comparable between jobs."""

from functools import lru_cache


@lru_cache
def pick_device() -> str:
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_name() -> str | None:
    if pick_device() != "cuda":
        return None
    import torch

    return torch.cuda.get_device_name(0)
