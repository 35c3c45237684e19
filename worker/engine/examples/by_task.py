"""Per task: how much each eval image's answer differs between the two models, by the task's own
measure, and the drawing of a picked image with what each model answered (its metadata beside it:
what was drawn, so a client or a test can read it without looking at pixels)."""

import difflib

import numpy as np
from PIL import Image

from modelpress.spec.labels import text_ids
from worker.engine.examples import draw
from worker.engine.tasks import ctc, detection, keypoints, segmentation
from worker.engine.tasks.scored import decoded_detections

MAX_BOXES = 25  # drawn per model and image: lost and new ones first, then the most confident
DECODE_CHUNK = 16  # images per decoder call


def _base(image: np.ndarray) -> tuple[Image.Image, float]:
    picture = draw.as_picture(image)
    if picture is None:
        raise ValueError(f"an input of shape {list(image.shape)} is not an image")
    scale = draw.display_scale(picture.height, picture.width)
    return draw.resized(picture, scale), scale


class Detection:
    def __init__(self, task, images, reference, candidate):
        self.task, self.images = task, images
        self.original, self.compressed = self._decoded(reference), self._decoded(candidate)
        self.pairs = [detection.matched_pairs(r, c, task.iou) for r, c in zip(self.original, self.compressed, strict=True)]

    def _decoded(self, outputs: list[np.ndarray]) -> list:
        """Confident detections, decoded DECODE_CHUNK images at a time (the decoder works in float64)."""
        decoded = []
        for start in range(0, len(outputs[0]), DECODE_CHUNK):
            chunk = decoded_detections(self.task, [o[start:start + DECODE_CHUNK] for o in outputs], confidence=self.task.confidence)
            if chunk is None:
                raise ValueError("the outputs do not fit the task's decoder")
            decoded += chunk
        return decoded

    def disagreement(self) -> tuple[np.ndarray, np.ndarray]:
        """Lost plus new confident detections; the original's count to rank ties (the richest image
        first). Score changes are left out: nearly every image has some, an agreeing one is wanted too."""
        differs = [len(ref[0]) + len(cand[0]) - 2 * len(pairs) for ref, cand, pairs in zip(self.original, self.compressed, self.pairs, strict=True)]
        return np.asarray(differs, np.float64), np.asarray([len(ref[0]) for ref in self.original], dtype=np.float64)

    def _entries(self, decoded, matched: set, odd: str, unit: np.ndarray) -> list[dict]:
        boxes, scores, classes = decoded
        entries = [{"box": [round(float(v), 2) for v in box * unit], "class": int(c), "score": round(float(s), 4),
                    "status": "matched" if k in matched else odd} for k, (box, s, c) in enumerate(zip(boxes, scores, classes))]
        return sorted(entries, key=lambda e: (e["status"] == "matched", -e["score"]))[:MAX_BOXES]

    def example(self, index: int) -> tuple[dict, Image.Image]:
        picture, scale = _base(self.images[index])
        height, width = picture.height / scale, picture.width / scale
        ref, cand, pairs = self.original[index], self.compressed[index], self.pairs[index]
        # Boxes inside 0..1.5 on an image of more pixels are read as fractions of its size (SSD exports).
        every = np.concatenate([ref[0].ravel(), cand[0].ravel()])
        normalised = bool(len(every)) and max(height, width) > 4 and float(np.abs(every).max()) <= 1.5
        unit = np.asarray([width, height, width, height]) if normalised else np.ones(4)
        original = self._entries(ref, {i for i, _ in pairs}, "lost", unit)
        compressed = self._entries(cand, {j for _, j in pairs}, "new", unit)
        # The compressed model's first, the original's on top: a lost box is never covered.
        labels: list[tuple] = []
        draw.draw_boxes(picture, compressed, draw.COMPRESSED, scale, below=True, taken=labels)
        draw.draw_boxes(picture, original, draw.ORIGINAL, scale, taken=labels)
        lost, new = len(ref[0]) - len(pairs), len(cand[0]) - len(pairs)
        caption = [[("original", draw.ORIGINAL), (f": {len(ref[0])} detection(s), {lost} lost", draw.INK)],
                   [("compressed", draw.COMPRESSED), (f": {len(cand[0])} detection(s), {new} new", draw.INK)]]
        meta = {"lost": lost, "new": new, "scale": scale, "box_units": "fraction" if normalised else "pixels",
                "original": original, "compressed": compressed}
        return meta, draw.with_caption(picture, caption)


