"""Tiny random-weight Stable Diffusion components, built in code and saved in diffusers layout.

They have the real SD 1.5 structure (UNet2DConditionModel, AutoencoderKL with a VAE scale factor
of 8, CLIP text encoder and BPE tokenizer) at a size that runs 64x64 in milliseconds on a CPU, so
the engines are tested through the same ``from_pretrained`` path that loads real weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TEXT_DIM = 32

# A closed word-level BPE vocabulary: every test prompt word is one token, anything else falls
# back to single letters. Enough for the tokenizer to behave like CLIP's (start/end tokens,
# padding to 77) without shipping CLIP's 49k-entry vocabulary.
_WORDS = ["a", "cat", "dog", "red", "blue", "photo", "of", "background", "blurry", "sky", "sea", "lowres"]


def _write_tokenizer_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["!", '"']
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens += letters + [f"{c}</w>" for c in letters]
    merges = ["#version: 0.2"]
    for word in _WORDS:
        # Build each word left to right so its merges exist in order: "c a", "ca t</w>"...
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            merged = pieces[0] + pieces[1]
            if merged not in tokens:
                tokens.append(merged)
            pieces = [merged] + pieces[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(dict.fromkeys(merges)) + "\n")


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    # transformers 5 ignores vocab_file/merges_file on construction: load from a folder instead.
    _write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def tiny_components(tmp: Path, *, in_channels: int = 4, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        # sample_size 8 latents x VAE factor 8 = a 64 px native size, like 64x8=512 for SD 1.5.
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    # Four VAE blocks give the real SD scale factor of 8 (64 px image -> 8x8 latents).
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    tokenizer = tiny_tokenizer(tmp / "tokenizer-src")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=TEXT_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=TEXT_DIM,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }


def tiny_safety_checker(*, flags: bool, seed: int = 0) -> tuple:
    """A real ``StableDiffusionSafetyChecker`` (tiny CLIP vision tower) and its image processor.

    The checker flags an image when the cosine between its embedding and a concept embedding,
    minus that concept's threshold, is above 0. Cosines lie in [-1, 1], so thresholds of -2 flag
    every image and +2 none, whatever the random weights: the pipeline's real check decides."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "hidden_size": TEXT_DIM,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
        },
        vision_config={
            "hidden_size": TEXT_DIM,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=TEXT_DIM,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    threshold = -2.0 if flags else 2.0
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def save_tiny_sd(
    folder: Path, *, inpainting: bool = False, seed: int = 0, safety_checker: str | None = None
) -> Path:
    """Write a tiny SD 1.5-layout pipeline (9-channel inpainting UNet if asked) into ``folder``.

    ``safety_checker`` "flags" or "passes" ships a real safety checker that refuses every output
    or none (``tiny_safety_checker``); None ships none, as most community models do."""
    components = tiny_components(
        folder.parent / f".{folder.name}-build", in_channels=9 if inpainting else 4, seed=seed
    )
    if safety_checker is not None:
        checker, processor = tiny_safety_checker(flags=safety_checker == "flags", seed=seed)
        components.update(safety_checker=checker, feature_extractor=processor)
    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = cls(**components, requires_safety_checker=safety_checker is not None)
    pipe.save_pretrained(str(folder))
    return folder


def save_tiny_lora(folder: Path, *, seed: int = 1) -> Path:
    """Write a random (non-zero) LoRA for the tiny UNet in the diffusers/peft safetensors format."""
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = tiny_components(folder.parent / f".{folder.name}-build")["unet"]
    # init_lora_weights=False gives a non-zero B matrix: peft's default (B = 0) would make the
    # LoRA a no-op and a test of its effect could not fail.
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    unet.add_adapter(config)
    layers = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def save_tiny_sdxl(folder: Path, *, seed: int = 0) -> Path:
    """Write a tiny SDXL-layout pipeline: two text encoders and a UNet with SDXL's size/crop
    conditioning ("text_time"), sharing the SD 1.5 tiny VAE, tokenizer and scheduler."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    parts = tiny_components(folder.parent / f".{folder.name}-build", seed=seed)
    tokenizer = parts["tokenizer"]
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        # the two encoders' hidden states are concatenated: 32 + 32
        cross_attention_dim=2 * TEXT_DIM,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # six size/crop numbers embedded at 8 each, plus the pooled text embedding
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM,
        norm_num_groups=32,
    )
    config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    pipe = StableDiffusionXLPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet.eval(),
        scheduler=parts["scheduler"],
    )
    pipe.save_pretrained(str(folder))
    return folder
