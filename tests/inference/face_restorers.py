"""Face restorers with random weights, saved as their releases are.

GFPGAN's hyper-parameters are fixed by spandrel's loader (512 px, StyleGAN2 with channel
multiplier 2), so the GFPGAN file is full size: 86 M parameters, saved in float16 (174 MB) to
spare the disk; the loader copies them into float32 weights like a release's. RestoreFormer's
sizes are read from the state dict, so that one is tiny. CodeFormer's VQ autoencoder is fixed
(74 M parameters even with the narrowest transformer the loader reads back), saved in float16 too.
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_gfpgan(path: Path, seed: int = 0) -> Path:
    """A GFPGANv1Clean (GFPGANv1.3/1.4's network) with random weights, under ``params_ema``."""
    from spandrel.architectures.GFPGAN import GFPGAN

    torch.manual_seed(seed)
    network = GFPGAN(
        out_size=512,
        num_style_feat=512,
        channel_multiplier=2,
        decoder_load_path=None,
        fix_decoder=False,
        num_mlp=8,
        input_is_latent=True,
        different_w=True,
        narrow=1,
        sft_half=True,
    )
    torch.save({"params_ema": {k: v.half() for k, v in network.state_dict().items()}}, path)
    return path


def save_restoreformer(path: Path, seed: int = 0) -> Path:
    """A narrow RestoreFormer (32 channels at every level, 32 codes) with random weights. Six
    levels, as the real one has, so its attention runs on the 16x16 latent."""
    from spandrel.architectures.RestoreFormer import RestoreFormer

    torch.manual_seed(seed)
    network = RestoreFormer(
        n_embed=32,
        embed_dim=32,
        ch=32,
        out_ch=3,
        ch_mult=(1, 1, 1, 1, 1, 1),
        num_res_blocks=1,
        attn_resolutions=(16,),
        dropout=0.0,
        in_channels=3,
        resolution=512,
        z_channels=32,
        double_z=False,
        enable_mid=True,
        head_size=8,
    )
    torch.save({"params_ema": network.state_dict()}, path)
    return path


def save_codeformer(path: Path, seed: int = 0) -> Path:
    """A CodeFormer with random weights, under ``params_ema`` as its release ``codeformer.pth``.
    spandrel_extra_arches' own class; the transformer (which the loader sizes from the state
    dict) is one narrow layer with 32 codes, so only the fixed autoencoder is full size."""
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    torch.manual_seed(seed)
    network = CodeFormer(
        dim_embd=64,
        n_head=8,
        n_layers=1,
        codebook_size=32,
        latent_size=256,
        connect_list=["32", "64", "128", "256"],
        fix_modules=["quantize", "generator"],
    )
    torch.save({"params_ema": {k: v.half() for k, v in network.state_dict().items()}}, path)
    return path
