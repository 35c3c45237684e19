"""Task spec parsing/inference and label-free task fidelity, against references computed here."""

import numpy as np
import pytest
from pydantic import ValidationError

from modelpress.spec.configs.task import (
    BoxesScoresDecoder, ClassificationTask, CtcTask, DetectionTask, SegmentationTask, infer_task, parse_task, resolve_task)
from worker.engine.fidelity import worst_slice
from worker.engine.tasks.ctc import greedy_decode, string_agreement
from worker.engine.tasks.detection import decode_yolo, detection_agreement, iou_matrix
from worker.engine.tasks.embedding import embedding_agreement
from worker.engine.tasks.groups import group_fidelity, yolo_groups
from worker.engine.tasks.segmentation import mask_agreement, masks


# --- task spec -------------------------------------------------------------------------------

def test_task_bodies_parse_by_type_and_bad_ones_are_refused():
    task = parse_task({"type": "detection", "decoder": {"kind": "yolo", "box_format": "xyxy"}})
    assert isinstance(task, DetectionTask) and task.decoder.box_format == "xyxy"
    assert isinstance(parse_task({"type": "ctc", "blank": 3}), CtcTask)
    for bad in ({"type": "astrology"}, {"type": "ctc", "blank": -1}, {"type": "detection", "decoder": {"kind": "anchors"}},
                {"type": "classification", "surprise": 1}, {"type": "detection", "confidence": 1.5}):
        with pytest.raises(ValidationError):
            parse_task(bad)


@pytest.mark.parametrize(("shapes", "expected"), [
    ([(1, 10)], ClassificationTask),
    ([(1, 84, 8400)], DetectionTask),
    ([(1, 25, 37)], CtcTask),
    ([(1, "width", 37)], CtcTask),
    ([(1, 3, 32, 32)], SegmentationTask),
])
def test_task_is_inferred_from_output_shapes_with_a_reason(shapes, expected):
    inferred = infer_task(shapes)
    assert isinstance(inferred.task, expected) and inferred.inferred and inferred.reason


def test_two_box_and_score_outputs_read_as_ssd_style_and_a_given_task_overrides_inference():
    inferred = infer_task([(1, 100, 4), (1, 100, 21)])
    assert isinstance(inferred.task.decoder, BoxesScoresDecoder)
    given = resolve_task({"type": "segmentation"}, [(1, 10)])
    assert isinstance(given.task, SegmentationTask) and not given.inferred


# --- detection -------------------------------------------------------------------------------

def _yolo_output(rng, anchors=64, classes=3):
    """(1, 4+C, A): pixel xywh boxes then 0..1 scores, three confident anchors."""
    out = np.zeros((1, 4 + classes, anchors), dtype=np.float32)
    out[0, :2] = rng.uniform(50, 600, (2, anchors))
    out[0, 2:4] = rng.uniform(20, 80, (2, anchors))
    out[0, 4:] = rng.uniform(0.0, 0.2, (classes, anchors))
    for anchor, cls in ((3, 0), (17, 1), (40, 2)):
        out[0, 4 + cls, anchor] = 0.9
    return out


