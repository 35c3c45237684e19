"""How a zip of image files reads as a dataset (used at upload and when a job decodes it): an
ImageFolder layout (one folder per class, labels in sorted class-name order) or a flat, unlabelled
set. Hidden files and __MACOSX entries are ignored."""

import json
import math
from pathlib import PurePosixPath

from modelpress.spec.errors import EngineError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# COCO-style box annotations at the zip's root (README "Labelled task data"); not an image.
ANNOTATIONS_FILE = "annotations.json"
MAX_ANNOTATIONS_BYTES = 64 * 1024 * 1024
MAX_ANNOTATION_BOXES = 1_000_000
MAX_CLASSES = 100_000


def _ignored(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return name.endswith("/") or any(p.startswith(".") or p == "__MACOSX" for p in parts)


def image_entries(names: list[str]) -> tuple[list[str], list[str] | None, list[int] | None]:
    """Image paths, class names and labels (None for an unlabelled zip)."""
    files = sorted(n for n in names if not _ignored(n) and n != ANNOTATIONS_FILE)
    others = [n for n in files if PurePosixPath(n).suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        raise EngineError("invalid_dataset", f"the zip holds files that are not images (JPEG, PNG, BMP, WebP), e.g. {others[0]!r}")
    if not files:
        raise EngineError("invalid_dataset", "the zip holds no images")
    parts = [PurePosixPath(n).parts for n in files]
    # One folder wrapping everything ("dataset/cat/1.png") is not a class level.
    while all(len(p) > 1 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    depths = {len(p) for p in parts}
    if depths == {1}:
        return files, None, None
    if depths != {2}:
        raise EngineError("invalid_dataset", "use one folder per class with the images directly inside (ImageFolder), or no folders at all")
    classes = sorted({p[0] for p in parts})
    return files, classes, [classes.index(p[0]) for p in parts]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def coco_boxes(text: bytes, files: list[str], sizes: dict[str, tuple[int, int]]) -> dict[str, list[tuple]]:
    """The boxes of each image file from COCO JSON: `images` ({id, file_name}: the path in the zip,
    or its file name when that is unique), `annotations` ({image_id, bbox: [x, y, w, h] in the
    image's own pixels, category_id: the model's class id}). `sizes`: (width, height) per file.
    Returns (x1, y1, x2, y2, class) per file; raises EngineError("invalid_labels")."""
    def refuse(message: str) -> EngineError:
        return EngineError("invalid_labels", f"{ANNOTATIONS_FILE}: {message}")

    try:
        coco = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise refuse(f"not JSON ({str(exc)[:200]})") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) or not isinstance(coco.get("annotations"), list):
        raise refuse("expected an object with lists 'images' and 'annotations'")
    if len(coco["annotations"]) > MAX_ANNOTATION_BOXES:
        raise refuse(f"{len(coco['annotations'])} annotations; at most {MAX_ANNOTATION_BOXES} are accepted")
    by_name = {PurePosixPath(f).name: f for f in files}
    unique = len(by_name) == len(files)
    paths = {}
    for image in coco["images"]:
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str) or not isinstance(image.get("id"), int):
            raise refuse("every image needs an int 'id' and a 'file_name'")
        name = image["file_name"]
        path = name if name in sizes else (by_name.get(name) if unique else None)
        if path is None:
            raise refuse(f"image file_name {name[:200]!r} is not an image in the zip")
        paths[image["id"]] = path
    boxes: dict[str, list[tuple]] = {f: [] for f in files}
    for index, annotation in enumerate(coco["annotations"]):
        if not isinstance(annotation, dict):
            raise refuse(f"annotation {index} is not an object")
        bbox, category, image_id = annotation.get("bbox"), annotation.get("category_id"), annotation.get("image_id")
        if image_id not in paths:
            raise refuse(f"annotation {index} names image_id {str(image_id)[:40]}, which 'images' does not list")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
            raise refuse(f"annotation {index}: bbox must be [x, y, width, height], four numbers")
        if not isinstance(category, int) or isinstance(category, bool) or not 0 <= category < MAX_CLASSES:
            raise refuse(f"annotation {index}: category_id must be a class id 0..{MAX_CLASSES - 1}")
        x, y, w, h = bbox
        width, height = sizes[paths[image_id]]
        if w <= 0 or h <= 0:
            raise refuse(f"annotation {index}: the box is empty (width {w}, height {h})")
        if x < 0 or y < 0 or x + w > width or y + h > height:
            raise refuse(f"annotation {index}: the box {bbox} leaves its {width}x{height} image")
        boxes[paths[image_id]].append((float(x), float(y), float(x + w), float(y + h), category))
    return boxes
