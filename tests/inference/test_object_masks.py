"""remove_object by prompt: which detected objects a prompt names, and the mask their boxes make."""

from __future__ import annotations

import numpy as np
import pytest

from inference.base import InvalidInput
from inference.object_masks import mask_from_prompt, matching_labels, singular

COCO_SOME = ["person", "dog", "cat", "hot dog", "cell phone", "teddy bear", "wine glass", "bus", "skis", "tv"]


@pytest.mark.parametrize(
    ("prompt", "labels"),
    [
        ("the dog", {"dog"}),
        ("Remove the dogs!", {"dog"}),
        ("the two people", {"person"}),
        ("a man and his puppy", {"person", "dog"}),
        ("the hot dog", {"hot dog"}),  # not also every dog
        ("the phone on the table", {"cell phone"}),  # a label's last word alone, when only it ends so
        ("my mobile", {"cell phone"}),
        ("wine glasses", {"wine glass"}),
        ("the buses", {"bus"}),
        ("the TV", {"tv"}),
        ("kittens", {"cat"}),
        ("a car", set()),
        ("the", set()),
    ],
)
def test_a_prompt_names_labels_singular_to_singular_and_by_everyday_names(prompt: str, labels: set) -> None:
    assert matching_labels(prompt, COCO_SOME) == labels


@pytest.mark.parametrize(
    ("word", "one"),
    [("dogs", "dog"), ("puppies", "puppy"), ("benches", "bench"), ("people", "person"), ("bus", "bus")],
)
def test_singular(word: str, one: str) -> None:
    assert singular(word) == one


OBJECTS = [
    {"label": "person", "score": 0.9, "box": {"x1": 10, "y1": 10, "x2": 30, "y2": 50}},
    {"label": "dog", "score": 0.8, "box": {"x1": 60, "y1": 40, "x2": 100, "y2": 60}},
    {"label": "dog", "score": 0.7, "box": {"x1": 100, "y1": 0, "x2": 120, "y2": 10}},
]


def test_the_mask_is_every_named_box_grown_by_its_margin_and_nothing_else() -> None:
    mask, chosen = mask_from_prompt("the dogs", OBJECTS, (128, 64), COCO_SOME, grow=0.1)
    assert [obj["box"] for obj in chosen] == [OBJECTS[1]["box"], OBJECTS[2]["box"]]
    region = np.asarray(mask) == 255
    expected = np.zeros((64, 128), dtype=bool)
    expected[36:64, 56:104] = True  # 40x20 box grown by 0.1 * 40 = 4 px, clipped to the image
    expected[0:14, 96:124] = True  # 20x10 box grown by the 4 px minimum
    assert np.array_equal(region, expected)
    assert set(np.unique(np.asarray(mask))) == {0, 255}


def test_nothing_to_remove_names_the_prompt_and_says_what_was_found() -> None:
    with pytest.raises(InvalidInput) as absent:
        mask_from_prompt("the cat", OBJECTS, (128, 64), COCO_SOME)
    assert absent.value.code == "nothing_to_remove" and absent.value.field == "prompt"
    assert "no cat was found" in str(absent.value) and "found: dog, person" in str(absent.value)
    with pytest.raises(InvalidInput) as unknown:
        mask_from_prompt("the giraffe", OBJECTS, (128, 64), COCO_SOME)
    assert unknown.value.code == "nothing_to_remove" and "names no object the detector knows" in str(
        unknown.value
    )
