"""Tiny random-weight vision models written in the layouts the real checkpoints use.

The super-resolution networks below are written out here (not taken from spandrel) with the key
names of the official Real-ESRGAN files, so a test that loads them through spandrel checks that
the real loader maps those names onto a network that computes the same thing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class ResidualDenseBlock(nn.Module):
    """Five densely connected convs (keys ``conv1`` .. ``conv5``) with a scaled residual."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), 0.2))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class TinyRRDBNet(nn.Module):
    """The RealESRGAN_x4plus / x2plus / anime_6B generator, with fewer and narrower blocks.

    The x2 model folds 2x2 pixels into channels first (pixel unshuffle, 12 input channels), then
    runs the same x4 trunk, so its net factor is 2. The growth width stays at 32 because the
    real checkpoints (and spandrel) fix it there.
    """

    def __init__(self, scale: int = 4, num_feat: int = 16, num_block: int = 1, num_grow_ch: int = 32):
        super().__init__()
        self.scale = scale
        in_ch = 3 * (4 if scale == 2 else 1)
        self.conv_first = nn.Conv2d(in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)
        # Real-ESRGAN initialises the residual trunk at a tenth of the default scale; doing the same
        # keeps random outputs away from the clamp at 0 and 1, where comparisons would be blind.
        with torch.no_grad():
            for module in self.body.modules():
                if isinstance(module, nn.Conv2d):
                    module.weight.mul_(0.1)
            # Centre the random output on mid-grey so it is neither clamped to black nor white.
            self.conv_last.bias.fill_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 2:
            x = F.pixel_unshuffle(x, 2)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class TinyCompactNet(nn.Module):
    """The realesr-general-x4v3 network (SRVGGNetCompact): convs and PReLUs in ``body``, then a
    pixel shuffle, plus the nearest-upsampled input as a residual."""

    def __init__(self, scale: int = 4, num_feat: int = 8, num_conv: int = 2):
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(3, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        layers.append(nn.Conv2d(num_feat, 3 * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(scale)

    def zero_residual(self) -> TinyCompactNet:
        """Make the network an exact nearest-neighbour upscaler (its residual branch outputs 0)."""
        last = self.body[-1]
        assert isinstance(last, nn.Conv2d)
        with torch.no_grad():
            last.weight.zero_()
            assert last.bias is not None
            last.bias.zero_()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def save_sr_checkpoint(model: nn.Module, path: Path, key: str = "params_ema") -> Path:
    """Save as the official files do: ``{"params_ema": state_dict}`` (``params`` for x4v3)."""
    torch.save({key: model.state_dict()}, path)
    return path


def reference_upscale(model: nn.Module, rgb: np.ndarray) -> np.ndarray:
    """Run a reference network on an HxWx3 float image in [0, 1]; returns HxWx3 in [0, 1]."""
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None].float()
        return model.eval()(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()


def smooth_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colourful HxWx3 uint8 test image (gradients plus a blurred random field)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    field = rng.random((height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    field = (
        torch.nn.functional.interpolate(
            torch.from_numpy(field.transpose(2, 0, 1))[None], size=(height, width), mode="bilinear"
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], axis=2)
    return np.clip((0.5 * base + 0.5 * field) * 255, 0, 255).astype(np.uint8)


def brightness_saliency_onnx(
    path: Path,
    size: int = 64,
    *,
    gain: float = 8.0,
    extra_outputs: int = 0,
    dynamic: bool = False,
    logits: bool = False,
) -> Path:
    """A saliency "model" whose answer is known: sigmoid(gain * mean over channels of the input).

    With ImageNet normalisation a bright region scores near 1 and a dark one near 0, so a test can
    tell whether pre-processing, resizing and the alpha mapping are right. ``extra_outputs`` adds
    side outputs after the main one, as U2-Net's ONNX export has (d0 first, then d1..d6);
    ``logits`` leaves out the final sigmoid, as BiRefNet's export does.
    """
    import onnx
    from onnx import TensorProto, helper

    dims: list[int | str] = ["batch", 3, "height", "width"] if dynamic else [1, 3, size, size]
    out_dims: list[int | str] = ["batch", 1, "height", "width"] if dynamic else [1, 1, size, size]
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["mean", "gain"], ["scaled"]),
        helper.make_node("Identity" if logits else "Sigmoid", ["scaled"], ["d0"]),
    ]
    outputs = [helper.make_tensor_value_info("d0", TensorProto.FLOAT, out_dims)]
    for i in range(1, extra_outputs + 1):
        # Side outputs that disagree with d0 (the inverse map): picking the wrong one fails tests.
        nodes.append(helper.make_node("Sub", ["one", "d0"], [f"d{i}"]))
        outputs.append(helper.make_tensor_value_info(f"d{i}", TensorProto.FLOAT, out_dims))
    graph = helper.make_graph(
        nodes,
        "brightness_saliency",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        outputs,
        initializer=[helper.make_tensor("gain", TensorProto.FLOAT, [], [gain])]
        + ([helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])] if extra_outputs else []),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # onnx 1.23 writes IR version 14; onnxruntime 1.31 reads at most 13 (see DEPENDENCIES.md).
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def liven_detector(model: nn.Module, rcnn_logit_gain: float = 5.0) -> nn.Module:
    """Make a fresh torchvision detector give varied scores, as a trained one does.

    Freshly initialised MobileNetV3 layers shrink activations by orders of magnitude per block
    when BatchNorm uses its initial running statistics, so every score would come out as exactly
    1 / num_classes and ordering or threshold mistakes would go unseen. Recomputing the BatchNorm
    statistics on two images restores unit-scale features; Faster R-CNN's class logits are then
    still timid, so they are widened by ``rcnn_logit_gain``.
    """
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the calibration batches
        norm.train()
    images = [
        torch.from_numpy(smooth_rgb(64, 64, seed).transpose(2, 0, 1).copy()).float() / 255 for seed in (0, 1)
    ]
    with torch.no_grad():
        # Two images per batch: the 1x1 feature maps at the top of SSDlite need more than one value.
        model(images)
        for name, param in model.named_parameters():
            if "cls_score" in name:
                param.mul_(rcnn_logit_gain)
    return model.eval()


def write_label_map(path: Path, labels: list[str] | dict[str, str]) -> Path:
    path.write_text(json.dumps(labels))
    return path
