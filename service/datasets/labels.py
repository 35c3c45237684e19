"""Task labels in an uploaded .npz (boxes, masks, label sequences or texts, verification pairs, keypoints):
each array checked from its .npy header first (dtype, shape, size against the bounds), then read
(small ones whole, masks in chunks) for the values, and summed up in the summary a job's fit check
reads (modelpress/spec/labels.py). Every refusal is `invalid_labels`."""

import zipfile
from collections.abc import Callable

import numpy as np

from modelpress.spec import labels as spec
from modelpress.spec.configs.task import MAX_CLASSES, MAX_KEYPOINTS
from modelpress.spec.errors import Invalid

INT_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"}
FLOAT_DTYPES = {"float16", "float32", "float64"}
# Distinct characters across all texts: an alphabet, not a corpus.
MAX_TEXT_CHARACTERS = 10_000

Scan = Callable[[zipfile.ZipFile, str, np.dtype, Callable[[np.ndarray], None]], None]


def _refuse(message: str) -> Invalid:
    return Invalid(message, code="invalid_labels")


def _header(archive, name: str, header) -> tuple[tuple[int, ...], np.dtype]:
    try:
        shape, dtype = header(archive, f"{name}.npy")
    except ValueError as exc:
        raise _refuse(f"'{name}' cannot be read: {exc}") from exc
    if dtype.hasobject:
        raise _refuse(f"'{name}' holds Python objects; use a plain numeric (or unicode) dtype")
    return shape, dtype


