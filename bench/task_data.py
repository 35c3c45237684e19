"""Synthetic, labelled data for the reference task models (bench/task_models.py), made here and
seeded: nothing is downloaded. Every generator returns uint8 images (N, 1, H, W) and the labels in
the .npz key layout the service reads (docs/METRICS.md): detection `boxes`/`box_classes`/`box_images`,
segmentation `masks`, CTC `label_sequences`/`texts`, embedding `pairs`/`pair_same`.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.reference import load_digits_split

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")  # Debian fonts-dejavu-core
FONTS = ("DejaVuSans.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf", "DejaVuSans-Bold.ttf")


@dataclass
class Labelled:
    images: np.ndarray  # uint8 (N, 1, H, W)
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # .npz keys beside `images`

    def save(self, path: Path, *, with_labels: bool = True) -> Path:
        np.savez(path, images=self.images, **(self.labels if with_labels else {}))
        return path


def digit_images(seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 8x8 digits as (images (N, 8, 8) uint8, classes): training and held-out split."""
    train, test = load_digits_split(seed)
    return (train.images[:, 0], train.labels), (test.images[:, 0], test.labels)


def detection_scenes(digits: np.ndarray, classes: np.ndarray, *, count: int, size: int, scale: int,
                     max_objects: int, seed: int) -> Labelled:
    """Digits (upscaled `scale` times) pasted without overlap on a noisy `size` x `size` canvas;
    each box is the digit's tight extent (its ink above 1/8 of full scale), xyxy in pixels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 48, (count, 1, size, size)).astype(np.uint8)
    boxes, box_classes, box_images = [], [], []
    side = 8 * scale
    for index in range(count):
        placed: list[tuple[int, int]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            for _attempt in range(20):  # rejection sampling: objects never overlap
                x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
                if all(abs(x - px) >= side or abs(y - py) >= side for px, py in placed):
                    break
            else:
                continue
            placed.append((x, y))
            pick = int(rng.integers(len(digits)))
            patch = np.kron(digits[pick], np.ones((scale, scale), np.uint8))
            region = images[index, 0, y : y + side, x : x + side]
            np.maximum(region, patch, out=region)
            rows, cols = np.nonzero(patch > 32)
            boxes.append([x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1])
            box_classes.append(int(classes[pick]))
            box_images.append(index)
    return Labelled(images, {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                             "box_classes": np.asarray(box_classes, np.int64),
                             "box_images": np.asarray(box_images, np.int64)})


SHAPES = ("circle", "rectangle", "triangle")  # classes 1..3; 0 is the background


def shape_scenes(*, count: int, size: int, max_shapes: int, seed: int) -> Labelled:
    """Filled circles, rectangles and triangles of random brightness on noise; later shapes cover
    earlier ones. Brightness says nothing about the class: only the outline does."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = np.empty((count, 1, size, size), np.uint8)
    masks = np.zeros((count, size, size), np.uint8)
    for index in range(count):
        image = Image.fromarray(rng.integers(0, 90, (size, size)).astype(np.uint8))
        mask = Image.new("L", (size, size), 0)
        draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(1, max_shapes + 1))):
            label = int(rng.integers(1, len(SHAPES) + 1))
            extent = int(rng.integers(size // 5, size // 2))
            x, y = (int(v) for v in rng.integers(0, size - extent, 2))
            brightness = int(rng.integers(110, 256))
            if SHAPES[label - 1] == "circle":
                outline = [(x, y), (x + extent, y + extent)]
                draw_image.ellipse(outline, fill=brightness)
                draw_mask.ellipse(outline, fill=label)
            elif SHAPES[label - 1] == "rectangle":
                outline = [(x, y), (x + extent, y + int(rng.integers(extent // 2, extent + 1)))]
                draw_image.rectangle(outline, fill=brightness)
                draw_mask.rectangle(outline, fill=label)
            else:
                outline = [(x + extent // 2, y), (x, y + extent), (x + extent, y + extent)]
                draw_image.polygon(outline, fill=brightness)
                draw_mask.polygon(outline, fill=label)
        images[index, 0] = np.asarray(image)
        masks[index] = np.asarray(mask)
    return Labelled(images, {"masks": masks})


def text_lines(*, count: int, height: int, width: int, alphabet: str, max_length: int, seed: int) -> Labelled:
    """One string of 1..max_length characters of `alphabet` per image, rendered with PIL from a
    random DejaVu font at a jittered size and place; class ids are alphabet positions + 1 (0: blank)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fonts = {}
    images = np.empty((count, 1, height, width), np.uint8)
    sequences = np.full((count, max_length), -1, np.int64)
    texts = []
    for index in range(count):
        text = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), int(rng.integers(1, max_length + 1))))
        points = int(height * rng.uniform(0.6, 0.85))
        name = FONTS[int(rng.integers(len(FONTS)))]
        while True:  # shrink until the line fits the width
            font = fonts.get((name, points)) or fonts.setdefault((name, points), ImageFont.truetype(str(FONT_DIR / name), points))
            left, top, right, bottom = font.getbbox(text)
            if right - left <= width - 2 or points <= 6:
                break
            points -= 1
        image = Image.fromarray(rng.integers(0, 60, (height, width)).astype(np.uint8))
        x = int(rng.integers(0, max(1, width - (right - left)))) - left
        y = int(rng.integers(0, max(1, height - (bottom - top)))) - top
        ImageDraw.Draw(image).text((x, y), text, fill=int(rng.integers(150, 256)), font=font)
        images[index, 0] = np.asarray(image)
        sequences[index, : len(text)] = [alphabet.index(c) + 1 for c in text]
        texts.append(text)
    return Labelled(images, {"label_sequences": sequences, "texts": np.asarray(texts, dtype=np.str_)})


def verification_pairs(classes: np.ndarray, *, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` index pairs, half of the same class and half of different classes."""
    rng = np.random.default_rng(seed)
    by_class = {c: np.flatnonzero(classes == c) for c in np.unique(classes)}
    pairs, same = [], []
    while len(pairs) < count:
        want_same = len(pairs) % 2 == 0
        a = int(rng.integers(len(classes)))
        pool = by_class[classes[a]] if want_same else np.flatnonzero(classes != classes[a])
        b = int(rng.choice(pool))
        if a != b:
            pairs.append((a, b))
            same.append(want_same)
    return np.asarray(pairs, np.int64), np.asarray(same, np.bool_)


def keypoint_scenes(digits: np.ndarray, *, count: int, size: int, scale: int, seed: int) -> Labelled:
    """One digit (upscaled `scale` times) per noisy `size` x `size` canvas, placed so that it may
    hang over an edge by up to a third of its side. Keypoints (N, 5, 3): the corners of the digit's
    ink box (top-left, top-right, bottom-right, bottom-left) and its centre, x, y in pixels, then
    COCO's visibility: 2 inside the canvas, 0 outside (not labelled)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 48, (count, 1, size, size)).astype(np.uint8)
    side = 8 * scale
    keypoints = np.zeros((count, 5, 3), np.float32)
    canvas = np.zeros((size + 2 * side, size + 2 * side), np.uint8)  # room for the overhang
    for index in range(count):
        x, y = (int(v) for v in rng.integers(-side // 3, size - side + side // 3 + 1, 2))
        patch = np.kron(digits[int(rng.integers(len(digits)))], np.ones((scale, scale), np.uint8))
        canvas[:] = 0
        canvas[y + side : y + 2 * side, x + side : x + 2 * side] = patch
        np.maximum(images[index, 0], canvas[side : side + size, side : side + size], out=images[index, 0])
        rows, cols = np.nonzero(patch > 32)
        x1, y1, x2, y2 = x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1
        points = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [(x1 + x2) / 2, (y1 + y2) / 2]], np.float32)
        inside = (points >= 0).all(axis=1) & (points <= size).all(axis=1)
        keypoints[index] = np.concatenate([points, np.where(inside, 2.0, 0.0)[:, None]], axis=1)
    return Labelled(images, {"keypoints": keypoints})
