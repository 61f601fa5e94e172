"""Full-size random-weight models for the GPU suite, written as real diffusers folders.

`make_model_folder(path, preset, small, device)`: fewstep's tiny model of the preset's family
(fewstep.export.testing supplies tokenizer(s), scheduler and model_index), with its U-Net, VAE
and text encoder(s) replaced by the preset's full-size architectures (`PRESETS`: SD1.5,
SD-Turbo, SDXL base and SDXL-Turbo), weights drawn N(0, 1/fan_in) (variance preserving, as the
tiny models) and saved as fp16 safetensors, so they load the way users' models do; built and
saved one component at a time on `device`. `small`: the tiny folder as it is. The text
encoders keep the tiny tokenizers' vocabulary (their embedding tables are that small).
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

# GFLOP per forward: for achieved TFLOP/s. The U-Nets' are torch.utils.flop_counter's count of
# the presets (tests/test_gpu_suite.py recounts them).
GFLOP = {
    "sd15_unet_64x64_b2": 1607.0,
    "sd21_unet_64x64_b1": 804.0,
    "vae_decoder_512": 2515.0,
    "sdxl_unet_128x128_b2": 13523.0,
}


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """A full-size architecture: the fewstep.export.testing family that supplies tokenizer and
    scheduler, and the component configs that replace the tiny ones."""

    family: str  # fewstep.export.testing family (tokenizer, scheduler, model_index)
    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    text_encoder_2: dict[str, Any] | None = None  # SDXL's, with a projection

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
# OpenAI CLIP ViT-L/14's text encoder: SD1.5's, and SDXL's first
_CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
# stabilityai/stable-diffusion-xl-base-1.0: its U-Net (2.6 B parameters), OpenCLIP ViT-bigG's
# text encoder with its 1280-wide projection (the pooled embedding), the VAE of SD's layout
# that overflows in fp16 (force_upcast) with SDXL's scaling factor.
_OPENCLIP_BIGG: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
_SDXL_TIME_DIM = 256  # addition_time_embed_dim: six size values, 256 features each
_SDXL = ModelPreset(
    family="sdxl",
    unet={
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),  # read as head counts (64 features each)
        "use_linear_projection": True,
        "cross_attention_dim": _CLIP_L["hidden_size"] + _OPENCLIP_BIGG["hidden_size"],  # 2048
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _SDXL_TIME_DIM,
        # the six size values embedded, then the pooled text embedding: 2816
        "projection_class_embeddings_input_dim": 6 * _SDXL_TIME_DIM
        + _OPENCLIP_BIGG["projection_dim"],
        "norm_num_groups": 32,
        "sample_size": 128,
    },
    text_encoder=_CLIP_L,
    text_encoder_2=_OPENCLIP_BIGG,
    vae={**_VAE_SD, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
)
PRESETS = {
    # runwayml/stable-diffusion-v1-5: CLIP ViT-L/14 text encoder
    "sd15": ModelPreset(
        family="sd1",
        unet={**_SD_BLOCKS, "cross_attention_dim": 768, "attention_head_dim": 8},
        text_encoder=_CLIP_L,
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
    "sdxl": _SDXL,
    # stabilityai/sdxl-turbo: SDXL base's architecture; its scheduler (Euler-ancestral,
    # trailing spacing) comes with the tiny family's folder
    "sdxl_turbo": dataclasses.replace(_SDXL, family="sdxl_turbo"),
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
    folder with its U-Net, VAE and text encoder(s) replaced by random-weight full-size ones
    (fp16 safetensors)."""
    from fewstep.export.testing import make_tiny_model

    make_tiny_model(path, PRESETS[preset].family)
    if small:
        return path
    spec = PRESETS[preset]
    generator = torch.Generator(device=device).manual_seed(0)
    # One at a time, in this order (the draws follow it): the peak is one fp32 module.
    for name, build in _component_builders(path, spec).items():
        with torch.device(device):
            module = build()
        _redraw(module, generator)
        shutil.rmtree(path / name)
        module.half().save_pretrained(path / name)  # safetensors (both libraries' default)
        del module
    return path


def _component_builders(path: Path, spec: ModelPreset) -> dict[str, Any]:
    """Each component the preset replaces: its folder name and a constructor."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    builders: dict[str, Any] = {
        "unet": lambda: diffusers.UNet2DConditionModel(**spec.unet),
        "vae": lambda: diffusers.AutoencoderKL(**spec.vae),
        "text_encoder": lambda: CLIPTextModel(
            _text_config(path, "text_encoder", spec.text_encoder)
        ),
    }
    if spec.text_encoder_2 is not None:
        sizes = spec.text_encoder_2
        builders["text_encoder_2"] = lambda: CLIPTextModelWithProjection(
            _text_config(path, "text_encoder_2", sizes)
        )
    return builders


def _text_config(path: Path, folder: str, sizes: dict[str, Any]) -> Any:
    """The preset's encoder sizes with the tiny folder's vocabulary and special tokens."""
    from transformers import CLIPTextConfig

    tiny = json.loads((path / folder / "config.json").read_text())
    return CLIPTextConfig(
        **sizes,
        vocab_size=tiny["vocab_size"],
        max_position_embeddings=77,
        bos_token_id=tiny["bos_token_id"],
        eos_token_id=tiny["eos_token_id"],
        pad_token_id=tiny["pad_token_id"],
    )