def _read(archive, name: str) -> np.ndarray:
    try:
        with archive.open(f"{name}.npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except ValueError as exc:
        raise _refuse(f"'{name}' cannot be read: {exc}") from exc


def _small(archive, name: str, header, *, dtypes: set[str], shape: tuple, limit: int) -> np.ndarray:
    """An array whose shape must be `shape` (None: any length up to `limit`), read whole."""
    found, dtype = _header(archive, name, header)
    if dtype.name not in dtypes:
        raise _refuse(f"'{name}' has dtype {dtype}; expected one of {', '.join(sorted(dtypes))}")
    if len(found) != len(shape) or any(want is not None and have != want for have, want in zip(found, shape)):
        wanted = ", ".join("any" if d is None else str(d) for d in shape)
        raise _refuse(f"'{name}' has shape {list(found)}; expected [{wanted}]")
    if found and found[0] > limit:
        raise _refuse(f"'{name}' holds {found[0]} rows; at most {limit} are accepted")
    array = _read(archive, name)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise _refuse(f"'{name}' holds NaN or infinite values")
    return array


def _together(infos, names: tuple[str, ...]) -> bool:
    present = [n for n in names if f"{n}.npy" in infos]
    if present and len(present) != len(names):
        missing = [n for n in names if n not in present]
        raise _refuse(f"{', '.join(present)} need(s) {', '.join(missing)} beside them")
    return bool(present)


def _boxes(archive, header, count: int) -> dict:
    boxes = _small(archive, "boxes", header, dtypes=FLOAT_DTYPES | INT_DTYPES, shape=(None, 4), limit=spec.MAX_BOXES)
    total = len(boxes)
    classes = _small(archive, "box_classes", header, dtypes=INT_DTYPES, shape=(total,), limit=spec.MAX_BOXES)
    images = _small(archive, "box_images", header, dtypes=INT_DTYPES, shape=(total,), limit=spec.MAX_BOXES)
    if total == 0:
        return {"count": 0, "max_class": -1, "min_x": 0.0, "min_y": 0.0, "max_x": 0.0, "max_y": 0.0}
    boxes = boxes.astype(np.float64)
    if classes.min() < 0 or classes.max() >= MAX_CLASSES:
        raise _refuse(f"'box_classes' holds class ids outside 0..{MAX_CLASSES - 1}")
    if images.min() < 0 or images.max() >= count:
        raise _refuse(f"'box_images' names image {int(images.max()) if images.max() >= count else int(images.min())}; "
                      f"the images are 0..{count - 1}")
    degenerate = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if len(degenerate):
        raise _refuse(f"box {int(degenerate[0])} {boxes[degenerate[0]].tolist()} is empty: boxes are x1, y1, x2, y2 "
                      "with x2 > x1 and y2 > y1")
    return {"count": total, "max_class": int(classes.max()), "min_x": float(boxes[:, 0].min()),
            "min_y": float(boxes[:, 1].min()), "max_x": float(boxes[:, 2].max()), "max_y": float(boxes[:, 3].max())}


def _masks(archive, infos, header, scan: Scan, count: int, max_pixels: int) -> dict:
    shape, dtype = _header(archive, "masks", header)
    if dtype.name not in INT_DTYPES:
        raise _refuse(f"'masks' has dtype {dtype}; use integer class ids")
    if len(shape) != 3 or shape[0] != count:
        raise _refuse(f"'masks' has shape {list(shape)}; expected [{count}, H, W] (one mask per image)")
    height, width = shape[1], shape[2]
    if min(height, width) < 1 or height * width > max_pixels:
        raise _refuse(f"masks of {height}x{width} pixels are outside 1..{max_pixels} pixels")
    if infos["masks.npy"].file_size < count * height * width * dtype.itemsize:
        raise _refuse("'masks' is truncated")
    seen = {"max": -1, "bad": None}

    def visit(values: np.ndarray) -> None:
        classes = values[values != spec.IGNORE_INDEX]
        if classes.size:
            low, high = int(classes.min()), int(classes.max())
            if low < 0 or high >= MAX_CLASSES:
                seen["bad"] = low if low < 0 else high
            seen["max"] = max(seen["max"], high)

    scan(archive, "masks.npy", dtype, visit)
    if seen["bad"] is not None:
        raise _refuse(f"'masks' holds class id {seen['bad']}; class ids are 0..{MAX_CLASSES - 1}, "
                      f"{spec.IGNORE_INDEX} = ignore")
    return {"height": int(height), "width": int(width), "max_class": seen["max"] if seen["max"] >= 0 else None}


def _sequences(archive, header, count: int) -> dict:
    found, _ = _header(archive, "label_sequences", header)
    if len(found) == 2 and found[1] > spec.MAX_SEQUENCE_LENGTH:
        raise _refuse(f"'label_sequences' are {found[1]} long; at most {spec.MAX_SEQUENCE_LENGTH} are accepted")
    sequences = _small(archive, "label_sequences", header, dtypes=INT_DTYPES, shape=(count, None),
                       limit=count).astype(np.int64)
    if sequences.size and (sequences.min() < -1 or sequences.max() >= MAX_CLASSES):
        raise _refuse(f"'label_sequences' holds ids outside 0..{MAX_CLASSES - 1} (and -1, the padding)")
    padding = sequences == -1
    # Padding only at the end: once a row is padded it stays padded.
    if (padding[:, :-1] & ~padding[:, 1:]).any():
        row = int(np.flatnonzero((padding[:, :-1] & ~padding[:, 1:]).any(axis=1))[0])
        raise _refuse(f"'label_sequences' row {row} has a label after the -1 padding; pad at the end only")
    return {"count": count, "max_length": int((~padding).sum(axis=1).max()) if count else 0,
            "ids": sorted(int(i) for i in np.unique(sequences[~padding]))}


def _texts(archive, header, count: int) -> dict:
    found, dtype = _header(archive, "texts", header)
    if dtype.kind != "U":
        raise _refuse(f"'texts' has dtype {dtype}; use numpy unicode strings (np.array(texts), dtype '<U…')")
    if dtype.itemsize // 4 > spec.MAX_TEXT_LENGTH:
        raise _refuse(f"'texts' are up to {dtype.itemsize // 4} characters; at most {spec.MAX_TEXT_LENGTH} are accepted")
    if found != (count,):
        raise _refuse(f"'texts' has shape {list(found)}; expected [{count}] (one per image)")
    texts = _read(archive, "texts")
    characters = set("".join(texts.tolist()))
    if len(characters) > MAX_TEXT_CHARACTERS:
        raise _refuse(f"'texts' use {len(characters)} distinct characters; at most {MAX_TEXT_CHARACTERS} are accepted")
    return {"count": count, "max_length": int(max((len(t) for t in texts.tolist()), default=0)),
            "characters": "".join(sorted(characters))}


def _pairs(archive, header, count: int) -> dict:
    pairs = _small(archive, "pairs", header, dtypes=INT_DTYPES, shape=(None, 2), limit=spec.MAX_PAIRS)
    same = _small(archive, "pair_same", header, dtypes=INT_DTYPES | {"bool"}, shape=(len(pairs),),
                  limit=spec.MAX_PAIRS)
    if len(pairs) == 0:
        raise _refuse("'pairs' is empty")
    if pairs.min() < 0 or pairs.max() >= count:
        raise _refuse(f"'pairs' names image {int(pairs.max()) if pairs.max() >= count else int(pairs.min())}; "
                      f"the images are 0..{count - 1}")
    if not np.isin(same.astype(np.int64), (0, 1)).all():
        raise _refuse("'pair_same' must be bool or 0/1")
    return {"count": int(len(pairs)), "max_index": int(pairs.max()), "same": int(same.astype(bool).sum())}


def _keypoints(archive, header, count: int) -> dict:
    found, _ = _header(archive, "keypoints", header)
    if len(found) != 3 or found[0] != count or found[2] not in (2, 3) or not 1 <= found[1] <= MAX_KEYPOINTS:
        raise _refuse(f"'keypoints' has shape {list(found)}; expected [{count}, K, 2 or 3] with K in 1..{MAX_KEYPOINTS} "
                      "(x, y[, visibility] per keypoint, one row per image)")
    keypoints = _small(archive, "keypoints", header, dtypes=FLOAT_DTYPES | INT_DTYPES, shape=(count, None, None),
                       limit=count).astype(np.float64)
    if keypoints.shape[2] == 3 and keypoints[:, :, 2].min() < 0:
        raise _refuse("'keypoints' visibility (third column) is negative; use COCO's 0 (not labelled), 1 or 2")
    return spec.keypoint_summary(keypoints)


def inspect_labels(archive: zipfile.ZipFile, infos: dict, *, header, scan: Scan, count: int, max_pixels: int) -> dict:
    """The summary of each task label kind present, by kind (modelpress/spec/labels.py TASK_OF_KIND)."""
    found = {}
    if _together(infos, ("boxes", "box_classes", "box_images")):
        found["boxes"] = _boxes(archive, header, count)
    if "masks.npy" in infos:
        found["masks"] = _masks(archive, infos, header, scan, count, max_pixels)
    if "label_sequences.npy" in infos and "texts.npy" in infos:
        raise _refuse("give label_sequences or texts, not both")
    if "label_sequences.npy" in infos:
        found["sequences"] = _sequences(archive, header, count)
    if "texts.npy" in infos:
        found["texts"] = _texts(archive, header, count)
    if _together(infos, ("pairs", "pair_same")):
        found["pairs"] = _pairs(archive, header, count)
    if "keypoints.npy" in infos:
        found["keypoints"] = _keypoints(archive, header, count)
    return found
