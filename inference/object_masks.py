"""``remove_object`` by prompt: which detected objects a prompt names, and the mask they make.

The detector (``scan_objects``'s, ``inference/detection.py``) labels objects with its label map's
names (COCO's "person", "dog", "cell phone", ...). A prompt names them in everyday words: "the
dog", "dogs", "the two people", "a phone". Words are compared singular to singular, after a few
everyday names are mapped onto the label they mean (people, man, kid -> person; puppy -> dog);
a label of several words ("cell phone", "teddy bear") matches where its words follow each other
in the prompt, and its last word alone matches too ("phone", "bear") when no other label ends
with it. Each matching box is grown by a margin (a detector's box hugs the object, and the
object's fringe and shadow must go with it) and drawn into the mask; the removers feather it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw

from inference.base import InvalidInput

# Words that name no object: articles, numbers and the verbs of a removal request.
_STOP_TEXT = (
    "a an the this that these those all every each any some of and or with in on at from my his "
    "her their its remove erase delete please one two three four five several many both"
)
_STOP_WORDS = frozenset(_STOP_TEXT.split())
_IRREGULAR = {
    "people": "person",
    "persons": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "knives": "knife",
    "wolves": "wolf",
    "sheep": "sheep",
    "skis": "ski",
    "glasses": "glass",
    "buses": "bus",
}
# Everyday names for COCO's labels (singular).
_SYNONYMS = {
    "man": "person",
    "woman": "person",
    "child": "person",
    "kid": "person",
    "boy": "person",
    "girl": "person",
    "human": "person",
    "guy": "person",
    "lady": "person",
    "pedestrian": "person",
    "puppy": "dog",
    "kitten": "cat",
    "automobile": "car",
    "bike": "bicycle",
    "motorbike": "motorcycle",
    "plane": "airplane",
    "aeroplane": "airplane",
    "sofa": "couch",
    "television": "tv",
    "mobile": "cell phone",
}


def singular(word: str) -> str:
    """English singular of a lower-case word, good enough for object names."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _words(text: str) -> list[str]:
    return [singular(w) for w in re.findall(r"[a-z0-9]+", text.lower())]


def matching_labels(prompt: str, labels: Iterable[str]) -> set[str]:
    """The labels (as the label map spells them) that ``prompt`` names."""
    words = [w for w in _words(prompt) if w not in _STOP_WORDS]
    # Everyday names map onto labels, which may be of several words ("mobile" -> "cell phone").
    expanded: list[str] = []
    for word in words:
        expanded.extend(_words(_SYNONYMS.get(word, word)))
    text = f" {' '.join(expanded)} "
    by_words = {label: parts for label in labels if (parts := _words(label))}
    last_words: dict[str, int] = {}
    for parts in by_words.values():
        last_words[parts[-1]] = last_words.get(parts[-1], 0) + 1
    found = set()
    # Longest labels first, each match taken out of the text: "the hot dog" is a hot dog, not
    # also a dog.
    for label, parts in sorted(by_words.items(), key=lambda item: -len(item[1])):
        phrase = f" {' '.join(parts)} "
        if phrase in text:
            found.add(label)
            text = text.replace(phrase, " | ")
    for label, parts in by_words.items():
        if label not in found and len(parts) > 1 and last_words[parts[-1]] == 1 and f" {parts[-1]} " in text:
            found.add(label)
    return found


def grown_box(box: Mapping[str, int], size: tuple[int, int], grow: float) -> tuple[int, int, int, int]:
    """``box`` grown on every side by ``grow`` times its larger side (at least 4 px), in the image."""
    width, height = size
    margin = max(4, round(grow * max(box["x2"] - box["x1"], box["y2"] - box["y1"])))
    return (
        max(0, box["x1"] - margin),
        max(0, box["y1"] - margin),
        min(width, box["x2"] + margin),
        min(height, box["y2"] + margin),
    )


def mask_from_prompt(
    prompt: str,
    objects: Sequence[Mapping[str, Any]],
    size: tuple[int, int],
    labels: Iterable[str],
    *,
    grow: float = 0.1,
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """The mask (L, 255 = remove) of the detected ``objects`` the prompt names, and those objects.

    ``objects``: ``scan_objects``'s (label, score, box); ``labels``: every label the detector
    knows. A prompt that names no label the detector knows, or names only objects that are not in
    the picture, is refused with the code ``nothing_to_remove`` naming ``prompt``.
    """
    known = list(labels)
    wanted = matching_labels(prompt, known)
    if not wanted:
        raise InvalidInput(
            f"the prompt {prompt!r} names no object the detector knows (it knows "
            f"{', '.join(sorted(known)[:40])}{', ...' if len(known) > 40 else ''})",
            code="nothing_to_remove",
            field="prompt",
        )
    chosen = [dict(obj) for obj in objects if obj["label"] in wanted]
    if not chosen:
        seen = sorted({str(obj["label"]) for obj in objects})
        raise InvalidInput(
            f"no {' or '.join(sorted(wanted))} was found in the image"
            + (f" (found: {', '.join(seen)})" if seen else " (no object was found)"),
            code="nothing_to_remove",
            field="prompt",
        )
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for obj in chosen:
        left, top, right, bottom = grown_box(obj["box"], size, grow)
        draw.rectangle((left, top, right - 1, bottom - 1), fill=255)
    return mask, chosen
