"""Full-size random-weight models for the GPU suite, written as real diffusers folders.

`make_model_folder(path, preset, small, device)`: fewstep's tiny model of the preset's family
(fewstep.export.testing supplies tokenizer, scheduler and model_index), with its U-Net, VAE and
text encoder replaced by the preset's full-size architectures (`PRESETS`: SD1.5 and SD-Turbo),
weights drawn N(0, 1/fan_in) (variance preserving, as the tiny models) and saved as fp16
safetensors, so they load the way users' models do. `small`: the tiny folder as it is.
`GFLOP`: FLOPs of one forward of these architectures, for achieved TFLOP/s.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

# GFLOP per forward: for achieved TFLOP/s.
GFLOP = {"sd15_unet_64x64_b2": 1607.0, "sd21_unet_64x64_b1": 804.0, "vae_decoder_512": 2515.0}


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """A full-size architecture: the fewstep.export.testing family that supplies tokenizer and
    scheduler, and the component configs that replace the tiny ones."""

    family: str  # fewstep.export.testing family (tokenizer, scheduler, model_index)
    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]

    @classmethod
    def from_name(cls, name: str) -> ModelPreset:
        return PRESETS[name]


_VAE_SD = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_SD_BLOCKS = {
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "norm_num_groups": 32,
    "sample_size": 64,
}
PRESETS = {
    # runwayml/stable-diffusion-v1-5: CLIP ViT-L/14 text encoder
    "sd15": ModelPreset(
        family="sd1",
        unet={**_SD_BLOCKS, "cross_attention_dim": 768, "attention_head_dim": 8},
        text_encoder={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
        },
        vae=_VAE_SD,
    ),
    # stabilityai/sd-turbo: the SD 2.1 U-Net, OpenCLIP ViT-H text encoder (23 layers used)
    "sd_turbo": ModelPreset(
        family="turbo",
        unet={
            **_SD_BLOCKS,
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
        },
        text_encoder={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "projection_dim": 512,
            "hidden_act": "gelu",
        },
        vae=_VAE_SD,
    ),
}


def _redraw(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Matrices and kernels N(0, 1/fan_in); vectors (norms, biases) kept as constructed."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                noise = torch.randn(p.shape, generator=generator, device=p.device)
                p.copy_(noise / float(np.sqrt(p[0].numel())))


def make_model_folder(path: Path, preset: str, small: bool, device: torch.device) -> Path:
    """A diffusers folder: fewstep's tiny model of the preset's family (`small`), or that
    folder with its U-Net, VAE and text encoder replaced by random-weight full-size ones
    (fp16 safetensors)."""
    from fewstep.export.testing import make_tiny_model

    make_tiny_model(path, PRESETS[preset].family)
    if small:
        return path
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = PRESETS[preset]
    generator = torch.Generator(device=device).manual_seed(0)
    tiny_text = json.loads((path / "text_encoder" / "config.json").read_text())
    text_config = CLIPTextConfig(
        **spec.text_encoder,
        vocab_size=tiny_text["vocab_size"],
        max_position_embeddings=77,
        bos_token_id=tiny_text["bos_token_id"],
        eos_token_id=tiny_text["eos_token_id"],
        pad_token_id=tiny_text["pad_token_id"],
    )
    with torch.device(device):
        modules = {
            "unet": diffusers.UNet2DConditionModel(**spec.unet),
            "vae": diffusers.AutoencoderKL(**spec.vae),
            "text_encoder": CLIPTextModel(text_config),
        }
    for name, module in modules.items():
        _redraw(module, generator)
        shutil.rmtree(path / name)
        module.half().save_pretrained(path / name)  # safetensors (both libraries' default)
    return path
