"""Validate an uploaded .npz dataset from its headers, without loading the images into memory.

An .npz is a zip of .npy files. We read each member's .npy header for shape and dtype, check the
declared sizes against the limits before decompressing anything (a zip bomb declares small and
inflates large: we also compare the header's byte count with the member's declared size), and load
only the labels, which are small.
"""

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelpress.spec.errors import Invalid  # not service.errors: this runs in the sandboxed child too
from service.datasets.labels import inspect_labels

IMAGE_DTYPES = {"uint8", "float32", "float16", "float64"}
LABEL_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"}
MAX_MEMBERS = 16
# Class indices beyond this are not classes but garbage (or an overflow waiting to happen downstream).
MAX_CLASSES = 100_000


@dataclass
class DatasetInfo:
    count: int
    shape: list[int | None]
    dtype: str
    layout: str
    has_labels: bool
    num_classes: int | None
    format: str = "npz"
    classes: list[str] | None = None
    # Task labels beyond class ids, a summary per kind (service/datasets/labels.py).
    labels: dict | None = None


def inspect_dataset(path: Path, *, max_bytes: int, max_samples: int, max_image_pixels: int, layout: str | None = None) -> DatasetInfo:
    """An .npz of arrays, or a .zip of image files; both are zips, told apart by their entries."""
    limits = {"max_bytes": max_bytes, "max_samples": max_samples, "max_image_pixels": max_image_pixels}
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise Invalid("the dataset is neither an .npz file nor a .zip of images", code="invalid_dataset") from exc
    try:
        with archive:
            if any(name.endswith(".npy") for name in archive.namelist()):
                return inspect_npz(archive, layout=layout, **limits)
            from service.datasets.images import inspect_image_zip

            return inspect_image_zip(archive, **limits)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error, OSError) as exc:
        raise Invalid(f"the dataset archive cannot be read: {str(exc)[:300]}", code="invalid_dataset") from exc


def guess_layout(shape: tuple[int, ...]) -> str:
    if len(shape) == 3:
        return "NHW"
    # A channel axis is small; images are at least a few pixels wide.
    if shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        return "NHWC"
    return "NCHW"


