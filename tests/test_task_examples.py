"""The report's example images, drawn from hand-made arrays: the input shown whatever its layout and
normalisation, the informative images picked, a lost detection drawn in the original's colour where
it was, the disagreement map red exactly where two masks differ, the two decoded strings, and a
failure to draw recorded rather than raised."""

import base64
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

from tests.examples_check import reddish
from worker.engine.examples import draw, informative, task_examples
from worker.engine.report import render

YOLO = {"type": "detection", "decoder": {"kind": "yolo", "layout": "channels_first", "box_format": "xyxy"}}


def decoded(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_an_input_is_shown_whatever_its_layout_and_normalisation():
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0, 1, (3, 10, 12))
    normalised = (rgb - np.array([0.485, 0.456, 0.406])[:, None, None]) / np.array([0.229, 0.224, 0.225])[:, None, None]
    channels_first, channels_last = draw.as_picture(normalised), draw.as_picture(normalised.transpose(1, 2, 0))
    assert channels_first.size == (12, 10)
    assert np.array_equal(np.asarray(channels_first), np.asarray(channels_last))
    pixels = np.asarray(channels_first)
    assert pixels.min() == 0 and pixels.max() == 255  # stretched back to the full range
    # The stretch keeps the order of the values: the brightest input pixel of the red channel is 255.
    assert pixels[..., 0].flat[np.argmax(rgb[0])] == 255
    grey = np.asarray(draw.as_picture(rgb[:1]))
    assert np.array_equal(grey[..., 0], grey[..., 2])  # one channel: grey
    assert draw.as_picture(np.zeros(16)) is None  # a vector is no image
    assert draw.display_scale(8, 8) == 40.0 and draw.display_scale(1000, 500) == draw.MAX_SIDE / 1000


def test_the_most_differing_images_are_picked_then_the_best_agreeing_one():
    disagreement = np.array([0.0, 2.0, 0.0, 5.0, 1.0, 3.0, 0.0])
    content = np.array([1.0, 0, 4.0, 0, 0, 0, 2.0])
    assert informative(disagreement, content, limit=4) == [3, 5, 1, 2]  # 2: agrees, with the most content
    assert informative(np.zeros(3), np.array([0.0, 1.0, 0.0]), limit=4) == [1, 0, 2]


def yolo_output(boxes_per_image: list[list[tuple]], anchors: int = 8, classes: int = 3) -> np.ndarray:
    """(N, 4 + C, A) rows: each (x0, y0, x1, y1, class, score) on its own anchor, the rest empty."""
    output = np.zeros((len(boxes_per_image), 4 + classes, anchors), np.float32)
    for n, boxes in enumerate(boxes_per_image):
        for a, (x0, y0, x1, y1, cls, score) in enumerate(boxes):
            output[n, :4, a] = (x0, y0, x1, y1)
            output[n, 4 + cls, a] = score
    return output


def test_a_lost_detection_is_drawn_in_the_originals_colour_where_it_was(tmp_path):
    images = np.full((3, 1, 32, 32), 0.5, np.float32)
    images[:, :, :4] = 1.0  # some contrast, so the stretch is not flat
    reference = yolo_output([[(2, 2, 12, 12, 0, 0.9)], [(4, 4, 20, 28, 1, 0.8), (22, 6, 30, 14, 2, 0.95)], [(1, 1, 5, 5, 0, 0.7), (9, 9, 20, 20, 1, 0.6)]])
    candidate = yolo_output([[(2, 2, 12, 12, 0, 0.85)], [(4, 4, 20, 28, 1, 0.75)], [(1, 1, 5, 5, 0, 0.7), (9, 9, 20, 20, 1, 0.7)]])
    shown = task_examples(YOLO, images, [reference], [candidate], tmp_path, limit=2)
    first, second = shown["images"]
    assert first["index"] == 1 and first["lost"] == 1 and first["new"] == 0  # the image that lost one comes first
    assert second["index"] == 2 and second["lost"] == 0  # then an agreeing one, the richest (2 detections)
    lost = [entry for entry in first["original"] if entry["status"] == "lost"]
    assert lost == [{"box": [22.0, 6.0, 30.0, 14.0], "class": 2, "score": 0.95, "status": "lost"}]
    assert [entry["status"] for entry in first["compressed"]] == ["matched"]
    pixels, scale = decoded(tmp_path / "0.png"), first["scale"]
    x0, y0, x1, y1 = (round(v * scale) for v in lost[0]["box"])
    right_edge = pixels[y0 + 20:y1 - 2, x1 - 1]  # under the label, on the box's right side
    assert (right_edge == draw.ORIGINAL).all(axis=1).all()
    assert not (pixels[: round(32 * scale), : round(3 * scale)] == draw.ORIGINAL).all(axis=2).any()  # none where no box is
    assert (tmp_path / "0.png").stat().st_size == first["png_bytes"] <= draw.MAX_PNG_BYTES


