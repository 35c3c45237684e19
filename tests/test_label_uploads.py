"""Task labels in an uploaded .npz: accepted with their summary and kinds, or refused with
invalid_labels and a message naming the array, before any job is made."""

import io

import numpy as np
import pytest

from tests.test_models_api import assert_problem

N = 6
IMAGES = np.zeros((N, 1, 8, 8), np.uint8)
BOX = {"boxes": np.array([[1.0, 2, 5, 6]]), "box_classes": np.array([2]), "box_images": np.array([3])}


def _upload(client, **arrays):
    buffer = io.BytesIO()
    np.savez(buffer, images=IMAGES, **arrays)
    return client.post("/v1/datasets", files={"file": ("data.npz", buffer.getvalue())})


def test_labels_of_every_kind_are_accepted_with_their_summary(client):
    response = _upload(client, labels=np.arange(N) % 2, **BOX, masks=np.full((N, 4, 4), 255, np.uint8),
                       texts=np.array(["ab", "", "ba", "c", "abc", "a"]), pairs=np.array([[0, 1], [2, 5]]),
                       pair_same=np.array([1, 0]))
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["label_kinds"] == ["classes", "boxes", "masks", "pairs", "texts"]
    assert dataset["labels"] == {
        "boxes": {"count": 1, "max_class": 2, "min_x": 1.0, "min_y": 2.0, "max_x": 5.0, "max_y": 6.0},
        "masks": {"height": 4, "width": 4, "max_class": None},  # every pixel ignored
        "texts": {"count": N, "max_length": 3, "characters": "abc"},
        "pairs": {"count": 2, "max_index": 5, "same": 1}}
    sequences = _upload(client, label_sequences=np.array([[3, 1, -1], [2, -1, -1]] * 3)).json()
    assert sequences["label_kinds"] == ["sequences"] and sequences["labels"]["sequences"]["ids"] == [1, 2, 3]
    assert _upload(client).json()["label_kinds"] == []


@pytest.mark.parametrize("arrays, words", [
    ({"boxes": BOX["boxes"], "box_classes": BOX["box_classes"]}, "box_images"),
    ({**BOX, "boxes": np.array([[1.0, 2, 5]])}, "'boxes' has shape [1, 3]"),
    ({**BOX, "boxes": np.array([[1.0, np.nan, 5, 6]])}, "NaN"),
    ({**BOX, "box_images": np.array([N])}, "names image 6"),
    ({**BOX, "box_classes": np.array([-1])}, "class ids outside"),
    ({**BOX, "boxes": np.array([[5.0, 2, 5, 6]])}, "is empty"),  # x2 == x1: degenerate
    ({**BOX, "box_classes": np.array([0.5])}, "'box_classes' has dtype float64"),
    ({"masks": np.zeros((N - 1, 4, 4), np.uint8)}, "one mask per image"),
    ({"masks": np.zeros((N, 4, 4), np.float32)}, "integer class ids"),
    ({"masks": np.full((N, 4, 4), 200_000, np.int32)}, "class id 200000"),
    ({"label_sequences": np.array([[1, -1, 2]] * N)}, "after the -1 padding"),
    ({"label_sequences": np.array([[1, -2]] * N)}, "outside"),
    ({"label_sequences": np.ones((N, 2000), np.int64)}, "at most 1024"),
    ({"label_sequences": np.ones((N, 2)), "texts": np.array(["a"] * N)}, "not both"),
    ({"texts": np.array([b"ab"] * N)}, "unicode"),
    ({"texts": np.array(["ab"] * (N + 1))}, "one per image"),
    ({"pairs": np.array([[0, N]]), "pair_same": np.array([True])}, "names image 6"),
    ({"pairs": np.array([[0, 1]]), "pair_same": np.array([2])}, "bool or 0/1"),
    ({"pairs": np.array([[0, 1]]), "pair_same": np.array([True, False])}, "'pair_same' has shape [2]"),
    ({"pairs": np.array([[0, 1]])}, "pair_same"),
    ({"pairs": np.array([[0, 1]], dtype=object), "pair_same": np.array([True])}, "Python objects"),
])
def test_bad_labels_are_refused_with_invalid_labels(client, arrays, words):
    body = assert_problem(_upload(client, **arrays), 422, "invalid_labels")
    assert words in body["detail"]
    assert client.get("/v1/datasets").json()["items"] == []