def _npy_header(archive: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    with archive.open(member) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except (ValueError, SyntaxError, TypeError, KeyError, MemoryError, RecursionError) as exc:
            # numpy parses the header with ast.literal_eval: any malformed header lands here.
            raise ValueError(f"malformed .npy header ({exc.__class__.__name__})") from None
    if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError("malformed .npy header (shape)")
    return shape, dtype


def _read_through(archive: zipfile.ZipFile, member: str, dtype: np.dtype, visit=None) -> None:
    """Read the array once, in chunks: the zip's CRC check catches corrupt data now, not in a job,
    and float pixels are checked to be finite (NaN or Inf would poison calibration and every metric).
    `visit`, if given, sees every chunk's values (the label checks of masks)."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
        leftover, unpacked = b"", f.tell()
        while chunk := f.read(1 << 20):
            unpacked += len(chunk)
            if dtype.kind != "f" and visit is None:
                continue
            data = leftover + chunk
            usable = len(data) - len(data) % dtype.itemsize
            values, leftover = np.frombuffer(data[:usable], dtype=dtype), data[usable:]
            if visit is not None:
                visit(values)
            if dtype.kind == "f" and not np.isfinite(values).all():
                raise Invalid(f"'{member[:-4]}' holds NaN or infinite values", code="non_finite_images")
    # Reading stops at the declared size (the CRC then fails), but a member may also end before it:
    # an archive whose directory lies about a size is refused, not trusted in part.
    declared = archive.getinfo(member).file_size
    if unpacked != declared:
        raise Invalid(f"'{member}' unpacks to {unpacked} bytes but the archive declares {declared}", code="invalid_dataset")


def inspect_npz(archive: zipfile.ZipFile, *, max_bytes: int, max_samples: int, max_image_pixels: int, layout: str | None = None) -> DatasetInfo:
    infos = {i.filename: i for i in archive.infolist()}
    if len(infos) > MAX_MEMBERS:
        raise Invalid(f"the .npz holds more than {MAX_MEMBERS} arrays", code="invalid_dataset")
    if sum(i.file_size for i in infos.values()) > max_bytes:
        raise Invalid(f"the .npz decompresses to more than {max_bytes} bytes", code="dataset_too_large")
    if "images.npy" not in infos:
        raise Invalid("the .npz has no array named 'images'", code="missing_images")
    try:
        shape, dtype = _npy_header(archive, "images.npy")
    except ValueError as exc:
        raise Invalid(f"'images' cannot be read: {exc}", code="invalid_dataset") from exc
    if dtype.hasobject or dtype.name not in IMAGE_DTYPES:
        raise Invalid(f"'images' has dtype {dtype}; use uint8 or float", code="invalid_dataset")
    if len(shape) not in (3, 4):
        raise Invalid(f"'images' has shape {list(shape)}; expected N,H,W or N,C,H,W or N,H,W,C", code="invalid_dataset")
    if min(shape) < 1:
        raise Invalid(f"'images' has shape {list(shape)}; every dimension must be at least 1", code="invalid_dataset")
    count = shape[0]
    if count == 0 or count > max_samples:
        raise Invalid(f"'images' holds {count} samples; between 1 and {max_samples} are accepted", code="invalid_dataset")
    layout = layout or guess_layout(shape)
    if (layout == "NHW") != (len(shape) == 3):
        raise Invalid(f"layout {layout} does not fit 'images' of shape {list(shape)}", code="invalid_dataset")
    height, width = (shape[1], shape[2]) if layout in ("NHW", "NHWC") else (shape[2], shape[3])
    if height * width > max_image_pixels or min(height, width) < 1:
        raise Invalid(f"images of {height}x{width} pixels are outside the limit of {max_image_pixels} pixels", code="invalid_dataset")
    expected = math.prod(int(s) for s in shape) * dtype.itemsize
    if infos["images.npy"].file_size < expected:
        raise Invalid("'images' is truncated", code="invalid_dataset")
    _read_through(archive, "images.npy", dtype)

    has_labels = "labels.npy" in infos
    num_classes = None
    if has_labels:
        try:
            labels_shape, labels_dtype = _npy_header(archive, "labels.npy")
        except ValueError as exc:
            raise Invalid(f"'labels' cannot be read: {exc}", code="invalid_dataset") from exc
        if labels_dtype.hasobject or labels_dtype.name not in LABEL_DTYPES:
            raise Invalid(f"'labels' has dtype {labels_dtype}; use integers", code="invalid_labels")
        if labels_shape != (count,):
            raise Invalid(f"'labels' has shape {list(labels_shape)}; expected [{count}] (one per image)", code="invalid_labels")
        try:
            with archive.open("labels.npy") as f:
                labels = np.lib.format.read_array(f, allow_pickle=False)
        except ValueError as exc:
            raise Invalid(f"'labels' cannot be read: {exc}", code="invalid_labels") from exc
        if labels.min() < 0:
            raise Invalid("'labels' holds negative class indices", code="invalid_labels")
        if int(labels.max()) >= MAX_CLASSES:
            raise Invalid(f"'labels' holds class index {int(labels.max())}; at most {MAX_CLASSES - 1} is accepted",
                          code="invalid_labels")
        num_classes = int(labels.max()) + 1
    task_labels = inspect_labels(archive, infos, header=_npy_header, scan=_read_through, count=int(count),
                                 max_pixels=max_image_pixels)
    return DatasetInfo(count=int(count), shape=[int(s) for s in shape], dtype=dtype.name, layout=layout,
                       has_labels=has_labels, num_classes=num_classes, labels=task_labels or None)
