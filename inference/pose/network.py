"""The OpenPose body network: CMU's COCO body model (``body_pose_model.pth``, the weight file
lllyasviel's ControlNet annotators ship), in plain torch.

A VGG-19 front (ten 3x3 convolutions and three max-pools: features at 1/8 of the input) narrowed
to 128 channels, then six stages of two branches each: branch 1 predicts the 38 part affinity
fields (PAFs, an x and a y map for each of 19 limbs), branch 2 the 19 heatmaps (18 keypoints and
the background). Each stage after the first reads the previous stage's two outputs beside the
front's features (38 + 19 + 128 = 185 channels); the last stage's maps are the answer.

Every convolution is an attribute named as in the original Caffe model (``conv1_1``,
``conv5_5_CPM_L2``, ``Mconv7_stage6_L1``), so the module's state dict is the weight file's own
layout and loads with ``strict=True``, no renaming.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

STRIDE = 8  # the maps are at 1/8 of the input: three 2x2 max-pools
PAF_CHANNELS = 38
HEATMAP_CHANNELS = 19  # 18 keypoints, then the background
STAGES = 6
FEATURES = 128
_POOL = "pool"

# The front: (name, in, out) of each 3x3 convolution, a pool where _POOL stands.
_FRONT: tuple[tuple[str, int, int] | str, ...] = (
    ("conv1_1", 3, 64), ("conv1_2", 64, 64), _POOL,
    ("conv2_1", 64, 128), ("conv2_2", 128, 128), _POOL,
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv3_4", 256, 256), _POOL,
    ("conv4_1", 256, 512), ("conv4_2", 512, 512),
    ("conv4_3_CPM", 512, 256), ("conv4_4_CPM", 256, FEATURES),
)  # fmt: skip


def _branch_layers(stage: int, branch: int) -> list[tuple[str, int, int, int]]:
    """(name, in, out, kernel) of one branch of one stage; the last one has no ReLU."""
    out = PAF_CHANNELS if branch == 1 else HEATMAP_CHANNELS
    if stage == 1:
        names = [f"conv5_{i}_CPM_L{branch}" for i in range(1, 6)]
        shapes = [(FEATURES, 128, 3), (128, 128, 3), (128, 128, 3), (128, 512, 1), (512, out, 1)]
    else:
        names = [f"Mconv{i}_stage{stage}_L{branch}" for i in range(1, 8)]
        wide = PAF_CHANNELS + HEATMAP_CHANNELS + FEATURES
        shapes = [(wide, 128, 7), *[(128, 128, 7)] * 4, (128, 128, 1), (128, out, 1)]
    return [(name, *shape) for name, shape in zip(names, shapes, strict=True)]


class BodyPoseNet(nn.Module):
    """OpenPose's COCO body network. ``forward`` takes a BGR batch scaled to [-0.5, 0.5) (the
    Caffe model's input) and gives the last stage's PAFs (38 channels) and heatmaps (19), at
    1/8 of the input's size."""

    def __init__(self) -> None:
        super().__init__()
        self.front: list[str] = []
        for layer in _FRONT:
            if isinstance(layer, str):  # _POOL
                self.front.append(_POOL)
                continue
            name, cin, cout = layer
            self.add_module(name, nn.Conv2d(cin, cout, 3, padding=1))
            self.front.append(name)
        # branches[stage - 1][branch - 1]: the conv names of that branch, in order.
        self.branches: list[tuple[list[str], list[str]]] = []
        for stage in range(1, STAGES + 1):
            pair = []
            for branch in (1, 2):
                names = []
                for name, cin, cout, kernel in _branch_layers(stage, branch):
                    self.add_module(name, nn.Conv2d(cin, cout, kernel, padding=kernel // 2))
                    names.append(name)
                pair.append(names)
            self.branches.append((pair[0], pair[1]))

    def _run(self, names: list[str], x: torch.Tensor, *, last_linear: bool) -> torch.Tensor:
        for index, name in enumerate(names):
            if name == _POOL:
                x = F.max_pool2d(x, 2, 2)
                continue
            x = getattr(self, name)(x)
            if not (last_linear and index == len(names) - 1):
                x = F.relu(x)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self._run(self.front, x, last_linear=False)
        inputs = features
        pafs = heatmaps = features
        for paf_names, heatmap_names in self.branches:
            pafs = self._run(paf_names, inputs, last_linear=True)
            heatmaps = self._run(heatmap_names, inputs, last_linear=True)
            inputs = torch.cat([pafs, heatmaps, features], dim=1)
        return pafs, heatmaps


def load_body_pose_net(path: str | Path, device: torch.device | str) -> BodyPoseNet:
    """The network with the weights of ``path`` (the original file's key names), in float32 on
    ``device``. ``weights_only``: an operator's file must not run code."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    net = BodyPoseNet()
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()
