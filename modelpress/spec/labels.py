"""Task labels in a dataset, beyond class ids: what each kind holds, its bounds, and whether a
dataset's labels fit a job's task and model (pure logic on the summary stored at upload, no arrays).

Used twice: by the API to refuse a job whose labels cannot be scored (422 labels_do_not_fit_task),
and by the worker, which scores only labels that fit.

Kinds, as .npz arrays (all optional, loaded with allow_pickle=False):
- boxes: `boxes` (K, 4) float x1, y1, x2, y2 in the model's input pixels, `box_classes` (K,) int,
  `box_images` (K,) int, the index of the image each box belongs to.
- masks: `masks` (N, H, W) int class ids; IGNORE_INDEX marks pixels that count for nothing.
- sequences: `label_sequences` (N, L) int class ids (the blank excluded), padded with -1.
- texts: `texts` (N,) unicode strings, read through the task's `alphabet`: the alphabet lists the
  non-blank classes in class-id order, skipping the blank (blank 0, alphabet "ab": a = 1, b = 2;
  blank 2, alphabet "ab": a = 0, b = 1).
- pairs: `pairs` (P, 2) int image indices, `pair_same` (P,) bool or 0/1.
- keypoints: `keypoints` (N, K, 2) or (N, K, 3) float, x, y in the units of the model's decoded
  keypoints (its output's units; heatmap cells for a heatmaps layout), then COCO's visibility
  (0: not labelled, not scored; 1 or 2: labelled).
"""

from pydantic import BaseModel

from modelpress.spec.configs.task import infer_task, parse_task
from modelpress.spec.shapes import model_layout

IGNORE_INDEX = 255
MAX_BOXES = 1_000_000
MAX_SEQUENCE_LENGTH = 1024
MAX_TEXT_LENGTH = 1024
MAX_PAIRS = 1_000_000
# The evaluation runs the models on at most this many images (worker/engine/evaluate.py): a pair
# or box beyond them is never scored.
MAX_EVAL_SAMPLES = 2000

# The task each label kind scores.
TASK_OF_KIND = {"boxes": "detection", "masks": "segmentation", "sequences": "ctc", "texts": "ctc", "pairs": "embedding",
                "keypoints": "keypoints"}


def kinds(has_labels: bool, labels: dict | None) -> list[str]:
    """The label kinds a dataset carries: "classes" (the `labels` array) and those of TASK_OF_KIND."""
    return (["classes"] if has_labels else []) + sorted(labels or {})


def text_ids(alphabet: str, blank: int) -> dict[str, int]:
    """Each alphabet character's class id: the non-blank classes in order, the blank skipped."""
    return {char: index if index < blank else index + 1 for index, char in enumerate(alphabet)}


def _known(value) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def _boxes_misfit(task, summary: dict, input_shape, output_shapes) -> str | None:
    if task.decoder.kind == "yolo":
        shape = output_shapes[(task.outputs or [0])[0]] if output_shapes else None
        rows = None
        if shape is not None and len(shape) == 3:
            rows = _known(shape[1] if task.decoder.layout == "channels_first" else shape[2])
        classes = None if rows is None else rows - (5 if task.decoder.objectness else 4)
    else:
        shape = output_shapes[task.decoder.scores_output] if task.decoder.scores_output < len(output_shapes) else None
        classes = _known(shape[-1]) if shape else None
    if classes is not None and summary["max_class"] >= classes:
        return f"a box has class id {summary['max_class']}, but the model scores {classes} classes"
    if summary.get("in_image"):
        return None  # COCO boxes of an image zip: checked against their own image, scaled with it
    target = model_layout(input_shape) if input_shape and len(input_shape) == 4 else None
    if summary["min_x"] < 0 or summary["min_y"] < 0:
        return f"a box starts outside the image (x1 {summary['min_x']}, y1 {summary['min_y']}): boxes are in input pixels"
    if target is not None and target.width and summary["max_x"] > target.width:
        return f"a box reaches x2 = {summary['max_x']}, beyond the model's input width {target.width}"
    if target is not None and target.height and summary["max_y"] > target.height:
        return f"a box reaches y2 = {summary['max_y']}, beyond the model's input height {target.height}"
    return None


def _masks_misfit(task, summary: dict, output_shapes) -> str | None:
    shape = output_shapes[(task.outputs or [0])[0]] if output_shapes else None
    if shape is None:
        return None
    hw = list(shape[2:4] if task.layout == "logits" else shape[1:3])
    if all(_known(d) for d in hw) and hw != [summary["height"], summary["width"]]:
        return f"the masks are {summary['height']}x{summary['width']}, but the model's masks are {hw[0]}x{hw[1]}"
    classes = _known(shape[1]) if task.layout == "logits" and len(shape) == 4 else None
    if classes is not None and summary["max_class"] is not None and summary["max_class"] >= classes:
        return f"a mask has class id {summary['max_class']}, but the model scores {classes} classes"
    return None


