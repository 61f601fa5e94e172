"""Random-weight SDXL-layout models for benchmarks: `make_sdxl_model(path, size)`.

Sizes (`SDXL_SIZES`):
- `full`: stabilityai/stable-diffusion-xl-base-1.0's published configs: a 2.6 B-parameter
  U-Net (10.3 GB in fp32), CLIP-L and OpenCLIP-bigG text encoders, the 84 M-parameter VAE;
  what export's memory is measured on.
- `mid`: the same layout at reduced widths, for CPU latency benchmarks at 512²: U-Net blocks
  (64, 128, 256) with (1, 2, 4) transformer layers, CLIP-L, a bigG-wide encoder 2 of 8 layers,
  SDXL's cross-attention width (2048), added conditioning (6 × 256 + 1280) and scaling factor,
  the VAE reduced to (64, 128, 256, 256) as `fewstep bench`'s SD 1.5-layout mid model.
- `small`: the layout at a few million parameters, for tests of the tools that use the others.

Every folder starts as fewstep.export.testing's tiny SDXL model (its tokenizers, scheduler
and model_index.json; the vocabulary is that tiny one, the embedding tables are CLIP's 49,408
rows), then each component is replaced, built and saved one at a time so that building the
full size never holds more than its U-Net. Weights: matrices and kernels N(0, 1/fan_in),
norms and biases at their defaults.

`make_taesdxl(path)`: a random-weight tiny autoencoder (diffusers' AutoencoderTiny) with
TAESDXL's layout (`TAESDXL`), to stand in for a model's VAE at TAESDXL's cost.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

SDXL_SIZES = ("small", "mid", "full")
VOCAB_ROWS = 49408  # CLIP's vocabulary: the size of both encoders' embedding tables
SHARD = "2GB"  # saving writes a shard at a time: the transient copy stays this small
_TIME_DIM = 256  # addition_time_embed_dim: six size values, 256 features each


def _encoder(hidden: int, layers: int, heads: int) -> dict[str, int]:
    return dict(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )


CLIP_L = _encoder(768, 12, 12)
# (CLIP-L, OpenCLIP-bigG with projection)
_TEXT_ENCODERS: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    "full": (CLIP_L, _encoder(1280, 32, 20)),
    "mid": (CLIP_L, _encoder(1280, 8, 20)),
    "small": (_encoder(64, 2, 4), _encoder(96, 2, 4)),
}
_UNETS: dict[str, dict[str, Any]] = {
    "full": dict(
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        layers_per_block=2,
        sample_size=128,
    ),
    "mid": dict(
        block_out_channels=(64, 128, 256),
        transformer_layers_per_block=(1, 2, 4),
        attention_head_dim=(2, 4, 8),
        layers_per_block=2,
        sample_size=64,
    ),
    "small": dict(
        block_out_channels=(32, 64, 64),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        layers_per_block=1,
        sample_size=16,
        norm_num_groups=16,
    ),
}
_VAES: dict[str, dict[str, Any]] = {
    "full": dict(block_out_channels=(128, 256, 512, 512), sample_size=1024),
    "mid": dict(block_out_channels=(64, 128, 256, 256), sample_size=512),
    "small": dict(block_out_channels=(16, 32, 32, 32), sample_size=128, norm_num_groups=16),
}


# madebyollin/taesdxl's config: 64 channels per stage, encoder blocks (1, 3, 3, 3), decoder
# (3, 3, 3, 1); diffusers' AutoencoderTiny defaults are the same (TAESD's).
TAESDXL: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    encoder_block_out_channels=(64, 64, 64, 64),
    decoder_block_out_channels=(64, 64, 64, 64),
    num_encoder_blocks=(1, 3, 3, 3),
    num_decoder_blocks=(3, 3, 3, 1),
    act_fn="relu",
    upsample_fn="nearest",
    upsampling_scaling_factor=2,
    latent_channels=4,
    latent_magnitude=3,
    latent_shift=0.5,
    scaling_factor=1.0,
)


def make_sdxl_model(path: str | Path, size: str = "mid", seed: int = 0) -> Path:
    """Write a random-weight SDXL-layout diffusers folder of `size` to `path`; returns it."""
    import torch

    from fewstep.export.testing import make_tiny_model

    if size not in SDXL_SIZES:
        raise ValueError(f"size must be one of {SDXL_SIZES}, got {size!r}")
    root = make_tiny_model(path, "sdxl", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    encoder_1, encoder_2 = _TEXT_ENCODERS[size]
    save_redrawn(
        root / "text_encoder", text_encoder_like(root, "text_encoder", encoder_1), generator
    )
    encoder = text_encoder_like(root, "text_encoder_2", encoder_2, projection=True)
    save_redrawn(root / "text_encoder_2", encoder, generator)
    cross_attention = encoder_1["hidden_size"] + encoder_2["hidden_size"]
    save_redrawn(root / "unet", _unet(size, cross_attention, encoder_2["hidden_size"]), generator)
    save_redrawn(root / "vae", _vae(size), generator)
    return root


def make_taesdxl(path: str | Path, seed: int = 0) -> Path:
    """Write a random-weight AutoencoderTiny folder of TAESDXL's layout to `path`; returns it."""
    import torch
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the biases keep torch's default (seeded) initialisation
        vae = AutoencoderTiny(**TAESDXL)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    save_redrawn(root, vae, torch.Generator().manual_seed(seed))
    return root


def text_encoder_like(
    root: Path, folder: str, sizes: dict[str, int], projection: bool = False
) -> Any:
    """A CLIP text encoder of `sizes` with CLIP's vocabulary rows, taking its activation and
    special tokens from the tiny model's `root/folder/config.json`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tiny = json.loads((root / folder / "config.json").read_text())
    config = CLIPTextConfig(
        **sizes,
        projection_dim=sizes["hidden_size"],
        vocab_size=VOCAB_ROWS,
        max_position_embeddings=tiny["max_position_embeddings"],
        hidden_act=tiny["hidden_act"],
        bos_token_id=tiny["bos_token_id"],
        eos_token_id=tiny["eos_token_id"],
        pad_token_id=tiny["pad_token_id"],
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _unet(size: str, cross_attention: int, pooled: int) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        **_UNETS[size],
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True,
        cross_attention_dim=cross_attention,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_DIM,
        projection_class_embeddings_input_dim=6 * _TIME_DIM + pooled,
    )


def _vae(size: str) -> Any:
    return autoencoder_kl(_VAES[size], scaling_factor=0.13025, force_upcast=True)


def autoencoder_kl(sizes: dict[str, Any], scaling_factor: float, force_upcast: bool) -> Any:
    """diffusers' AutoencoderKL of the SD layout (four stages, two layers each, 4 latent
    channels) at `sizes` (block_out_channels, sample_size, ...)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        **sizes,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def save_redrawn(folder: Path, module: Any, generator: Any) -> None:
    """Redraw `module`'s matrices and kernels, save it over `folder` and free it."""
    import shutil

    import torch

    with torch.no_grad():
        for param in module.parameters():
            if param.dim() > 1:  # N(0, 1/fan_in): every layer passes its input on
                param.normal_(0.0, 1.0 / param[0].numel() ** 0.5, generator=generator)
    shutil.rmtree(folder)
    module.save_pretrained(folder, safe_serialization=True, max_shard_size=SHARD)
    del module
    gc.collect()
