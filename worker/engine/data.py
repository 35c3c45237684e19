"""Datasets as arrays the model takes: decoded, preprocessed and laid out like the model's input.

Defaults (no preprocess spec): uint8 pixels become float32 in [0, 1] (divided by 255, no mean/std);
float images are used as they are; decoded image files take the model's channel count (1:
grayscale, 3: RGB) and its spatial size when fixed. A spec (configs.PreprocessSpec) stored with the
dataset changes these the same way wherever the dataset is used.
"""

import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from modelpress.spec.configs import PreprocessSpec, parse_preprocess
from modelpress.spec.errors import EngineError
from modelpress.spec.imagefiles import ANNOTATIONS_FILE, coco_boxes, image_entries
from modelpress.spec.shapes import InputLayout, check_dataset_fits, check_fits, model_layout


# Task label arrays of an .npz (modelpress/spec/labels.py), read as they were validated at upload.
TARGET_ARRAYS = ("boxes", "box_classes", "box_images", "masks", "label_sequences", "texts", "pairs", "pair_same", "keypoints")


@dataclass
class Targets:
    """Task labels beyond class ids; each None when the dataset has none. Boxes and pairs name
    images by index, so taking a subset of images re-indexes them (and drops those of images left out)."""

    boxes: np.ndarray | None = None  # (K, 4) float64 xyxy in input pixels
    box_classes: np.ndarray | None = None  # (K,) int64
    box_images: np.ndarray | None = None  # (K,) int64, the image each box belongs to
    masks: np.ndarray | None = None  # (N, H, W) int64 class ids, 255 = ignore
    label_sequences: np.ndarray | None = None  # (N, L) int64, padded with -1
    texts: np.ndarray | None = None  # (N,) unicode
    pairs: np.ndarray | None = None  # (P, 2) int64 image indices
    pair_same: np.ndarray | None = None  # (P,) bool
    keypoints: np.ndarray | None = None  # (N, K, 2|3) float64, x, y[, visibility]

    def take(self, indices: np.ndarray, count: int) -> "Targets":
        """The targets of images `indices` (of `count`), in that order."""
        position = np.full(count, -1, np.int64)
        position[indices] = np.arange(len(indices))
        taken = replace(self, **{name: getattr(self, name)[indices] for name in ("masks", "label_sequences", "texts", "keypoints")
                                 if getattr(self, name) is not None})
        if self.boxes is not None:
            kept = position[self.box_images] >= 0
            taken = replace(taken, boxes=self.boxes[kept], box_classes=self.box_classes[kept],
                            box_images=position[self.box_images[kept]])
        if self.pairs is not None:
            moved = position[self.pairs]
            kept = (moved >= 0).all(axis=1)
            taken = replace(taken, pairs=moved[kept], pair_same=self.pair_same[kept])
        return taken


@dataclass
class ImageSet:
    images: np.ndarray  # float32, laid out like the model input (batch first)
    labels: np.ndarray | None  # int64 class indices, or None for unlabelled data
    targets: Targets = field(default_factory=Targets)

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int) -> "ImageSet":
        # Slices, not a take: views of the images, no copy.
        kept = min(n, len(self))
        return ImageSet(self.images[:n], None if self.labels is None else self.labels[:n],
                        self.targets if kept == len(self) else self.targets.take(np.arange(kept), len(self)))

    def take(self, indices: np.ndarray) -> "ImageSet":
        indices = np.asarray(indices, np.int64)
        return ImageSet(self.images[indices], None if self.labels is None else self.labels[indices],
                        self.targets.take(indices, len(self)))


def load_dataset(path: Path, *, dataset_format: str, layout: str, preprocess: dict | None,
                 model_shape: list[int | None] | None, role: str, input_name: str = "input",
                 channels_hint: int | None = None) -> ImageSet:
    """`channels_hint`: the image files' own channel count (from upload), used when neither the
    spec nor the model says (a TorchScript model carries no input shape)."""
    spec = parse_preprocess(preprocess)
    if dataset_format == "image_zip":
        images, labels, targets = _decode_image_zip(path, spec, model_layout(model_shape), role, channels_hint)
        shape = list(images.shape)
        check_dataset_fits([shape[0], shape[1], shape[2], shape[3]], "NCHW", {}, model_shape, role=role, input_name=input_name)
        uint8 = True
    else:
        images, labels, targets = _load_npz(path, role)
        layout = spec.layout or layout
        check_fits(list(images.shape), layout, model_shape, role=role, input_name=input_name)
        uint8 = images.dtype == np.uint8
        images = _to_nchw(images, layout)
        if spec.channels == "bgr" and images.shape[1] == 3:
            images = images[:, ::-1]
    images = images.astype(np.float32)
    if spec.scale is not None:
        images = images * np.float32(spec.scale)
    elif uint8:
        images = images / np.float32(255.0)  # divided, not multiplied by 1/255: the usual bits exactly
    images = _normalize(images, spec)
    target = model_layout(model_shape)
    if target is not None and target.channels_last:
        images = images.transpose(0, 2, 3, 1)
    return ImageSet(np.ascontiguousarray(images), labels, targets)