def test_iou_matrix_matches_hand_computed_overlaps():
    a = np.array([[0, 0, 10, 10]], dtype=float)
    b = np.array([[5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=float)
    np.testing.assert_allclose(iou_matrix(a, b), [[25 / 175, 1.0, 0.0]])


def test_collapsed_scores_hide_behind_pixel_boxes_in_the_whole_but_not_per_group():
    rng = np.random.default_rng(0)
    reference = _yolo_output(rng)
    candidate = reference.copy()
    candidate[0, 4:] = np.round(candidate[0, 4:] / 0.5) * 0.5 * 0.3  # one coarse scale: scores collapse
    whole = float((reference.ravel() @ candidate.ravel())
                  / (np.linalg.norm(reference) * np.linalg.norm(candidate)))
    groups = group_fidelity(reference, candidate, yolo_groups(reference.shape[1]))
    assert whole > 0.99
    assert groups["boxes"]["cosine"] == pytest.approx(1.0)
    assert groups["scores"]["cosine"] < 0.9
    agreement = detection_agreement(decode_yolo(reference), decode_yolo(candidate))
    assert agreement["reference_detections"] == 3 and agreement["lost"] == 3 and agreement["recall"] == 0.0


def test_detection_agreement_counts_a_moved_box_as_lost_and_keeps_the_rest():
    rng = np.random.default_rng(1)
    reference = _yolo_output(rng)
    candidate = reference.copy()
    candidate[0, 0, 17] += 500  # the class-1 box moves far away: IoU 0
    candidate[0, 4 + 0, 3] = 0.8
    agreement = detection_agreement(decode_yolo(reference), decode_yolo(candidate))
    assert (agreement["matched"], agreement["lost"], agreement["new"]) == (2, 1, 1)
    assert agreement["max_score_error"] == pytest.approx(0.1, abs=1e-6)


def test_label_free_detection_map_takes_the_originals_confident_boxes_as_truth():
    from worker.engine.tasks.measure import task_fidelity

    rng = np.random.default_rng(4)
    reference = _yolo_output(rng)
    reference[0, 4:] = np.where(reference[0, 4:] >= 0.9, reference[0, 4:], 0.0)  # no low-score tail
    same = task_fidelity([reference], [reference.copy()], given={"type": "detection"})["fidelity"]
    assert same["map50"] == 1.0 and same["map50_95"] == 1.0
    moved = reference.copy()
    moved[0, 0, 17] += 500  # the class-1 box goes far away: that class's AP is 0, the others' 1
    figures = task_fidelity([reference], [moved], given={"type": "detection"})["fidelity"]
    assert figures["map50"] == pytest.approx(2 / 3, abs=1e-9) and figures["map50_95"] == pytest.approx(2 / 3, abs=1e-9)
    faint = reference.copy()
    faint[0, 4:] *= 0.01  # every score 0.009: below the 0.5 cut (all lost) but still ranked for mAP
    figures = task_fidelity([reference], [faint], given={"type": "detection"})["fidelity"]
    assert figures["lost"] == 3 and figures["map50"] == 1.0


# --- segmentation, CTC, embedding -------------------------------------------------------------

def test_mask_agreement_matches_hand_counted_pixels():
    reference = np.array([[[0, 0], [1, 1]]])
    candidate = np.array([[[0, 1], [1, 1]]])
    result = mask_agreement(reference, candidate)
    assert result["pixel_agreement"] == pytest.approx(0.75)
    assert result["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    logits = np.zeros((1, 2, 2, 2))
    logits[0, 1, 1] = 1.0
    np.testing.assert_array_equal(masks(logits), reference)


def test_ctc_greedy_decode_collapses_repeats_and_drops_blanks():
    steps = [1, 1, 0, 1, 2, 2, 0]  # "a a _ a b b _" → (1, 1, 2)
    output = np.eye(3)[steps][None]
    assert greedy_decode(output) == [(1, 1, 2)]
    assert greedy_decode(np.swapaxes(output, 0, 1), layout="TNC") == [(1, 1, 2)]
    result = string_agreement([(1, 1, 2), (3,)], [(1, 2), (3,)])
    assert result["exact_match"] == 0.5 and result["cer"] == pytest.approx(1 / 4)


def test_embedding_agreement_sees_a_shuffled_embedding_lose_its_neighbours():
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(40, 16))
    same = embedding_agreement(reference, reference * 3.0)
    assert same["mean_cosine"] == pytest.approx(1.0) and same["neighbour_agreement"] == 1.0
    shuffled = embedding_agreement(reference, rng.permutation(reference))
    assert shuffled["mean_cosine"] < 0.5 and shuffled["neighbour_agreement"] < 0.5


def test_worst_slice_ignores_slices_of_noise_energy():
    rng = np.random.default_rng(3)
    reference = np.stack([rng.normal(size=(8, 50)), rng.normal(size=(8, 50)) * 1e-7], axis=1)  # (8, 2, 50)
    candidate = reference.copy()
    candidate[:, 1] = rng.normal(size=(8, 50)) * 1e-7  # the noise slice: unrelated noise
    candidate[:, 0] += 0.01 * rng.normal(size=(8, 50))
    worst = worst_slice(reference, candidate)
    assert worst["cosine"] > 0.99  # the signal slice, not cosine ~0 for the noise one


def test_floor_reports_each_shortfall_and_honours_overrides():
    from modelpress.spec.floor import shortfalls
    assert shortfalls("ctc", {"exact_match": 0.97}) == []
    assert shortfalls("ctc", {"exact_match": 0.31}) == [
        {"metric": "exact_match", "value": 0.31, "bound": 0.95, "direction": "min"}]
    assert shortfalls("ctc", {"exact_match": 0.31}, {"exact_match": 0.3}) == []
    missed = shortfalls("detection", {"recall": 1.0})
    assert [m["metric"] for m in missed] == ["scores_cosine"]


def test_a_task_that_cannot_read_the_outputs_is_named_and_unknown_dimensions_pass():
    from modelpress.spec.configs.task import misfit, parse_task
    assert misfit(parse_task({"type": "classification"}), [[None, 10]]) is None
    assert "rank-3" in misfit(parse_task({"type": "detection"}), [[None, 10]])
    assert "at least 5 rows" in misfit(parse_task({"type": "detection"}), [[None, 4, 64]])
    assert misfit(parse_task({"type": "detection"}), [["n", "rows", "anchors"]]) is None  # known only at run time
    assert "2 output(s)" in misfit(parse_task({"type": "ctc", "outputs": [2]}), [[1, 5, 9], [1, 5, 9]])
    assert "rank-3" in misfit(parse_task({"type": "segmentation", "layout": "labels"}), [[1, 2, 8, 8]])
    assert misfit(parse_task({"type": "detection", "decoder": {"kind": "boxes_scores", "scores_output": 1}}), [[1, 8, 4]])
    assert misfit(parse_task({"type": "embedding"}), [None]) is None


def test_the_floor_verdict_fails_only_a_measured_miss_with_the_floor_on():
    from worker.engine.tasks.floor import failed, judge, message
    result = {"task": {"type": "classification"}, "fidelity": {"top1_agreement": 0.5},
              "floor_shortfalls": [{"metric": "top1_agreement", "value": 0.5, "bound": 0.95, "direction": "min"}]}
    verdict = judge(result)
    assert verdict["met"] is False and verdict["bounds"] == {"top1_agreement": 0.95} and failed(verdict)
    assert "top1_agreement 0.5000 < 0.95" in message(verdict)
    assert judge(result, {"top1_agreement": 0.4})["bounds"] == {"top1_agreement": 0.4}
    assert not failed(judge(result, "off"))
    unmeasured = judge({"task": {"type": "detection"}, "fidelity": None, "note": "the output's shape does not fit"})
    assert unmeasured["met"] is None and not failed(unmeasured) and "does not fit" in unmeasured["note"]
    assert judge({"task": {"type": "generic"}, "fidelity": {}})["met"] is None
