"""Checks of a finished job's example images (metrics.examples, embedded in report.html) against the
test's own decoding of the original's and the compressed model's outputs: the drawn detections,
strings and masks are the ones the models gave, and the pixels show them."""

import base64
import hashlib
import io
import itertools
import re

import numpy as np
from PIL import Image

ORIGINAL, DIFFERS = (255, 140, 0), (220, 30, 30)  # the report's colours, as documented in docs/METRICS.md


def reddish(pixels: np.ndarray) -> np.ndarray:
    """Pixels of the mismatch red, anti-aliased text included (orange and blue are not)."""
    return (pixels[..., 0] > 170) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)


def embedded_images(client, job: dict) -> list[tuple[dict, np.ndarray]]:
    """Each listed example and its pixels, read back from the report's data URI (same bytes as listed)."""
    examples = job["metrics"]["examples"]
    assert "error" not in examples, examples
    assert 1 <= len(examples["images"]) <= 4
    html = client.get(f"/v1/jobs/{job['id']}/artifacts/report.html").text
    assert "What the task sees" in html
    found = []
    for entry in examples["images"]:
        match = re.search(f'id="{entry["element_id"]}" src="data:image/png;base64,([^"]+)"', html)
        data = base64.b64decode(match.group(1))
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["png_bytes"]
        picture = Image.open(io.BytesIO(data))
        assert picture.format == "PNG" and picture.size == (entry["width"], entry["height"])
        found.append((entry, np.asarray(picture.convert("RGB"))))
    return found


def confident_xyxy(rows: np.ndarray, confidence: float = 0.5) -> list[tuple]:
    """One image's (4 + C, A) rows: (x0, y0, x1, y1, class) of every anchor at or above `confidence`."""
    scores = rows[4:]
    keep = scores.max(axis=0) >= confidence
    cx, cy, w, h = rows[:4, keep]
    return list(zip(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, scores[:, keep].argmax(axis=0)))


def drawn_from(drawn: list[dict], confident: list[tuple]) -> bool:
    """Each drawn box is one of these confident anchors (same class, the same corners to rounding)."""
    return all(any(np.allclose(d["box"], box[:4], atol=0.02) and d["class"] == box[4] for box in confident) for d in drawn)


def check_detector(client, job: dict, original: np.ndarray, int8: np.ndarray) -> None:
    shown = embedded_images(client, job)
    first = shown[0][0]
    assert first["lost"] + first["new"] == max(e["lost"] + e["new"] for e, _ in shown)  # the most differing first
    if job["metrics"]["comparison"]["task"]["fidelity"]["lost"] > 0:  # measured: 19 of 504 lost
        assert first["lost"] > 0
    for entry, pixels in shown:
        assert drawn_from(entry["original"], confident_xyxy(original[entry["index"]]))
        assert drawn_from(entry["compressed"], confident_xyxy(int8[entry["index"]]))
        for drawn in [d for d in entry["original"] if d["status"] == "lost"]:
            x0, y0, x1, y1 = (round(v * entry["scale"]) for v in drawn["box"])
            left = pixels[max(0, y0):min(y1, len(pixels)), max(0, x0)]
            assert (left == ORIGINAL).all(axis=1).mean() > 0.5  # the lost box's left side, in the original's colour


def greedy(output) -> list[tuple]:
    return [tuple(c for c, _ in itertools.groupby(steps.argmax(axis=1)) if c != 0) for steps in output]


def check_recognizer(client, job: dict, original: np.ndarray, int8: np.ndarray, alphabet: str) -> None:
    shown = embedded_images(client, job)
    html = client.get(f"/v1/jobs/{job['id']}/artifacts/report.html").text
    before, after = greedy(original), greedy(int8)
    distances = [entry["edit_distance"] for entry, _ in shown]
    assert distances[0] == max(distances) and (distances[0] > 0) == (before != after)
    for entry, pixels in shown:
        spelled = ["".join(alphabet[c - 1] for c in seq[entry["index"]]) for seq in (before, after)]
        assert [entry["original"], entry["compressed"]] == spelled
        assert f"original “{entry['original']}”, compressed “{entry['compressed']}”" in html
        # A mismatch is marked in red under the line, and only then.
        assert reddish(pixels).any() == (entry["original"] != entry["compressed"])


def check_segmenter(client, job: dict, original: np.ndarray, int8: np.ndarray) -> None:
    for entry, pixels in embedded_images(client, job):
        differs = original[entry["index"]].argmax(axis=0) != int8[entry["index"]].argmax(axis=0)
        assert entry["differing_pixels"] == differs.sum()
        x, y, width, height = entry["panels"]["differs"]
        scale = int(entry["mask_scale"])
        red = (pixels[y:y + height, x:x + width] == DIFFERS).all(axis=2)
        assert np.array_equal(red, np.kron(differs, np.ones((scale, scale), bool)))  # exactly where they differ