def test_the_disagreement_map_is_red_exactly_where_the_masks_differ(tmp_path):
    logits_ref = np.zeros((2, 3, 6, 8), np.float32)
    logits_ref[:, 1, 1:4, 2:6] = 5  # a rectangle of class 1
    logits_cand = logits_ref.copy()
    logits_cand[0, 2, 0:2, 0:3] = 9  # six pixels become class 2 in image 0
    images = np.random.default_rng(1).uniform(0, 1, (2, 6, 8, 3)).astype(np.float32)  # channels last
    shown = task_examples({"type": "segmentation"}, images, [logits_ref], [logits_cand], tmp_path, limit=1)
    (entry,) = shown["images"]
    assert entry["index"] == 0 and entry["differing_pixels"] == 6 and entry["mask_shape"] == [6, 8]
    x, y, width, height = entry["panels"]["differs"]
    panel = decoded(tmp_path / "0.png")[y:y + height, x:x + width]
    red = (panel == draw.DIFFERS).all(axis=2)
    scale = int(entry["mask_scale"])
    expected = np.kron(logits_ref[0].argmax(axis=0) != logits_cand[0].argmax(axis=0), np.ones((scale, scale), bool))
    assert red.shape == expected.shape and np.array_equal(red, expected)


def test_the_two_decoded_strings_are_written_under_a_text_line(tmp_path):
    def steps(ids, classes=5):
        output = np.zeros((len(ids), classes), np.float32)
        output[np.arange(len(ids)), ids] = 1
        return output
    reference = np.stack([steps([1, 0, 2, 0, 3, 3]), steps([4, 4, 0, 1, 0, 0])])
    candidate = np.stack([steps([1, 0, 2, 0, 4, 4]), steps([4, 4, 0, 1, 0, 0])])
    images = np.random.default_rng(2).uniform(0, 1, (2, 1, 8, 24)).astype(np.float32)
    shown = task_examples({"type": "ctc", "alphabet": "abcd"}, images, [reference], [candidate], tmp_path)
    first, second = shown["images"]
    assert (first["original"], first["compressed"], first["edit_distance"]) == ("abc", "abd", 1)
    assert (second["original"], second["compressed"], second["edit_distance"]) == ("da", "da", 0)
    pixels = decoded(tmp_path / "0.png")
    # The mismatch is marked in red on both lines under the image: "c" of the original's, "d" of the compressed's.
    assert reddish(pixels[-38:-20]).any() and reddish(pixels[-20:]).any()
    assert not reddish(decoded(tmp_path / "1.png")).any()  # an agreeing one has none


def test_a_failure_to_draw_is_recorded_not_raised(tmp_path):
    vectors = np.zeros((2, 16), np.float32)
    outputs = [np.eye(2, 4, dtype=np.float32)]
    shown = task_examples({"type": "classification"}, vectors, outputs, outputs, tmp_path)
    assert "is not an image" in shown["error"]
    assert task_examples({"type": "generic"}, vectors, outputs, outputs, tmp_path)["images"] == []


