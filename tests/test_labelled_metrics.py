"""The labelled task metrics (worker/engine/tasks/labelled.py) on cases computed by hand."""

import itertools

import numpy as np
import pytest

from worker.engine.tasks.labelled import ctc_scores, detection_map, segmentation_scores, verification_accuracy

# --- detection mAP ---------------------------------------------------------------------------

TRUTH = [(np.array([[0, 0, 10, 10], [20, 20, 40, 40]], float), np.array([0, 1])),
         (np.array([[5, 5, 25, 15]], float), np.array([1]))]


def _predicted(truth, score=0.9):
    return [(boxes, np.full(len(boxes), score), classes) for boxes, classes in truth]


def test_perfect_predictions_score_one_at_every_threshold():
    result = detection_map(TRUTH, _predicted(TRUTH))
    assert result == {"images": 2, "truth_boxes": 3, "map50": 1.0, "map50_95": 1.0, "map75": 1.0}


def test_one_of_two_truths_found_scores_51_of_101_recall_points():
    # One class, two truths, one exact detection: precision 1 up to recall 0.5, nothing beyond.
    # COCO's 101 recall points 0, 0.01, ..., 1: the 51 of them <= 0.5 have precision 1, so AP = 51/101.
    truth = [(np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float), np.array([0, 0]))]
    predicted = [(np.array([[0, 0, 10, 10]], float), np.array([0.8]), np.array([0]))]
    result = detection_map(truth, predicted)
    assert result["map50"] == pytest.approx(51 / 101, abs=1e-9)  # 0.50495; half (0.5) would fail
    assert result["map50_95"] == pytest.approx(51 / 101, abs=1e-9)


def test_a_box_at_iou_062_counts_at_050_to_060_but_not_from_065():
    truth = [(np.array([[0, 0, 10, 10]], float), np.array([3]))]
    predicted = [(np.array([[0, 0, 10, 6.2]], float), np.array([0.7]), np.array([3]))]  # IoU 62/100
    result = detection_map(truth, predicted)
    assert result["map50"] == 1.0 and result["map75"] == 0.0
    assert result["map50_95"] == pytest.approx(0.3, abs=1e-9)  # 3 of the 10 thresholds (0.50, 0.55, 0.60)


def test_a_wrong_class_and_a_higher_ranked_false_positive_lower_the_precision():
    # Two truths of class 0 in two images; a false positive ranked first, then both found:
    # precision 1/2 at recall 0.5 -> interpolated 2/3 (max precision at higher recall) up to recall 1.
    truth = [(np.array([[0, 0, 10, 10]], float), np.array([0])), (np.array([[0, 0, 10, 10]], float), np.array([0]))]
    predicted = [(np.array([[30, 30, 40, 40], [0, 0, 10, 10]], float), np.array([0.9, 0.8]), np.array([0, 0])),
                 (np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float), np.array([0.7, 0.95]), np.array([0, 5]))]
    # Ranked class-0 detections: 0.9 FP, 0.8 TP, 0.7 TP -> precision 0, 1/2, 2/3 at recall 0, .5, 1.
    # Interpolated (running max from the right) = 2/3 at every recall point: AP = 2/3. Class 5 is not in the truth.
    assert detection_map(truth, predicted)["map50"] == pytest.approx(2 / 3, abs=1e-9)


def test_no_predictions_score_zero_and_no_truth_scores_nothing():
    empty = [(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))] * 2
    assert detection_map(TRUTH, empty)["map50"] == 0.0
    nothing = [(np.zeros((0, 4)), np.zeros(0, int))]
    assert detection_map(nothing, empty[:1])["map50"] is None


def test_the_library_prints_nothing(capsys):
    detection_map(TRUTH, _predicted(TRUTH))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# --- segmentation ----------------------------------------------------------------------------

def test_segmentation_miou_and_pixel_accuracy_by_hand():
    truth = np.array([[[0, 0, 1, 1], [0, 0, 1, 255]]])
    predicted = np.array([[[0, 1, 1, 1], [0, 0, 2, 0]]])
    # Valid pixels: 7 (one ignored). Correct: 0,0 | 1,1 | 0,0 -> 5 of 7... count: positions
    # (0,0)=0/0 ok, (0,1)=0/1, (0,2)=1/1 ok, (0,3)=1/1 ok, (1,0)=0/0 ok, (1,1)=0/0 ok, (1,2)=1/2.
    # class 0: truth {00,01,10,11}, pred {00,10,11} -> I 3, U 4; class 1: truth {02,03,12}, pred {01,02,03} -> I 2, U 4;
    # class 2: truth {}, pred {12} -> I 0, U 1. (The ignored pixel's prediction 0 counts for nothing.)
    result = segmentation_scores(truth, predicted)
    assert result["pixel_accuracy"] == pytest.approx(5 / 7)
    assert result["miou"] == pytest.approx((3 / 4 + 2 / 4 + 0) / 3)


