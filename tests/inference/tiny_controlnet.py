"""A tiny random-weight ControlNet and depth annotator, saved with their libraries' own
``save_pretrained``, for the tiny SD pipeline of ``tiny_diffusion``.

``ControlNetModel.from_unet`` copies the UNet's encoder and starts its output ("zero")
convolutions at zero, as training does, so a fresh ControlNet changes nothing. The tiny one gets
random output convolutions: a test of its effect on an image could not fail otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel

from tests.inference.tiny_diffusion import tiny_components


def save_tiny_controlnet(folder: Path, *, seed: int = 0, unet_seed: int = 0) -> Path:
    """A ControlNet for ``save_tiny_sd``'s UNet (``unet_seed`` the seed that built it), with a
    conditioning embedding that brings a 64 px control image to the 8x8 latents (three stride-2
    convolutions, as SD's does for 512 px)."""
    unet = tiny_components(folder.parent / f".{folder.name}-build", seed=unet_seed)["unet"]
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        outputs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        for conv in outputs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
    controlnet.save_pretrained(str(folder))
    return folder


def save_tiny_depth_annotator(folder: Path, *, seed: int = 0) -> Path:
    """A tiny DPT depth-estimation model and its image processor (transformers' own layout)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        head_in_index=-1,
    )
    DPTForDepthEstimation(config).eval().save_pretrained(str(folder))
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(str(folder))
    return folder