def test_the_report_embeds_each_drawn_image(tmp_path):
    images = np.random.default_rng(3).uniform(0, 1, (3, 3, 8, 8)).astype(np.float32)
    reference = [np.array([[3.0, 1, 0], [0, 2, 1], [0, 0, 4]], np.float32)]
    candidate = [np.array([[3.0, 1, 0], [0, 1, 2], [0, 0, 4]], np.float32)]
    shown = task_examples({"type": "classification"}, images, reference, candidate, tmp_path)
    assert [(e["index"], e["original"]["class"], e["compressed"]["class"]) for e in shown["images"]][0] == (1, 1, 2)
    pictures = {e["file"]: (tmp_path / e["file"].split("/")[1]).read_bytes() for e in shown["images"]}
    html = render({"examples": shown}, job_id="j", pictures=pictures)
    assert "What the task sees" in html
    for entry in shown["images"]:
        uri = re.search(f'id="{entry["element_id"]}" src="data:image/png;base64,([^"]+)"', html).group(1)
        assert base64.b64decode(uri) == pictures[entry["file"]]
        assert Image.open(io.BytesIO(base64.b64decode(uri))).size == (entry["width"], entry["height"])


def test_a_missed_keypoint_is_joined_to_the_originals_by_a_red_line(tmp_path):
    images = np.full((3, 1, 32, 32), 0.5, np.float32)
    images[:, :, :4] = 1.0
    corners = np.array([[4.0, 4, 1], [28, 4, 1], [28, 28, 1], [4, 28, 1], [16, 16, 0]], np.float32)  # the last hidden
    reference = np.repeat(corners[None], 3, axis=0)
    candidate = reference.copy()
    candidate[:, :, :2] += 0.3  # everywhere: within 0.05 of the 34-pixel diagonal
    candidate[1, 2, :2] = (16, 20)  # image 1 misses keypoint 2 by 14 pixels
    task = {"type": "keypoints", "layout": "points"}
    shown = task_examples(task, images, [reference], [candidate], tmp_path, limit=2)
    first, second = shown["images"]
    assert first["index"] == 1 and first["missed"] == [2] and second["missed"] == []
    assert [point["k"] for point in first["original"]] == [0, 1, 2, 3]  # the hidden one is not drawn
    assert first["point_units"] == "pixels"
    pixels, scale = decoded(tmp_path / "0.png"), first["scale"]
    # The line from the compressed dot (16, 20) to the original's ring (28, 28) is red half-way.
    mid_x, mid_y = round(22 * scale), round(24 * scale)
    assert reddish(pixels[mid_y - 2:mid_y + 3, mid_x - 2:mid_x + 3]).any()
    # The ring of keypoint 0 is orange, 6 pixels left of its centre; nothing red on image 2.
    assert (pixels[round(4 * scale), round(4 * scale) - 6] == draw.ORIGINAL).all()
    assert not reddish(decoded(tmp_path / "1.png")[: round(32 * scale)]).any()


def test_keypoint_images_are_described_in_the_report_and_a_bad_entry_never_fails_it(tmp_path):
    images = np.random.default_rng(5).uniform(0, 1, (2, 1, 16, 16)).astype(np.float32)
    reference = np.array([[[2.0, 2], [12, 3], [8, 13]], [[3.0, 3], [13, 3], [8, 12]]], np.float32)
    candidate = reference.copy()
    candidate[0, 1] = (4, 12)
    shown = task_examples({"type": "keypoints", "layout": "points"}, images, [reference], [candidate], tmp_path)
    pictures = {entry["file"]: (tmp_path / Path(entry["file"]).name).read_bytes() for entry in shown["images"]}
    html = render({"examples": shown}, job_id="job_x", pictures=pictures)
    assert "missed (beyond the PCK threshold): 1." in html and html.count('<img id="example-') == 2
    broken = {**shown, "images": [{**shown["images"][0], "original": None}]}
    assert "could not be shown" in render({"examples": broken}, job_id="job_x", pictures=pictures)