def test_segmentation_of_identical_masks_is_perfect_and_all_ignored_is_none():
    masks = np.random.default_rng(0).integers(0, 5, (2, 8, 8))
    assert segmentation_scores(masks, masks) == {"miou": 1.0, "pixel_accuracy": 1.0}
    assert segmentation_scores(np.full((1, 2, 2), 255), np.zeros((1, 2, 2), int)) == {"miou": None, "pixel_accuracy": None}


# --- ctc -------------------------------------------------------------------------------------

def test_ctc_exact_match_and_cer_by_hand():
    truth = [(1, 2, 3), (4, 5), (6,)]
    predicted = [(1, 2, 3), (4,), (7, 8)]
    # Edits: 0, 1 (a deletion), 2 (a substitution and an insertion) over 6 truth characters.
    assert ctc_scores(truth, predicted) == {"exact_match": pytest.approx(1 / 3), "cer": pytest.approx(3 / 6)}


# --- embedding verification ------------------------------------------------------------------

def _brute_force_best(similarity, same):
    """Every threshold at a similarity and above the top: the best accuracy (independent of the sort)."""
    candidates = list(similarity) + [similarity.max() + 1]
    return max(np.mean((similarity >= t) == same) for t in candidates)


def test_verification_accuracy_at_the_best_threshold_by_hand():
    embeddings = np.array([[1, 0], [1, 0.1], [0, 1], [-1, 0], [0.7, 0.7]], float)
    pairs = np.array([[0, 1], [0, 2], [0, 3], [2, 4], [1, 4]])
    same = np.array([1, 0, 0, 1, 0])
    # Cosines: 0.995, 0, -1, 0.707, 0.774. "Same" at >= t: no threshold separates (0.707 same is below
    # 0.774 different); the best, t in (0.774, 0.995] or (0, 0.707], gets 4 of 5 right.
    result = verification_accuracy(embeddings, pairs, same)
    assert result["verification_accuracy"] == pytest.approx(4 / 5) and result["pairs"] == 5
    predicted = (np.array([0.995, 0, -1, 0.707, 0.774]) >= result["threshold"]) == same.astype(bool)
    assert predicted.mean() == pytest.approx(4 / 5)  # the threshold reported is the one that scores it


def test_verification_accuracy_matches_a_brute_force_search_and_10_folds_do_not_exceed_it():
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(40, 8))
    pairs = np.array(list(itertools.combinations(range(40), 2)))[rng.permutation(780)[:200]]
    same = rng.random(200) < 0.4
    result = verification_accuracy(embeddings, pairs, same)
    a, b = embeddings[pairs[:, 0]], embeddings[pairs[:, 1]]
    similarity = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert result["verification_accuracy"] == pytest.approx(_brute_force_best(similarity, same), abs=1e-12)
    assert result["verification_accuracy_10fold"] <= result["verification_accuracy"]


# --- targets through take / head / split -------------------------------------------------------

def test_targets_follow_the_images_kept_and_boxes_and_pairs_are_reindexed():
    from worker.engine.data import ImageSet, Targets, split

    targets = Targets(boxes=np.arange(16, dtype=float).reshape(4, 4), box_classes=np.array([0, 1, 2, 3]),
                      box_images=np.array([0, 2, 2, 3]), masks=np.arange(4)[:, None, None] * np.ones((4, 2, 2), int),
                      texts=np.array(["a", "b", "c", "d"]), pairs=np.array([[0, 2], [1, 3], [3, 2]]),
                      pair_same=np.array([True, False, True]))
    data = ImageSet(np.arange(4, dtype=np.float32)[:, None, None, None], None, targets)
    kept = data.take(np.array([3, 2]))
    # Image 3 is now 0, image 2 is now 1: boxes of images 2, 2, 3 remain; of the pairs only (3, 2).
    np.testing.assert_array_equal(kept.targets.box_images, [1, 1, 0])
    np.testing.assert_array_equal(kept.targets.box_classes, [1, 2, 3])
    np.testing.assert_array_equal(kept.targets.pairs, [[0, 1]])
    np.testing.assert_array_equal(kept.targets.pair_same, [True])
    np.testing.assert_array_equal(kept.targets.masks[:, 0, 0], [3, 2])
    assert kept.targets.texts.tolist() == ["d", "c"]
    head = data.head(3)
    np.testing.assert_array_equal(head.targets.box_images, [0, 2, 2])
    np.testing.assert_array_equal(head.targets.pairs, [[0, 2]])
    assert data.head(10).targets is targets  # the whole set: nothing re-indexed
    rest, held_out = split(data, eval_fraction=0.5, seed=0)
    for part in (rest, held_out):  # every box lands with its image: its class is the image's own box classes
        for box_image, box_class in zip(part.targets.box_images, part.targets.box_classes):
            original_image = int(part.images[box_image, 0, 0, 0])
            assert box_class in targets.box_classes[targets.box_images == original_image]
    assert len(rest.targets.boxes) + len(held_out.targets.boxes) == 4