def split(data: ImageSet, *, eval_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(rest, held-out eval): a seeded shuffle, so the same job spec gives the same split."""
    order = np.random.default_rng(seed).permutation(len(data))
    held_out = min(len(data) - 1, max(1, round(len(data) * eval_fraction)))
    return data.take(np.sort(order[held_out:])), data.take(np.sort(order[:held_out]))


def _load_npz(path: Path, role: str) -> tuple[np.ndarray, np.ndarray | None, Targets]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            images = archive["images"]
            labels = archive["labels"].astype(np.int64) if "labels" in archive.files else None
            found = {name: archive[name] for name in TARGET_ARRAYS if name in archive.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise EngineError("invalid_dataset", f"the {role} dataset cannot be read: {exc}") from exc
    for name, array in found.items():
        if name in ("boxes", "keypoints"):
            found[name] = array.astype(np.float64)
        elif name == "pair_same":
            found[name] = array.astype(bool)
        elif name != "texts":
            found[name] = array.astype(np.int64)
    return images, labels, Targets(**found)


def _to_nchw(images: np.ndarray, layout: str) -> np.ndarray:
    if layout == "NHW":
        return images[:, None, :, :]
    if layout == "NHWC":
        return images.transpose(0, 3, 1, 2)
    return images


def _normalize(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    channels = images.shape[1]
    for name, values in (("mean", spec.mean), ("std", spec.std)):
        if values is not None and len(values) not in (1, channels):
            raise EngineError("invalid_preprocess", f"{name} has {len(values)} values; the images have {channels} channels")
    if spec.mean is not None:
        images = images - np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    if spec.std is not None:
        images = images / np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    return images


def _decode_image_zip(path: Path, spec: PreprocessSpec, target: InputLayout | None, role: str,
                      channels_hint: int | None) -> tuple[np.ndarray, np.ndarray | None, Targets]:
    from PIL import Image

    mode = {"gray": "L", "rgb": "RGB", "bgr": "RGB"}.get(spec.channels or "", None)
    if mode is None:
        channels = target.channels if target is not None and target.channels else channels_hint
        mode = "L" if channels == 1 else "RGB"
    arrays, sizes, placements = [], {}, []
    with zipfile.ZipFile(path) as archive:
        files, _, labels = image_entries(archive.namelist())
        for name in files:
            try:
                with archive.open(name) as handle, Image.open(handle) as image:
                    image = image.convert(mode)
                    sizes[name] = image.size
                    scale, offset = (1.0, 1.0), (0, 0)
                    if spec.resize is not None or (target is not None and target.height and not spec.center_crop):
                        resized = _resize(image, spec, target)
                        scale = (resized.width / image.width, resized.height / image.height)
                        image = resized
                    if spec.center_crop:
                        offset = ((image.width - spec.center_crop[1]) // 2, (image.height - spec.center_crop[0]) // 2)
                        image = _center_crop(image, spec.center_crop)
                    placements.append((scale, offset, image.size))
                    pixels = np.asarray(image, dtype=np.uint8)
            except (OSError, ValueError) as exc:
                raise EngineError("invalid_dataset", f"{name} in the {role} dataset cannot be decoded: {exc}") from exc
            arrays.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
        targets = _zip_boxes(archive, files, sizes, placements) if ANNOTATIONS_FILE in archive.namelist() else Targets()
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise EngineError("dataset_shape_mismatch", f"the {role} dataset's images differ in size after preprocessing "
                          f"({sorted(shapes)[:3]}...): give a resize or center_crop")
    images = np.stack(arrays)
    if spec.channels == "bgr":
        images = images[:, ::-1]
    return images, None if labels is None else np.asarray(labels, np.int64), targets


def _zip_boxes(archive: zipfile.ZipFile, files: list[str], sizes: dict, placements: list) -> Targets:
    """The COCO boxes of an image zip, moved with their images: scaled by the resize, shifted by
    the crop and clipped to it (a box the crop leaves empty is dropped)."""
    per_file = coco_boxes(archive.read(ANNOTATIONS_FILE), files, sizes)
    boxes, classes, owners = [], [], []
    for index, (name, ((sx, sy), (left, top), (width, height))) in enumerate(zip(files, placements)):
        for x1, y1, x2, y2, cls in per_file[name]:
            box = np.clip([x1 * sx - left, y1 * sy - top, x2 * sx - left, y2 * sy - top], 0, [width, height, width, height])
            if box[2] > box[0] and box[3] > box[1]:
                boxes.append(box)
                classes.append(cls)
                owners.append(index)
    return Targets(boxes=np.array(boxes, np.float64).reshape(-1, 4), box_classes=np.array(classes, np.int64),
                   box_images=np.array(owners, np.int64))


def _resize(image, spec: PreprocessSpec, target: InputLayout | None):
    from PIL import Image

    if isinstance(spec.resize, int):
        shorter = min(image.width, image.height)
        size = (round(image.width * spec.resize / shorter), round(image.height * spec.resize / shorter))
    elif spec.resize is not None:
        size = (spec.resize[1], spec.resize[0])
    else:
        size = (target.width, target.height)
    return image.resize(size, Image.Resampling.BILINEAR)


def _center_crop(image, crop: tuple[int, int]):
    height, width = crop
    if image.height < height or image.width < width:
        raise EngineError("dataset_shape_mismatch", f"an image of {image.height}x{image.width} is smaller than the "
                          f"center_crop {height}x{width}: resize first")
    top, left = (image.height - height) // 2, (image.width - width) // 2
    return image.crop((left, top, left + width, top + height))
