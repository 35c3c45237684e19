"""Validate a .zip of image files: ImageFolder layout (one folder per class) or a flat, unlabelled
set. Every entry is checked before anything is decoded: names (no path traversal), count, the
declared decompressed size (zip bombs), then each image's header (pixel count: an image declaring
more pixels than the limit is a decompression bomb), its integrity, and then it is decoded whole,
as a job will decode it. The API runs this in the sandboxed child (service/datasets/sandboxed.py),
so the decoders only ever see untrusted bytes under its memory and time limits."""

import zipfile

from PIL import Image, UnidentifiedImageError

from service.datasets.inspect import DatasetInfo
from modelpress.spec.errors import Invalid  # not service.errors: this runs in the sandboxed child
from service.models.inspect import check_archive_names
from modelpress.spec.errors import EngineError
from modelpress.spec.imagefiles import ANNOTATIONS_FILE, MAX_ANNOTATIONS_BYTES, coco_boxes, image_entries

CHANNELS = {"1": 1, "L": 1, "LA": 1, "I;16": 1, "P": 3, "RGB": 3, "RGBA": 3, "CMYK": 3, "YCbCr": 3}


def inspect_image_zip(archive: zipfile.ZipFile, *, max_bytes: int, max_samples: int, max_image_pixels: int) -> DatasetInfo:
    names = archive.namelist()
    check_archive_names(names)
    if len(names) > max_samples + 1000:
        raise Invalid(f"the zip holds {len(names)} entries; at most {max_samples} images are accepted", code="invalid_dataset")
    if sum(info.file_size for info in archive.infolist()) > max_bytes:
        raise Invalid(f"the zip decompresses to more than {max_bytes} bytes", code="dataset_too_large")
    try:
        files, classes, _ = image_entries(names)
    except EngineError as exc:
        raise Invalid(exc.message, code=exc.code) from exc
    if len(files) > max_samples:
        raise Invalid(f"the zip holds {len(files)} images; at most {max_samples} are accepted", code="invalid_dataset")

    sizes, channels, decoded_bytes, image_sizes = set(), set(), 0, {}
    for name in files:
        try:
            with archive.open(name) as handle, Image.open(handle) as image:
                width, height = image.size
                if width * height > max_image_pixels:
                    raise _bomb(name, f"its header declares {width}x{height} pixels", max_image_pixels)
                image.verify()
                sizes.add((height, width))
                image_sizes[name] = (width, height)
                channels.add(CHANNELS.get(image.mode, 3))
                # Decoded pixels are bounded too: PNG compresses a blank image ~1000:1.
                decoded_bytes += width * height * CHANNELS.get(image.mode, 3)
                if decoded_bytes > max_bytes:
                    raise Invalid(f"the images decode to more than {max_bytes} bytes", code="dataset_too_large")
            # verify() checks structure and checksums only (nothing at all for JPEG): decode the pixels.
            with archive.open(name) as handle, Image.open(handle) as image:
                image.load()
        except Image.DecompressionBombError as exc:
            raise _bomb(name, "its header declares over twice that many pixels", max_image_pixels) from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise Invalid(f"{name} is not a decodable image: {exc}", code="invalid_dataset") from exc
    height, width = sizes.pop() if len(sizes) == 1 else (None, None)
    return DatasetInfo(
        count=len(files), shape=[len(files), channels.pop() if len(channels) == 1 else 3, height, width],
        dtype="uint8", layout="files", has_labels=classes is not None,
        num_classes=len(classes) if classes else None, format="image_zip", classes=classes,
        labels=_annotations(archive, files, image_sizes) if ANNOTATIONS_FILE in names else None,
    )


def _annotations(archive: zipfile.ZipFile, files: list[str], sizes: dict) -> dict:
    """The summary of the COCO boxes: in their images' own pixels (checked against each image), so
    the extent a job checks is the image's whatever the resize (`in_image`)."""
    if archive.getinfo(ANNOTATIONS_FILE).file_size > MAX_ANNOTATIONS_BYTES:
        raise Invalid(f"{ANNOTATIONS_FILE} is larger than {MAX_ANNOTATIONS_BYTES} bytes", code="invalid_labels")
    try:
        boxes = coco_boxes(archive.read(ANNOTATIONS_FILE), files, sizes)
    except EngineError as exc:
        raise Invalid(exc.message, code=exc.code) from exc
    classes = [box[4] for found in boxes.values() for box in found]
    return {"boxes": {"count": len(classes), "max_class": max(classes, default=-1), "in_image": True}}


def _bomb(name: str, size: str, max_image_pixels: int) -> Invalid:
    return Invalid(f"{name} would decompress past the limit of {max_image_pixels} pixels per image "
                   f"(MODELPRESS_MAX_IMAGE_PIXELS): {size}; refused as a decompression bomb",
                   code="image_decompression_bomb", entry=name[:200], max_image_pixels=max_image_pixels)
