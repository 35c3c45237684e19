"""What the task sees: a few eval images with the original's and the compressed model's answers
drawn (boxes, masks, strings, top-1, cosine), picked where the two differ most by the task's own
measure, plus one where they agree. PNG files beside metadata of what was drawn (`metrics.examples`,
docs/METRICS.md); the report embeds them. Drawing only reports: a failure is recorded, never the job's."""

import hashlib
from pathlib import Path

import numpy as np

from modelpress.spec.configs.task import parse_task
from worker.engine.examples import draw
from worker.engine.examples.by_task import SHOWN

MAX_EXAMPLES = 4
# The eval images searched for the informative ones: bounds the extra decoding (a detector's NMS is
# the cost) whatever the eval set's size. Measured in docs/METRICS.md ("Example images").
MAX_SCANNED = 256
COLOURS = {"original": "#%02x%02x%02x" % draw.ORIGINAL, "compressed": "#%02x%02x%02x" % draw.COMPRESSED,
           "differs": "#%02x%02x%02x" % draw.DIFFERS}


def informative(disagreement: np.ndarray, content: np.ndarray, limit: int = MAX_EXAMPLES) -> list[int]:
    """Up to `limit - 1` (at least one) images where the models differ most (disagreement > 0, largest
    first), then the ones that agree best to fill up; ties: the most content first (e.g. detections)."""
    by_difference = np.lexsort((np.arange(len(disagreement)), -content, -disagreement))
    differing = [int(i) for i in by_difference if disagreement[i] > 0][:max(1, limit - 1)]
    by_agreement = np.lexsort((np.arange(len(disagreement)), -content, disagreement))
    agreeing = [int(i) for i in by_agreement if int(i) not in differing]
    return differing + agreeing[:limit - len(differing)]


def task_examples(task: dict, images: np.ndarray, reference: list[np.ndarray], candidate: list[np.ndarray],
                  out_dir: Path, limit: int = MAX_EXAMPLES) -> dict:
    """{"task", "scanned", "images": [metadata, ...], "colours"} with `out_dir/<i>.png` written, or {"note"} when the
    task has nothing to show, or {"error"} when drawing failed."""
    try:
        parsed = parse_task(task)
        shown = SHOWN.get(parsed.type)
        if shown is None:
            return {"images": [], "note": f"nothing is drawn for a {parsed.type} task"}
        count = min(len(images), len(reference[0]), MAX_SCANNED)
        # Views, not float64 copies: a detector's raw outputs of 256 images can be a gigabyte in float64.
        measured = shown(parsed, images[:count], [r[:count] for r in reference], [c[:count] for c in candidate])
        drawn = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for index in informative(*measured.disagreement(), limit=limit):
            meta, picture = measured.example(index)
            saved = draw.png(picture)
            if saved is None:
                continue  # not even a small drawing fits the bound: left out rather than bloat the report
            data, stored = saved
            number = len(drawn)
            (out_dir / f"{number}.png").write_bytes(data)
            drawn.append({"index": index, "file": f"examples/{number}.png", "element_id": f"example-{number}",
                          "png_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "width": stored.width,
                          "height": stored.height, "reduced": round(stored.width / picture.width, 4), **meta})
        return {"task": parsed.type, "scanned": count, "images": drawn, "colours": COLOURS}
    except Exception as exc:  # noqa: BLE001 — a picture must never cost the job its result
        return {"error": f"{exc.__class__.__name__}: {str(exc)[:500]}"}