def _ctc_misfit(task, kind: str, summary: dict, output_shapes) -> str | None:
    shape = output_shapes[(task.outputs or [0])[0]] if output_shapes else None
    classes = _known(shape[2]) if shape is not None and len(shape) == 3 else None
    if kind == "texts":
        if task.alphabet is None:
            return "the data carries texts, but the task has no alphabet to read them with"
        missing = sorted(set(summary["characters"]) - set(task.alphabet))
        if missing:
            return f"texts hold characters not in the task's alphabet: {''.join(missing[:20])!r}"
        ids = text_ids(task.alphabet, task.blank)
        largest = max((ids[c] for c in summary["characters"]), default=None)
    else:
        if task.blank in summary["ids"]:
            return f"a label sequence holds class id {task.blank}, the task's blank"
        largest = max(summary["ids"], default=None)
    if classes is not None and largest is not None and largest >= classes:
        return f"a label holds class id {largest}, but the model scores {classes} classes (blank included)"
    return None


def _pairs_misfit(summary: dict, count: int) -> str | None:
    scored = min(count, MAX_EVAL_SAMPLES)
    if summary["max_index"] >= scored:
        return f"a pair names image {summary['max_index']}, but the evaluation runs on the first {scored} images"
    return None


def keypoint_summary(keypoints) -> dict:
    """What the fit check reads of `keypoints` labels (N, K, 2|3): K, and the labelled keypoints' extent."""
    import numpy as np  # here, not at the top: the client imports this module and needs no numpy

    labelled = np.ones(keypoints.shape[:2], bool) if keypoints.shape[2] < 3 else keypoints[:, :, 2] > 0
    points = keypoints[:, :, :2][labelled]
    bounds = ({"min_x": float(points[:, 0].min()), "min_y": float(points[:, 1].min()),
               "max_x": float(points[:, 0].max()), "max_y": float(points[:, 1].max())} if len(points) else {})
    return {"count": int(len(keypoints)), "keypoints": int(keypoints.shape[1]), "columns": int(keypoints.shape[2]),
            "labelled": int(labelled.sum()), **bounds}


def _keypoints_misfit(task, summary: dict, output_shapes) -> str | None:
    """The labels' K against the model's (the task's `keypoints`, else the output's K); for heatmaps
    the labelled keypoints must lie on the maps."""
    shape = output_shapes[(task.outputs or [0])[0]] if output_shapes else None
    count = task.keypoints
    if count is None and shape is not None and len(shape) in (3, 4):
        count = _known(shape[1])
    if count is not None and summary["keypoints"] != count:
        return f"the labels have {summary['keypoints']} keypoints per image, but the model has {count}"
    if task.layout == "heatmaps" and shape is not None and len(shape) == 4 and summary.get("max_x") is not None:
        height, width = _known(shape[2]), _known(shape[3])
        if summary["min_x"] < 0 or summary["min_y"] < 0 or (width and summary["max_x"] > width) or (height and summary["max_y"] > height):
            return (f"a labelled keypoint lies outside the {height}x{width} heatmaps (x {summary['min_x']}..{summary['max_x']}, "
                    f"y {summary['min_y']}..{summary['max_y']}): heatmap labels are in map cells")
    return None


def labels_misfit(task: dict | BaseModel | None, labels: dict | None, *, count: int,
                  input_shape: list | None, output_shapes: list) -> str | None:
    """Why a dataset's labels for its task cannot be scored on this model, or None. `task` None:
    the task inferred from the output shapes. Labels of other tasks' kinds are not read (None)."""
    if not labels:
        return None
    if task is None:
        task = infer_task([tuple(s) if s else () for s in output_shapes]).task
    elif isinstance(task, dict):
        task = parse_task(task)
    for kind, summary in sorted(labels.items()):
        if TASK_OF_KIND.get(kind) != task.type:
            continue
        if kind == "boxes":
            problem = _boxes_misfit(task, summary, input_shape, output_shapes)
        elif kind == "masks":
            problem = _masks_misfit(task, summary, output_shapes)
        elif kind in ("sequences", "texts"):
            problem = _ctc_misfit(task, kind, summary, output_shapes)
        elif kind == "keypoints":
            problem = _keypoints_misfit(task, summary, output_shapes)
        else:
            problem = _pairs_misfit(summary, count)
        if problem is not None:
            return problem
    return None
