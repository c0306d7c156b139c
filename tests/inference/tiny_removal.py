"""Models for ``remove_object`` tests: a random-weight LaMa, and an object detector set to find
one object where a test says.

The LaMa is in the layout of the original checkpoints (``generator.*`` keys beside a
discriminator's), as spandrel reads it. LaMa's size is fixed (about 51 M parameters), so the file
is saved in fp16: half the bytes, and spandrel loads it into its fp32 network all the same.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def save_random_lama(path: Path, *, seed: int = 0, torchscript: bool = False) -> Path:
    """Write a random LaMa to ``path``: a Lightning-style checkpoint (``{"state_dict": ...}`` with
    ``generator.`` keys and a stray ``discriminator.`` one), or a TorchScript archive of the bare
    network (IOPaint's ``big-lama.pt`` form) with ``torchscript``."""
    from spandrel.architectures.LaMa import LaMa

    torch.manual_seed(seed)
    network = LaMa(in_nc=4, out_nc=3).eval()
    if torchscript:
        image, mask = torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64)
        with torch.no_grad():
            torch.jit.trace(network, (image, mask)).save(str(path))
        return path
    # spandrel's wrapper holds the generator as ``model``; the original checkpoints as ``generator``.
    state = {
        "generator." + k.removeprefix("model."): v.half() if v.is_floating_point() else v
        for k, v in network.state_dict().items()
    }
    state["discriminator.model0.0.weight"] = torch.zeros(4, 3, 1, 1)
    torch.save({"state_dict": state}, path)
    return path


def save_firing_detector(
    path: Path,
    labels: list[str],
    fire: str | None,
    box: tuple[float, float, float, float] = (0.2, 0.3, 0.5, 0.7),
) -> Path:
    """An SSDlite state dict (with ``<stem>.labels.json`` beside it) that finds exactly one
    ``fire`` object, score 1, at ``box`` (x1, y1, x2, y2 as fractions of the image), in any
    image; ``fire`` None: it finds nothing.

    The heads' last convs get zero weights, so their outputs are their biases: every anchor says
    "background" but the first anchor of the coarsest (1x1) feature map, which says ``fire``, and
    whose box regression moves that anchor (centred, 0.95 of the image) onto ``box``.
    """
    from torchvision.models import detection

    num_classes = len(labels) + 1
    model = detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes
    )
    cls_heads = model.head.classification_head.module_list
    box_heads = model.head.regression_head.module_list
    with torch.no_grad():
        for level, (cls_head, box_head) in enumerate(zip(cls_heads, box_heads, strict=True)):
            logits, deltas = cls_head[1], box_head[1]
            logits.weight.zero_()
            scores = logits.bias.view(-1, num_classes)
            scores.fill_(-10.0)
            scores[:, 0] = 10.0  # background
            deltas.weight.zero_()
            deltas.bias.zero_()
            if fire is not None and level == len(cls_heads) - 1:
                scores[0, 0], scores[0, labels.index(fire) + 1] = -10.0, 10.0
                # torchvision's SSD box coder: weights (10, 10, 5, 5) on (dx, dy, dw, dh).
                x1, y1, x2, y2 = box
                anchor = 0.95
                deltas.bias.view(-1, 4)[0] = torch.tensor(
                    [
                        10 * ((x1 + x2) / 2 - 0.5) / anchor,
                        10 * ((y1 + y2) / 2 - 0.5) / anchor,
                        5 * math.log((x2 - x1) / anchor),
                        5 * math.log((y2 - y1) / anchor),
                    ]
                )
    torch.save(model.state_dict(), path)
    path.with_name(path.stem + ".labels.json").write_text(json.dumps(["__background__", *labels]))
    return path