class Segmentation:
    def __init__(self, task, images, reference, candidate):
        index = (task.outputs or [0])[0]
        self.images = images
        self.original = segmentation.masks(reference[index], task.layout)
        self.compressed = segmentation.masks(candidate[index], task.layout)

    def disagreement(self) -> tuple[np.ndarray, np.ndarray]:
        differs = (self.original != self.compressed).reshape(len(self.original), -1).mean(axis=1)
        return differs, (self.original != 0).reshape(len(self.original), -1).mean(axis=1)

    def example(self, index: int) -> tuple[dict, Image.Image]:
        ref, cand = self.original[index], self.compressed[index]
        picture = draw.as_picture(self.images[index])
        if picture is None:
            raise ValueError(f"an input of shape {list(self.images[index].shape)} is not an image")
        # Per mask cell: a whole factor for small masks; four panels side by side, so each smaller.
        scale = draw.display_scale(*ref.shape, min_side=draw.MIN_SIDE * 5 // 8)
        size = (max(1, round(ref.shape[1] * scale)), max(1, round(ref.shape[0] * scale)))
        picture = picture.resize(size, Image.Resampling.BILINEAR)
        sheet, panels = draw.side_by_side([("image", picture), ("original", draw.mask_overlay(picture, ref)),
                                           ("compressed", draw.mask_overlay(picture, cand)),
                                           ("differs", draw.disagreement_map(picture, ref, cand))])
        differing = int((ref != cand).sum())
        meta = {"mask_shape": list(ref.shape), "differing_pixels": differing, "pixel_agreement": round(1 - differing / ref.size, 6),
                "mask_scale": scale, "panels": panels}
        return meta, draw.with_caption(sheet, [[(f"{differing} of {ref.size} mask pixels differ", draw.DIFFERS if differing else draw.INK)]])


class Ctc:
    def __init__(self, task, images, reference, candidate):
        index = (task.outputs or [0])[0]
        self.images = images
        self.original = ctc.greedy_decode(reference[index], blank=task.blank, layout=task.layout)
        self.compressed = ctc.greedy_decode(candidate[index], blank=task.blank, layout=task.layout)
        characters = {class_id: char for char, class_id in text_ids(task.alphabet, task.blank).items()} if task.alphabet else {}
        self.spelled = lambda ids: [characters.get(i, f"<{i}>") for i in ids]

    def disagreement(self) -> tuple[np.ndarray, np.ndarray]:
        distances = [ctc.edit_distance(r, c) for r, c in zip(self.original, self.compressed, strict=True)]
        return np.asarray(distances, np.float64), np.asarray([len(r) for r in self.original], np.float64)

    def example(self, index: int) -> tuple[dict, Image.Image]:
        picture, _ = _base(self.images[index])
        original, compressed = self.spelled(self.original[index]), self.spelled(self.compressed[index])
        lines = [[("original:   ", draw.INK)], [("compressed: ", draw.INK)]]
        # Each side's characters outside the longest common runs in red: the mismatches.
        for tag, i0, i1, j0, j1 in difflib.SequenceMatcher(a=original, b=compressed, autojunk=False).get_opcodes():
            same = tag == "equal"
            if i1 > i0:
                lines[0].append(("".join(original[i0:i1]), draw.ORIGINAL if same else draw.DIFFERS))
            if j1 > j0:
                lines[1].append(("".join(compressed[j0:j1]), draw.COMPRESSED if same else draw.DIFFERS))
        meta = {"original": "".join(original), "compressed": "".join(compressed),
                "edit_distance": ctc.edit_distance(self.original[index], self.compressed[index])}
        return meta, draw.with_caption(picture, lines)


class Keypoints:
    """The original's keypoints as numbered rings, the compressed model's as dots; a keypoint farther
    than the task's PCK threshold from the original's (a miss, as the fidelity counts it) joined by a
    red line. Only keypoints the model calls visible are drawn (all, without a visibility column)."""

    def __init__(self, task, images, reference, candidate):
        index = (task.outputs or [0])[0]
        self.task, self.images, self.shape = task, images, reference[index].shape
        self.original, self.visible = keypoints.decode(task, reference[index])
        self.compressed, self.compressed_visible = keypoints.decode(task, candidate[index])
        judged = np.ones(self.original.shape[:2], bool) if self.visible is None else self.visible
        sizes = keypoints.normalising_sizes(self.original, judged, task.normalize)
        self.judged = judged
        self.distance = np.linalg.norm(self.compressed - self.original, axis=2) / sizes[:, None]

    def disagreement(self) -> tuple[np.ndarray, np.ndarray]:
        """Misses per image, plus its mean normalised error to rank images with as many misses."""
        missed = ((self.distance > self.task.pck_threshold) & self.judged).sum(axis=1)
        error = np.where(self.judged, self.distance, 0).sum(axis=1) / np.maximum(self.judged.sum(axis=1), 1)
        return missed + np.minimum(error, 0.99), self.judged.sum(axis=1).astype(np.float64)

    def _unit(self, height: float, width: float) -> tuple[np.ndarray, str]:
        """Input pixels per output unit: heatmap cells (centres), fractions of the image, or pixels."""
        if self.task.layout == "heatmaps":
            return np.asarray([width / self.shape[3], height / self.shape[2]]), "cells"
        every = np.abs(np.concatenate([self.original.ravel(), self.compressed.ravel()]))
        if max(height, width) > 4 and len(every) and float(every.max()) <= 1.5:
            return np.asarray([width, height]), "fraction"
        return np.ones(2), "pixels"

    def example(self, index: int) -> tuple[dict, Image.Image]:
        picture, scale = _base(self.images[index])
        unit, units = self._unit(picture.height / scale, picture.width / scale)
        offset = 0.5 if units == "cells" else 0.0  # a heatmap cell's centre

        def at(point) -> tuple[float, float]:
            return tuple(round(float(v), 2) for v in (np.asarray(point) + offset) * unit)

        compressed_visible = self.compressed_visible[index] if self.compressed_visible is not None else self.judged[index]
        original, compressed, missed = [], [], []
        for k in range(self.original.shape[1]):
            if self.judged[index, k]:
                original.append({"k": k, "x": at(self.original[index, k])[0], "y": at(self.original[index, k])[1]})
            if compressed_visible[k]:
                entry = {"k": k, "x": at(self.compressed[index, k])[0], "y": at(self.compressed[index, k])[1]}
                if self.judged[index, k] and self.distance[index, k] > self.task.pck_threshold:
                    missed.append(k)
                    entry["to"] = at(self.original[index, k])
                compressed.append(entry)
        draw.draw_points(picture, original, draw.ORIGINAL, scale, ring=True)
        draw.draw_points(picture, compressed, draw.COMPRESSED, scale, ring=False)
        caption = [[("original", draw.ORIGINAL), (f": {len(original)} keypoint(s)", draw.INK)],
                   [("compressed", draw.COMPRESSED), (f": {len(missed)} farther than {self.task.pck_threshold:g} of the size",
                                                      draw.DIFFERS if missed else draw.INK)]]
        meta = {"original": original, "compressed": compressed, "missed": missed, "scale": scale, "point_units": units}
        return meta, draw.with_caption(picture, caption)


def _probabilities(rows: np.ndarray) -> np.ndarray:
    """Rows as they are when they already are distributions, else softmax (logits)."""
    if rows.min() >= 0 and np.allclose(rows.sum(axis=1), 1, atol=1e-3):
        return rows
    shifted = np.exp(rows - rows.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Classification:
    def __init__(self, task, images, reference, candidate):
        index = (task.outputs or [0])[0]
        self.images = images
        self.original = _probabilities(reference[index].reshape(len(reference[index]), -1).astype(np.float64))
        self.compressed = _probabilities(candidate[index].reshape(len(candidate[index]), -1).astype(np.float64))

    def disagreement(self) -> tuple[np.ndarray, np.ndarray]:
        top = self.original.argmax(axis=1)
        rows = np.arange(len(top))
        changed = (self.compressed.argmax(axis=1) != top).astype(np.float64)
        return changed + np.abs(self.original[rows, top] - self.compressed[rows, top]) / 2, self.original.max(axis=1)

    def example(self, index: int) -> tuple[dict, Image.Image]:
        picture, _ = _base(self.images[index])
        ref, cand = self.original[index], self.compressed[index]
        before, after = int(ref.argmax()), int(cand.argmax())
        lines = [[("original:   ", draw.INK), (f"class {before} ({ref[before]:.3f})", draw.ORIGINAL)],
                 [("compressed: ", draw.INK), (f"class {after} ({cand[after]:.3f})", draw.COMPRESSED if after == before else draw.DIFFERS)]]
        meta = {"original": {"class": before, "score": round(float(ref[before]), 4)},
                "compressed": {"class": after, "score": round(float(cand[after]), 4)}}
        return meta, draw.with_caption(picture, lines)


class Embedding:
    def __init__(self, task, images, reference, candidate):
        index = (task.outputs or [0])[0]
        ref, cand = (x.reshape(len(x), -1).astype(np.float64) for x in (reference[index], candidate[index]))
        norms = np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-12)
        self.images, self.cosine = images, (ref * cand).sum(axis=1) / norms

    def disagreement(self) -> tuple[np.ndarray, np.ndarray]:
        return 1 - self.cosine, np.zeros(len(self.cosine))

    def example(self, index: int) -> tuple[dict, Image.Image]:
        picture, _ = _base(self.images[index])
        cosine = float(self.cosine[index])
        return {"cosine": round(cosine, 6)}, draw.with_caption(picture, [[("cosine to the original's vector: ", draw.INK),
                                                                          (f"{cosine:.4f}", draw.COMPRESSED)]])


SHOWN = {"detection": Detection, "segmentation": Segmentation, "ctc": Ctc, "classification": Classification,
         "embedding": Embedding, "keypoints": Keypoints}
