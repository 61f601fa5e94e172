"""Random-weight models of Stable Diffusion 1.5's layout: `make_sd15_model(path, size)`.

Sizes (`SD15_SIZES`):
- `full`: runwayml/stable-diffusion-v1-5's published configs: an 860 M-parameter U-Net
  (blocks 320, 640, 1280, 1280; 8 heads; cross-attention 768), CLIP ViT-L/14's text encoder
  (123 M) and the 84 M-parameter VAE (blocks 128, 256, 512, 512). Its cost per call is the
  real model's, so CPU timings on it say what SD 1.5 itself would take.
- `mid`: the same layout with U-Net and VAE blocks (64, 128, 256, 256), so that a 512² step
  and decode take seconds on a small CPU; CLIP-L as in `full`.

The folder starts as fewstep.export.testing's tiny SD 1 model (its tokenizer, scheduler and
model_index.json; the vocabulary is that tiny one, the embedding table CLIP's 49,408 rows) and
each component is replaced one at a time, weights drawn as in sdxl_models (matrices and
kernels N(0, 1/fan_in), norms and biases at their defaults).
"""

from __future__ import annotations

from pathlib import Path

from fewstep.benchmarks.sdxl_models import (
    CLIP_L,
    autoencoder_kl,
    save_redrawn,
    text_encoder_like,
)

SD15_SIZES = ("full", "mid")
SCALING_FACTOR = 0.18215
_BLOCKS = {"full": (320, 640, 1280, 1280), "mid": (64, 128, 256, 256)}
_VAE_BLOCKS = {"full": (128, 256, 512, 512), "mid": (64, 128, 256, 256)}


def make_sd15_model(path: str | Path, size: str = "full", seed: int = 0) -> Path:
    """Write a random-weight SD 1.5-layout diffusers folder of `size` to `path`; returns it."""
    import torch
    from diffusers import UNet2DConditionModel

    from fewstep.export.testing import make_tiny_model

    if size not in SD15_SIZES:
        raise ValueError(f"size must be one of {SD15_SIZES}, got {size!r}")
    root = make_tiny_model(path, "sd1", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    save_redrawn(root / "text_encoder", text_encoder_like(root, "text_encoder", CLIP_L), generator)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=_BLOCKS[size],
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    save_redrawn(root / "unet", unet, generator)
    sizes = {"block_out_channels": _VAE_BLOCKS[size], "sample_size": 512}
    save_redrawn(root / "vae", autoencoder_kl(sizes, SCALING_FACTOR, False), generator)
    return root
