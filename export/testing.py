"""Tiny random-weight Stable Diffusion models, for the export side's tests and demos.

`make_tiny_model(path, family)` writes a complete diffusers folder (model_index.json, unet/,
vae/, text_encoder/, tokenizer/, scheduler/) whose configs have the shape of a real model of
that family (SD 1.5, SD 2.1, LCM Dreamshaper v7, SD-Turbo; SDXL and SDXL-Turbo, which add
text_encoder_2/ and tokenizer_2/) at a few hundred thousand parameters, so that diffusers' own
pipelines load it and every code path that branches on the family (prediction type, linear
projections, per-block head counts, `time_cond_proj_dim`, SDXL's added conditioning, the
scheduler and its spacing, the pad token) is exercised in seconds. Weights are fp32
safetensors, identical byte for byte for the same seed.

SDXL families (`SDXL_FAMILIES`): a CLIPTextModel (OpenAI CLIP layout, quick_gelu, pad
`<|endoftext|>`) and a CLIPTextModelWithProjection (OpenCLIP layout, gelu, pad `!`) of
different widths whose penultimate hidden states, concatenated, are the U-Net's
`cross_attention_dim`; a U-Net with `addition_embed_type="text_time"` whose
`projection_class_embeddings_input_dim` is 6 × `addition_time_embed_dim` + encoder 2's
`projection_dim`, SDXL's block pattern (no attention at the highest resolution) and two
transformer layers per block at the lowest; a VAE with SDXL's scaling factor and
`force_upcast`. Both tokenizers are saved as transformers 5 saves them (tokenizer.json only).

The tokenizer is a real CLIP byte-level BPE (the algorithm of openai/CLIP `simple_tokenizer.py`,
GPT-2's `bytes_to_unicode`) with a tiny vocabulary: the 256 byte symbols, the same with `</w>`,
merges that make each word of `TOKENIZER_WORDS` one token, then `<|startoftext|>` and
`<|endoftext|>` (the last two ids, as in CLIP). Any other text still tokenizes, byte by byte.
Its files come in one of `TOKENIZER_LAYOUTS`: "vocab" (vocab.json + merges.txt, as SD 1.x
repositories ship), "vocab+json" (those and tokenizer.json, as SD 2.x repositories ship) or
"json" (tokenizer.json + tokenizer_config.json only: what transformers 5 saves).

`make_tiny_autoencoder(path, family)` writes a tiny random-weight diffusers `AutoencoderTiny`
folder (the TAESD / TAESDXL architecture: config.json + diffusion_pytorch_model.safetensors)
with the family's latent channels (4) and VAE scale (8), to stand in for a TAESD download.

Limits: torch, diffusers and transformers are imported inside the functions, so importing
this module stays cheap. The single-file layouts (SDXL's included) are written by conftest's
`save_single_file`, not here. No SDXL refiner variant (text_encoder_2 alone, aesthetic score).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("sd1", "sd2", "lcm", "turbo")  # one text encoder
SDXL_FAMILIES = ("sdxl", "sdxl_turbo")  # two text encoders, added conditioning
ALL_FAMILIES = FAMILIES + SDXL_FAMILIES

TOKENIZER_LAYOUTS = ("vocab", "vocab+json", "json")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# Words that become single tokens: enough for the prompts tests and examples use.
TOKENIZER_WORDS = (
    # articles, prepositions, glue
    "a", "an", "the", "of", "on", "in", "at", "and", "with", "to", "is", "by", "for", "from",
    "under", "over", "next", "near", "behind", "front",
    # colours
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray",
    "grey", "brown", "cyan", "magenta", "gold", "silver", "dark", "light", "bright",
    # shapes and sizes
    "circle", "square", "triangle", "star", "heart", "cross", "ring", "dot", "line", "shape",
    "shapes", "big", "small", "large", "tiny", "round",
    # positions
    "left", "right", "top", "bottom", "center", "centre", "middle", "above", "below", "corner",
    "upper", "lower",
    # subjects and scenes
    "photo", "picture", "painting", "drawing", "image", "cat", "dog", "horse", "astronaut",
    "riding", "mars", "tree", "house", "car", "flower", "mountain", "sky", "sea", "city",
    "portrait", "landscape", "background", "object", "scene", "sunset", "forest", "street",
    # quality words of common (negative) prompts
    "high", "quality", "detailed", "beautiful", "blurry", "ugly", "bad", "low", "best",
    "art", "style",
)  # fmt: skip


@dataclass(frozen=True)
class _Family:
    """What a family changes with respect to the SD 1.5 layout."""

    pipeline_class: str
    text_encoder: str  # "clip" (SD1: OpenAI CLIP layout) or "openclip" (SD2)
    pad_token: str
    tokenizer_layout: str  # the family's default: the files its Hub repos ship
    scheduler: dict[str, Any]
    unet: dict[str, Any] = field(default_factory=dict)


_BETAS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

_FAMILY_SPECS = {
    # runwayml / stable-diffusion-v1-5
    "sd1": _Family(
        pipeline_class="StableDiffusionPipeline",
        text_encoder="clip",
        pad_token=EOS_TOKEN,
        tokenizer_layout="vocab",
        scheduler={
            "_class_name": "PNDMScheduler",
            **_BETAS,
            "prediction_type": "epsilon",
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "timestep_spacing": "leading",
        },
        unet={"attention_head_dim": 8},
    ),
    # stabilityai / stable-diffusion-2-1 (768, v-prediction)
    "sd2": _Family(
        pipeline_class="StableDiffusionPipeline",
        text_encoder="openclip",
        pad_token="!",
        tokenizer_layout="vocab+json",
        scheduler={
            "_class_name": "DDIMScheduler",
            **_BETAS,
            "prediction_type": "v_prediction",
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "timestep_spacing": "leading",
        },
        unet={
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "upcast_attention": True,
        },
    ),
    # SimianLuo / LCM_Dreamshaper_v7: SD 1.5 with the guidance embedding
    "lcm": _Family(
        pipeline_class="LatentConsistencyModelPipeline",
        text_encoder="clip",
        pad_token=EOS_TOKEN,
        tokenizer_layout="vocab",
        scheduler={
            "_class_name": "LCMScheduler",
            **_BETAS,
            "prediction_type": "epsilon",
            "original_inference_steps": 50,
            "clip_sample": False,
            "set_alpha_to_one": True,
            "steps_offset": 0,
            "timestep_spacing": "leading",
            "timestep_scaling": 10.0,
        },
        unet={"attention_head_dim": 8, "time_cond_proj_dim": 32},
    ),
    # stabilityai / sd-turbo: the SD 2.1 architecture, epsilon prediction, trailing Euler
    "turbo": _Family(
        pipeline_class="StableDiffusionPipeline",
        text_encoder="openclip",
        pad_token="!",
        tokenizer_layout="vocab+json",
        scheduler={
            "_class_name": "EulerDiscreteScheduler",
            **_BETAS,
            "prediction_type": "epsilon",
            "interpolation_type": "linear",
            "use_karras_sigmas": False,
            "steps_offset": 1,
            "timestep_spacing": "trailing",
        },
        unet={"attention_head_dim": (2, 4), "use_linear_projection": True},
    ),
}
assert set(_FAMILY_SPECS) == set(FAMILIES)

# Two resolutions (8x8 and 4x4 latents), cross-attention on the higher one and in the middle,
# the block pattern of SD (CrossAttn ... Down / Up ... CrossAttn) at 32 and 64 channels.
_UNET_BASE = {
    "sample_size": 8,  # latent side; the pipeline's default image is 8 * 8 = 64 px
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}

# Four blocks as in SD's VAE, so it downsamples by 8; tiny channels.
_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}

_TEXT_ENCODER_BASE = {
    "hidden_size": 32,  # = the U-Net's cross_attention_dim
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "projection_dim": 32,
    "layer_norm_eps": 1e-5,
}
# OpenAI CLIP (SD1) uses quick_gelu, OpenCLIP ViT-H (SD2) exact gelu.
_TEXT_ENCODER_ACT = {"clip": "quick_gelu", "openclip": "gelu"}

# TAESD's layout (madebyollin/taesd: four stages, 1/3/3/3 encoder and 3/3/3/1 decoder blocks
# of 64 channels) at 8 channels and one block a stage; latents and scale as the families'.
_TINY_AUTOENCODER = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": (8, 8, 8, 8),
    "decoder_block_out_channels": (8, 8, 8, 8),
    "num_encoder_blocks": (1, 1, 1, 1),
    "num_decoder_blocks": (1, 1, 1, 1),
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "upsampling_scaling_factor": 2,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "scaling_factor": 1.0,
}
# Its seed stream, past every seed's component streams (as text_encoder_2's).
_TINY_AUTOENCODER_STREAM = 1 << 41

# One seed stream per component, so that changing one never shifts another.
_COMPONENT_STREAMS = {"unet": 0, "vae": 1, "text_encoder": 2}
# SDXL's second text encoder draws from its own stream past every seed's first three, so the
# streams above (and the SD families' weights) stay what they were.
_TEXT_ENCODER_2_STREAM = 1 << 40

# SDXL (stabilityai/stable-diffusion-xl-base-1.0) at tiny scale. Encoder 1 is 32 wide, encoder
# 2 is 64 wide with a 40-wide projection, so a mixed-up width or the wrong pooled output fails
# loudly; cross_attention_dim is their sum.
_SDXL_TEXT_TIME_DIM = 8  # addition_time_embed_dim (SDXL: 256)
_SDXL_TEXT_ENCODER = {**_TEXT_ENCODER_BASE, "num_hidden_layers": 3}
_SDXL_TEXT_ENCODER_2 = {
    **_TEXT_ENCODER_BASE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "projection_dim": 40,
}
_SDXL_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (16, 32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1, 2),  # SDXL: (1, 2, 10); the mid block takes the last
    "attention_head_dim": (2, 4, 8),  # read as head counts, as SDXL's (5, 10, 20) are
    "use_linear_projection": True,
    "cross_attention_dim": _SDXL_TEXT_ENCODER["hidden_size"] + _SDXL_TEXT_ENCODER_2["hidden_size"],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": _SDXL_TEXT_TIME_DIM,
    # six size values (original, crop, target) embedded, then the pooled text embedding
    "projection_class_embeddings_input_dim": (
        6 * _SDXL_TEXT_TIME_DIM + _SDXL_TEXT_ENCODER_2["projection_dim"]
    ),
    "norm_num_groups": 8,
}
_SDXL_VAE = {**_VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}
_SDXL_SCHEDULERS = {
    # the base model's: Euler, leading spacing
    "sdxl": {
        "_class_name": "EulerDiscreteScheduler",
        **_BETAS,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    },
    # stabilityai/sdxl-turbo's: Euler-ancestral, trailing spacing (1-4 steps, no guidance)
    "sdxl_turbo": {
        "_class_name": "EulerAncestralDiscreteScheduler",
        **_BETAS,
        "prediction_type": "epsilon",
        "steps_offset": 1,
        "timestep_spacing": "trailing",
    },
}


# ---------------------------------------------------------------------------------------------
# Tokenizer: CLIP byte-level BPE with a tiny vocabulary
# ---------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    byte_values = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code_points = list(byte_values)  # printable bytes stand for themselves
    shifted = 0
    for b in range(256):
        if b not in byte_values:  # the rest move past 255, in byte order
            byte_values.append(b)
            code_points.append(256 + shifted)
            shifted += 1
    return dict(zip(byte_values, (chr(c) for c in code_points), strict=True))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge the lowest-ranked adjacent pair, all its occurrences left to right, until none."""
    while len(symbols) > 1:
        pairs = set(zip(symbols, symbols[1:], strict=False))
        best = min(pairs, key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _word_symbols(word: str, byte_encoder: dict[int, str]) -> list[str]:
    chars = [byte_encoder[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + "</w>"]


def build_clip_bpe(
    words: tuple[str, ...] = TOKENIZER_WORDS,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a CLIP BPE in which every word of `words` is one token.

    Merges are added word by word, each time joining the first two symbols the current merges
    leave. A new merge ranks after every earlier one, so it never changes how an earlier word
    tokenizes (at each of that word's steps its own, lower-ranked merge is still the best pair).
    """
    byte_encoder = bytes_to_unicode()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _bpe(_word_symbols(word, byte_encoder), ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(merges)
            merges.append((symbols[0], symbols[1]))
            symbols = _bpe(_word_symbols(word, byte_encoder), ranks)
    tokens = list(byte_encoder.values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:  # two merges can spell the same token; keep ids contiguous
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_clip_tokenizer(
    folder: pathlib.Path,
    pad_token: str = EOS_TOKEN,
    with_tokenizer_json: bool = False,
    words: tuple[str, ...] = TOKENIZER_WORDS,
    layout: str | None = None,
) -> dict[str, int]:
    """Write tokenizer/ like an SD repo (every word of `words` one token); returns the vocab.

    layout: one of TOKENIZER_LAYOUTS; None: "vocab+json" with `with_tokenizer_json`, else
    "vocab".
    """
    if layout is None:
        layout = "vocab+json" if with_tokenizer_json else "vocab"
    if layout not in TOKENIZER_LAYOUTS:
        raise ValueError(f"tokenizer layout must be one of {TOKENIZER_LAYOUTS}, got {layout!r}")
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_clip_bpe(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": pad_token,
        "unk_token": EOS_TOKEN,
    }
    config = {
        "add_prefix_space": False,
        **special,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if layout != "vocab":
        _save_with_transformers(folder, json_only=layout == "json")
    return vocab


def _save_with_transformers(folder: pathlib.Path, json_only: bool) -> None:
    """Let transformers' CLIPTokenizer serialize the tokenizer written in `folder`: its own
    tokenizers pipeline (normalizer, pre-tokenizer, BPE, post-processor) in tokenizer.json, as
    a real repo's would be. json_only: then keep only tokenizer.json and tokenizer_config.json,
    the files transformers 5's `save_pretrained` writes (4.x adds vocab.json, merges.txt and
    special_tokens_map.json)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        names = ("tokenizer.json", "tokenizer_config.json") if json_only else ("tokenizer.json",)
        if json_only:
            for path in folder.iterdir():
                path.unlink()
        for name in names:
            shutil.copyfile(os.path.join(tmp, name), folder / name)


# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------


def _redraw_parameters(module, generator) -> None:
    """Overwrite every parameter from `generator`, in module order.

    Matrices and kernels: N(0, 1/fan_in), variance preserving, so every layer passes signal on
    and a U-Net's output depends on its text input. Norm scales 1 + N(0, 0.1²), biases
    N(0, 0.1²): no parameter is left at a constant.
    """
    import torch

    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for submodule in module.modules():
            for name, param in submodule.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                if param.ndim >= 2:
                    value = noise / math.sqrt(param[0].numel())
                elif isinstance(submodule, norms) and name == "weight":
                    value = 1.0 + 0.1 * noise
                else:
                    value = 0.1 * noise
                param.copy_(value)


def _generator(seed: int, component: str):
    import torch

    if component == "text_encoder_2":
        return torch.Generator().manual_seed(seed + _TEXT_ENCODER_2_STREAM)
    return torch.Generator().manual_seed(
        seed * len(_COMPONENT_STREAMS) + _COMPONENT_STREAMS[component]
    )


def save_safetensors(state_dict, path: pathlib.Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def make_tiny_model(
    path: str | os.PathLike,
    family: str = "sd1",
    seed: int = 0,
    tokenizer_layout: str | None = None,
) -> pathlib.Path:
    """Write a tiny random-weight diffusers folder of `family` to `path`; returns the path.

    family: one of `ALL_FAMILIES` ("sd1", "sd2", "lcm", "turbo", "sdxl", "sdxl_turbo").
    seed: the weights are a pure function of it (same seed: byte-identical safetensors).
    tokenizer_layout: one of TOKENIZER_LAYOUTS (module docstring); None follows the family's
        Hub repos (SD1/LCM: "vocab", SD2/Turbo: "vocab+json"), and for SDXL what
        transformers 5 saves ("json"), for both tokenizers.
    """
    if family not in ALL_FAMILIES:
        raise ValueError(f"family must be one of {ALL_FAMILIES}, got {family!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if tokenizer_layout is not None and tokenizer_layout not in TOKENIZER_LAYOUTS:
        raise ValueError(
            f"tokenizer_layout must be one of {TOKENIZER_LAYOUTS} or None, got {tokenizer_layout!r}"
        )
    root = pathlib.Path(path)
    if family in SDXL_FAMILIES:
        return _make_tiny_sdxl(root, family, seed, tokenizer_layout or "json")
    return _make_tiny_sd(root, family, seed, tokenizer_layout)


def _clip_text_config(vocab: dict[str, int], pad_token: str, act: str, **sizes: Any):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        **sizes,
        hidden_act=_TEXT_ENCODER_ACT[act],
        vocab_size=len(vocab),
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[pad_token],
    )


def _save_text_encoder(text_encoder, folder: pathlib.Path) -> None:
    """config.json + model.safetensors in the Hub layout.

    Hub SD repos store CLIPTextModel with the `text_model.` prefix; transformers >= 5.6 saves
    it without. Writing the Hub layout lets transformers 4 and 5 both load it.
    CLIPTextModelWithProjection keeps its own names (`text_model.…`, `text_projection.…`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = text_encoder.config
    config.architectures = [type(text_encoder).__name__]
    config.dtype = "float32"
    config.save_pretrained(folder)
    if hasattr(text_encoder, "text_projection"):
        state = {k: v for k, v in text_encoder.state_dict().items() if "position_ids" not in k}
    else:
        state = {
            "text_model." + k: v for k, v in text_encoder_state(text_encoder.state_dict()).items()
        }
    save_safetensors(state, folder / "model.safetensors")


def _save_scheduler(scheduler: dict[str, Any], folder: pathlib.Path) -> str:
    """Write scheduler_config.json through diffusers' class; returns the class name."""
    import diffusers

    config = dict(scheduler)
    scheduler_class = getattr(diffusers, config.pop("_class_name"))
    scheduler_class.from_config(config).save_pretrained(folder)
    return scheduler_class.__name__


def _model_index(pipeline_class: str, scheduler_class: str, **extra: Any) -> dict[str, Any]:
    import diffusers

    return {
        "_class_name": pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        **extra,
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _make_tiny_sd(
    root: pathlib.Path, family: str, seed: int, tokenizer_layout: str | None
) -> pathlib.Path:
    import diffusers
    import torch
    from transformers import CLIPTextModel

    spec = _FAMILY_SPECS[family]
    root.mkdir(parents=True, exist_ok=True)

    layout = spec.tokenizer_layout if tokenizer_layout is None else tokenizer_layout
    vocab = write_clip_tokenizer(root / "tokenizer", spec.pad_token, layout=layout)

    # Construction draws default inits from torch's global generator; keep the caller's state.
    with torch.random.fork_rng(devices=[]):
        unet = diffusers.UNet2DConditionModel(**_UNET_BASE, **spec.unet)
        vae = diffusers.AutoencoderKL(**_VAE_CONFIG)
        text_config = _clip_text_config(
            vocab, spec.pad_token, spec.text_encoder, **_TEXT_ENCODER_BASE
        )
        text_encoder = CLIPTextModel(text_config)

    _redraw_parameters(unet, _generator(seed, "unet"))
    _redraw_parameters(vae, _generator(seed, "vae"))
    _redraw_parameters(text_encoder, _generator(seed, "text_encoder"))

    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    _save_text_encoder(text_encoder, root / "text_encoder")
    scheduler_class = _save_scheduler(spec.scheduler, root / "scheduler")

    model_index = _model_index(
        spec.pipeline_class,
        scheduler_class,
        requires_safety_checker=False,
        safety_checker=[None, None],
    )
    (root / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return root


def _make_tiny_sdxl(root: pathlib.Path, family: str, seed: int, layout: str) -> pathlib.Path:
    """SDXL (base or Turbo) at tiny scale: the module docstring says what it has."""
    import diffusers
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root.mkdir(parents=True, exist_ok=True)
    vocab = write_clip_tokenizer(root / "tokenizer", EOS_TOKEN, layout=layout)
    write_clip_tokenizer(root / "tokenizer_2", "!", layout=layout)

    with torch.random.fork_rng(devices=[]):
        unet = diffusers.UNet2DConditionModel(**_SDXL_UNET)
        vae = diffusers.AutoencoderKL(**_SDXL_VAE)
        text_encoder = CLIPTextModel(
            _clip_text_config(vocab, EOS_TOKEN, "clip", **_SDXL_TEXT_ENCODER)
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_text_config(vocab, "!", "openclip", **_SDXL_TEXT_ENCODER_2)
        )
    for name, module in (
        ("unet", unet),
        ("vae", vae),
        ("text_encoder", text_encoder),
        ("text_encoder_2", text_encoder_2),
    ):
        _redraw_parameters(module, _generator(seed, name))

    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    _save_text_encoder(text_encoder, root / "text_encoder")
    _save_text_encoder(text_encoder_2, root / "text_encoder_2")
    scheduler_class = _save_scheduler(_SDXL_SCHEDULERS[family], root / "scheduler")

    model_index = _model_index(
        "StableDiffusionXLPipeline",
        scheduler_class,
        force_zeros_for_empty_prompt=True,
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
        tokenizer_2=["transformers", "CLIPTokenizer"],
    )
    (root / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
    return root


def make_tiny_autoencoder(
    path: str | os.PathLike, family: str = "sd1", seed: int = 0
) -> pathlib.Path:
    """Write a tiny random-weight AutoencoderTiny folder for `family` (module docstring)."""
    import diffusers
    import torch

    if family not in ALL_FAMILIES:
        raise ValueError(f"family must be one of {ALL_FAMILIES}, got {family!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        vae = diffusers.AutoencoderTiny(**_TINY_AUTOENCODER)
    _redraw_parameters(vae, torch.Generator().manual_seed(seed + _TINY_AUTOENCODER_STREAM))
    with torch.no_grad():  # centre the images (else most pixels clip to black, hiding errors)
        vae.decoder.layers[-1].bias.add_(0.5)
    root = pathlib.Path(path)
    vae.save_pretrained(root, safe_serialization=True)
    return root


def text_encoder_state(state_dict) -> dict:
    """CLIPTextModel weights keyed without `text_model.` (both transformers layouts), no buffers."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        if key != "embeddings.position_ids":
            out[key] = value
    return out
