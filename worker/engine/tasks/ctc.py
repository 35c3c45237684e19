"""CTC agreement: greedy-decoded strings of the compressed model against the original's."""

import numpy as np


def greedy_decode(output: np.ndarray, *, blank: int = 0, layout: str = "NTC") -> list[tuple[int, ...]]:
    """Best class per time step, repeats collapsed, blanks dropped; one label sequence per item."""
    best = (output if layout == "NTC" else np.swapaxes(output, 0, 1)).argmax(axis=2)
    decoded = []
    for steps in best:
        collapsed = [int(c) for i, c in enumerate(steps) if i == 0 or c != steps[i - 1]]
        decoded.append(tuple(c for c in collapsed if c != blank))
    return decoded


def edit_distance(a: tuple, b: tuple) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def string_agreement(reference: list[tuple], candidate: list[tuple]) -> dict:
    """Exact-match fraction and character error rate, the original's strings as the truth."""
    exact = sum(r == c for r, c in zip(reference, candidate, strict=True))
    chars = sum(len(r) for r in reference)
    errors = sum(edit_distance(r, c) for r, c in zip(reference, candidate, strict=True))
    return {"exact_match": exact / len(reference) if reference else 1.0,
            "cer": errors / chars if chars else float(errors > 0)}
