"""What a model is for: the task its outputs answer, given at upload or on a job (`"task": {...}`).

A discriminated union on `type`. A body that names no task gets one inferred from the output
shapes (`infer_task`), with the reason stated, so the report can say why it judged the model as
it did and the user can override it. Torch-free: the API validates with it, the worker measures.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

# Bounds: no task names more classes, anchors or outputs than this.
MAX_CLASSES = 100_000
MAX_OUTPUTS = 64
MAX_KEYPOINTS = 1024


class _Task(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # Which model output(s) this task reads; None means the first output (or the head as a whole).
    outputs: list[Annotated[int, Field(ge=0, lt=MAX_OUTPUTS)]] | None = Field(default=None, max_length=MAX_OUTPUTS)


class ClassificationTask(_Task):
    type: Literal["classification"] = "classification"


class YoloDecoder(BaseModel):
    """One output (N, 4+C[+1], A) or (N, A, 4+C[+1]): box rows in pixels, then (objectness,) scores."""
    model_config = ConfigDict(extra="forbid")

    kind: Literal["yolo"] = "yolo"
    layout: Literal["channels_first", "anchors_first"] = "channels_first"
    box_format: Literal["xywh", "xyxy"] = "xywh"
    objectness: bool = False
    # "none": scores are already probabilities (Ultralytics exports apply the sigmoid).
    score_activation: Literal["none", "sigmoid"] = "none"


class BoxesScoresDecoder(BaseModel):
    """Separate outputs, SSD-style: boxes (N, A, 4) and scores (N, A, C)."""
    model_config = ConfigDict(extra="forbid")

    kind: Literal["boxes_scores"] = "boxes_scores"
    boxes_output: int = Field(default=0, ge=0, lt=MAX_OUTPUTS)
    scores_output: int = Field(default=1, ge=0, lt=MAX_OUTPUTS)
    box_format: Literal["xywh", "xyxy"] = "xyxy"
    # Applied to the scores output before decoding: "softmax" over the classes (its last axis).
    score_activation: Literal["none", "sigmoid", "softmax"] = "none"
    # A class column that means "no object" (SSD's class 0): never a detection, and left out of
    # the score cosine (its near-1 probabilities on empty anchors would hide collapsed classes).
    # Must be below C, checked against the scores output's shape (`misfit`).
    background_class: int | None = Field(default=None, ge=0, lt=MAX_CLASSES)

    @model_validator(mode="after")
    def _two_outputs(self) -> "BoxesScoresDecoder":
        if self.boxes_output == self.scores_output:
            raise ValueError("boxes_output and scores_output must name two different outputs")
        return self


class DetectionTask(_Task):
    type: Literal["detection"] = "detection"
    decoder: Annotated[YoloDecoder | BoxesScoresDecoder, Field(discriminator="kind")] = Field(default_factory=YoloDecoder)
    # A detection counts as high-confidence (its loss fails the floor) at or above this score.
    confidence: float = Field(default=0.5, gt=0.0, lt=1.0)
    iou: float = Field(default=0.5, gt=0.0, lt=1.0)
    # Class-wise non-maximum suppression at this IoU before detections are ranked for mAP (labelled
    # and label-free), as Ultralytics' validation does: a raw YOLO-style output holds several anchors
    # per object. null: the outputs are already suppressed.
    nms_iou: float | None = Field(default=0.7, gt=0.0, le=1.0)


class SegmentationTask(_Task):
    type: Literal["segmentation"] = "segmentation"
    layout: Literal["logits", "labels"] = "logits"  # (N, C, H, W) logits or (N, H, W) class ids


class CtcTask(_Task):
    type: Literal["ctc"] = "ctc"
    layout: Literal["NTC", "TNC"] = "NTC"
    blank: int = Field(default=0, ge=0, lt=MAX_CLASSES)
    alphabet: str | None = Field(default=None, max_length=MAX_CLASSES)


class EmbeddingTask(_Task):
    type: Literal["embedding"] = "embedding"
    top_k: int = Field(default=5, ge=1, le=100)


class KeypointsTask(_Task):
    """Pose / landmark outputs, K keypoints per image, in one of three layouts:
    - "points": (N, K, 2) x, y, or (N, K, 3) x, y and a visibility / confidence column;
    - "flat": (N, K*2) or (N, K*3), the same rows flattened (`keypoints` = K is then required:
      K*2 and K'*3 can be the same width);
    - "heatmaps": (N, K, H, W), one map per keypoint, decoded by its argmax to (x, y) in map cells.
    Coordinates are compared in the output's own units (pixels or 0..1); distances are normalised
    by the object's size (`normalize`), so the units do not matter."""
    type: Literal["keypoints"] = "keypoints"
    layout: Literal["points", "flat", "heatmaps"] = "points"
    keypoints: int | None = Field(default=None, ge=1, le=MAX_KEYPOINTS)  # K; checked against the shape when known
    # A keypoint is visible when its third column (after the activation) is at or above this.
    visibility_threshold: float = Field(default=0.5, ge=-1e6, le=1e6)
    visibility_activation: Literal["none", "sigmoid"] = "none"
    # PCK: a keypoint is correct within this fraction of the normalising size of the original's.
    pck_threshold: float = Field(default=0.05, gt=0.0, le=1.0)
    # "object": per image, the diagonal of the box the original's (or the labels') visible keypoints
    # span; "extent": one diagonal for the whole eval set (about the image size when the keypoints
    # cover the image).
    normalize: Literal["object", "extent"] = "object"

    @model_validator(mode="after")
    def _flat_needs_count(self) -> "KeypointsTask":
        if self.layout == "flat" and self.keypoints is None:
            raise ValueError('a "flat" keypoints layout needs `keypoints` (K): K*2 and K*3 columns can look alike')
        return self


class GenericTask(_Task):
    type: Literal["generic"] = "generic"


TaskSpec = Annotated[ClassificationTask | DetectionTask | SegmentationTask | CtcTask | EmbeddingTask
                     | KeypointsTask | GenericTask, Field(discriminator="type")]
TASK_ADAPTER: TypeAdapter = TypeAdapter(TaskSpec)


def parse_task(body: dict) -> BaseModel:
    """A task body as its config; raises pydantic's ValidationError (the API's 422) when it does not fit."""
    return TASK_ADAPTER.validate_python(body)


class InferredTask(BaseModel):
    task: TaskSpec
    reason: str
    inferred: bool = True


def _ranked(shape: tuple) -> list:
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


def infer_task(output_shapes: list[tuple]) -> InferredTask:
    """The task the output shapes suggest, and why. Dynamic dimensions are None (or a name)."""
    if not output_shapes:
        return InferredTask(task=GenericTask(), reason="the model declares no outputs")
    shape = _ranked(output_shapes[0])
    rank = len(shape)
    if len(output_shapes) == 2 and [len(s) for s in output_shapes] == [3, 3] and _ranked(output_shapes[0])[2] == 4:
        return InferredTask(task=DetectionTask(decoder=BoxesScoresDecoder()),
                            reason="two outputs (N, A, 4) and (N, A, C): boxes and scores, SSD-style")
    if rank == 2:
        return InferredTask(task=ClassificationTask(), reason="one (N, C) output: class scores")
    if rank == 3 and shape[1] is not None and shape[2] is not None:
        rows, cols = shape[1], shape[2]
        if 5 <= rows <= 4 + 1000 and cols is not None and cols > 4 * rows:
            return InferredTask(task=DetectionTask(), reason=(
                f"a (N, {rows}, {cols}) output: few rows over many anchors, read as YOLO-style "
                "4 box rows then class-score rows"))
        return InferredTask(task=CtcTask(), reason=f"a (N, {rows}, {cols}) output: per-time-step class scores, read as CTC")
    if rank == 3:
        return InferredTask(task=CtcTask(), reason="a (N, T, C) output with a dynamic dimension, read as CTC")
    if rank == 4:
        return InferredTask(task=SegmentationTask(), reason="one (N, C, H, W) output: per-pixel class logits")
    return InferredTask(task=GenericTask(), reason=f"a rank-{rank} output matches no task")


def resolve_task(given: dict | None, output_shapes: list[tuple]) -> InferredTask:
    """The job's or upload's task when one is given (it overrides inference), else the inferred one."""
    if given is not None:
        return InferredTask(task=parse_task(given), reason="given", inferred=False)
    return infer_task(output_shapes)


def misfit(task: BaseModel, output_shapes: list[tuple | list | None]) -> str | None:
    """Why a task cannot read outputs of these shapes, or None when it can (or the shapes are not
    known well enough to tell). The API refuses such a job; the worker reports it on the shapes
    the model really has."""
    count = len(output_shapes)
    for index in task.outputs or []:
        if index >= count:
            return f"the task reads output {index}, but the model has {count} output(s)"
    first = (task.outputs or [0])[0]
    shape = output_shapes[first] if first < count else None
    rank = None if shape is None else len(shape)
    if task.type == "detection" and task.decoder.kind == "boxes_scores":
        return _boxes_scores_misfit(task.decoder, output_shapes)
    expected = {"detection": 3, "ctc": 3}.get(task.type)
    if task.type == "segmentation":
        expected = 4 if task.layout == "logits" else 3
    if rank is not None and expected and rank != expected:
        return f"a {task.type} task reads a rank-{expected} output, but output {first} has shape {list(shape)}"
    if task.type == "classification" and rank is not None and rank < 2:
        return f"a classification task reads (N, C) class scores, but output {first} has shape {list(shape)}"
    if task.type == "keypoints":
        return None if shape is None else keypoints_misfit(task, list(shape), first)
    if task.type == "detection" and rank == 3:
        rows = shape[1] if task.decoder.layout == "channels_first" else shape[2]
        needed = 6 if task.decoder.objectness else 5
        if isinstance(rows, int) and 0 < rows < needed:
            return (f"a yolo decoder ({task.decoder.layout}) needs at least {needed} rows (4 box, "
                    f"{'objectness, ' if task.decoder.objectness else ''}scores), but output {first} has {rows}")
    return None


def _boxes_scores_misfit(decoder: BoxesScoresDecoder, output_shapes: list) -> str | None:
    """Boxes (N, A, 4) and scores (N, A, C) with the same A, and a background class below C: each
    checked where the dimension is known."""
    count = len(output_shapes)
    for role in ("boxes_output", "scores_output"):
        index = getattr(decoder, role)
        if index >= count:
            return f"the boxes_scores decoder's {role} is {index}, but the model has {count} output(s)"
    boxes, scores = output_shapes[decoder.boxes_output], output_shapes[decoder.scores_output]
    if boxes is not None and (len(boxes) != 3 or _ranked(boxes)[2] not in (4, None)):
        return f"the boxes output ({decoder.boxes_output}) must be (N, A, 4), but it has shape {list(boxes)}"
    if scores is not None and len(scores) != 3:
        return f"the scores output ({decoder.scores_output}) must be (N, A, C), but it has shape {list(scores)}"
    if boxes is not None and scores is not None:
        anchors = _ranked(boxes)[1], _ranked(scores)[1]
        if None not in anchors and anchors[0] != anchors[1]:
            return f"the boxes output has {anchors[0]} anchors and the scores output {anchors[1]}"
    classes = None if scores is None or len(scores) != 3 else _ranked(scores)[2]
    if decoder.background_class is not None and classes is not None:
        if decoder.background_class >= classes:
            return f"background_class is {decoder.background_class}, but the scores output has {classes} class(es)"
        if classes == 1:
            return "background_class leaves no class to detect: the scores output has 1 class"
    return None


def keypoints_misfit(task: KeypointsTask, shape: list, index: int) -> str | None:
    """A keypoints layout against its output's shape, each dimension checked where it is known."""
    known = _ranked(shape)
    rank = {"points": 3, "flat": 2, "heatmaps": 4}[task.layout]
    if len(shape) != rank:
        wanted = {"points": "(N, K, 2|3)", "flat": "(N, K*2|K*3)", "heatmaps": "(N, K, H, W)"}[task.layout]
        return f"a {task.layout} keypoints layout reads {wanted}, but output {index} has shape {list(shape)}"
    if task.layout == "flat":
        width = known[1]
        if width is not None and not (width % task.keypoints == 0 and width // task.keypoints in (2, 3)):
            return f"{task.keypoints} keypoints need {2 * task.keypoints} or {3 * task.keypoints} columns, but output {index} has {width}"
        return None
    if task.layout == "points" and known[2] is not None and known[2] not in (2, 3):
        return f"a points keypoints layout reads (N, K, 2|3), but output {index} has {known[2]} columns per keypoint"
    if task.keypoints is not None and known[1] is not None and known[1] != task.keypoints:
        return f"the task names {task.keypoints} keypoints, but output {index} has {known[1]}"
    return None
