"""The training examples: checking them, turning photos into training pixels, and batch order.

An example is a PIL image of any mode and size with its caption. Each image becomes an RGB
square of the run's resolution (EXIF orientation applied, transparency flattened onto white,
shorter side resized to the resolution with Lanczos, then centre-cropped), exactly once: there
is no augmentation, so the frozen VAE can encode the whole set before the first step.

Batches walk through the examples in a shuffled order that is a pure function of the seed and
the step, so a run resumed at any step draws the same batches as one that never stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from inference.base import InvalidInput

MAX_EXAMPLES = 10_000

# A run's seed feeds three independent random streams, so that no two of them replay one
# sequence (a LoRA initialised from the very numbers that are then drawn as noise, say).
ORDER_STREAM = 0  # the shuffled order of the examples
INIT_STREAM = 1  # the LoRA matrices' initial values
NOISE_STREAM = 2  # latent samples, noise and timesteps of every step


@dataclass(frozen=True)
class TrainingExample:
    """One training image and its caption."""

    image: Image.Image  # any mode and size
    caption: str


def validate_examples(examples: Sequence[TrainingExample]) -> None:
    """Raise ``InvalidInput`` naming the first example that cannot be trained on."""
    if not isinstance(examples, (list, tuple)) or not examples:
        raise InvalidInput("training needs at least one example", field="examples")
    if len(examples) > MAX_EXAMPLES:
        raise InvalidInput(f"at most {MAX_EXAMPLES} examples, got {len(examples)}", field="examples")
    for i, example in enumerate(examples):
        if not isinstance(example, TrainingExample):
            raise InvalidInput(f"examples[{i}] is not a TrainingExample", field=f"examples[{i}]")
        if not isinstance(example.image, Image.Image):
            raise InvalidInput(f"examples[{i}].image is not an image", field=f"examples[{i}].image")
        if min(example.image.size) < 1:
            raise InvalidInput(f"examples[{i}].image is empty", field=f"examples[{i}].image")
        if not isinstance(example.caption, str):
            raise InvalidInput(f"examples[{i}].caption must be text", field=f"examples[{i}].caption")


def prepare_image(image: Image.Image, resolution: int) -> np.ndarray:
    """The training pixels of ``image``: RGB uint8, ``resolution`` x ``resolution`` x 3."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # convert("RGB") would keep whatever colour hides under transparent pixels (often black);
        # a white ground is what a viewer shows and what product shots are trained on.
        rgba = image.convert("RGBA")
        ground = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(ground, rgba)
    image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left = (size[0] - resolution) // 2
    top = (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image, dtype=np.uint8)


def to_model_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW in [-1, 1], the VAE's input range."""
    return (pixels.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def batch_indices(seed: int, count: int, step: int, batch_size: int) -> list[int]:
    """The examples of step ``step`` (0-based): positions ``step * batch_size`` onwards in an
    endless stream of shuffled passes over ``count`` examples, pass ``p`` shuffled by a
    generator seeded with ``(seed, p)``. A batch may straddle two passes."""
    indices: list[int] = []
    position = step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position, count)
        take = min(batch_size - len(indices), count - offset)
        order = _epoch_order(seed, count, epoch)
        indices.extend(int(i) for i in order[offset : offset + take])
        position += take
    return indices


def derived_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for ``stream`` of the run seeded ``seed``."""
    # numpy's SeedSequence mixes its entropy into a well-spread state: (0, 1) and (1, 0) give
    # unrelated seeds, the same on every platform and numpy version.
    words = np.random.SeedSequence([seed, stream]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def _epoch_order(seed: int, count: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, ORDER_STREAM, epoch]).permutation(count)


def examples_digest(captions: Sequence[str], pixels: Sequence[np.ndarray]) -> str:
    """sha256 over the captions and the prepared pixels: what the model is actually shown."""
    digest = hashlib.sha256()
    for caption, image in zip(captions, pixels, strict=True):
        encoded = caption.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
        digest.update(repr(image.shape).encode() + np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()
