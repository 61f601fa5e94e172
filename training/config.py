"""Configs of the default model's training stages: frozen dataclasses and one presets dict.

`default` is the full run (training/README.md has its time budget); `fifth` and `third` are
earlier runs' U-Nets; `smoke` is the same models with a small latent cache, for minute-long
timing runs (`--stop-after-minutes`); `tiny` is a toy model for the tests (a few seconds per
stage). A run folder stores the config it started with, and a resumed run must use the same
one.

Sizes (the shipping budget is <= 12 MB of weight files; the shipped folder is both the
diffusers folder and the package and stores each fp16 weight once, training/ship.py):

    U-Net (48, 96, 96), cross-attention at 8x8 and 4x4         3.78 M
    VAE (32, 48, 64), x4 downsampling, 4 latent channels        0.84 M
    CLIP text encoder, hidden 96, 2 layers                      0.21 M
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (32, 48, 64)  # 3 blocks: x4 downsampling
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    batch_size: int = 16  # as many images/s as 32 on 2 cores, twice the steps (README)
    max_steps: int = 3000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.05  # cosine decay to this fraction of the peak
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # loss = MSE + edge_weight * MSE of the image gradients + kl_weight * KL (per-element means);
    # an edge term from step 0 delayed learning (README), so it is off
    edge_weight: float = 0.0
    kl_weight: float = 1e-6
    bf16: bool = True  # autocast: 1.5x faster than fp32 for this model on AMX (README)
    seed: int = 1  # weights init and the sampling noise
    data_seed: int = 1  # scenes: scene_at(index, data_seed)
    eval_every: int = 250  # steps between PSNR checks on a fixed held-out batch
    eval_scenes: int = 256
    checkpoint_minutes: float = 5.0


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    # U-Net (diffusers UNet2DConditionModel; 16x16 latents)
    # the fifth run's: 3.79 M parameters, no attention at 16x16 (its cost there bought nothing
    # in the fourth run, README), which made room for the wider channels at the same step cost
    block_out_channels: tuple[int, ...] = (48, 96, 96)
    layers_per_block: int = 1
    attention_heads: int = 2  # diffusers' `attention_head_dim` (= heads for SD1-style U-Nets)
    norm_num_groups: int = 8
    cross_attention_levels: tuple[bool, ...] = (False, True, True)
    # text encoder (transformers CLIPTextModel)
    text_hidden_size: int = 96  # = the U-Net's cross_attention_dim
    text_intermediate_size: int = 192
    text_layers: int = 2
    text_heads: int = 4
    # the text encoder is pretrained to spell out each caption's attributes, then frozen
    # (training/pretrain_text.py; trained jointly, it let shape and position words collapse)
    text_pretrain_steps: int = 600
    text_pretrain_batch: int = 128
    text_pretrain_lr: float = 1e-3
    # training
    num_scenes: int = 65_536  # encoded once (common.LatentCache), then cycled: ~4 epochs
    batch_size: int = 64
    # the fifth run's 6000 steps, whose sample checks still rose at the end, continued for
    # 5000 more from half the peak rate: the sixth run (README)
    max_steps: int = 11000
    learning_rate: float = 5e-4
    warmup_steps: int = 200
    final_lr_fraction: float = 0.1
    # (step, fraction of the peak) where the cosine starts again (common.lr_at); a run with a
    # restart at its old max_steps continues that run's checkpoint exactly
    lr_restarts: tuple[tuple[int, float], ...] = ((6000, 0.5),)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    caption_dropout: float = 0.1  # empty caption: the unconditional branch of CFG
    # v-prediction on a zero-terminal-SNR schedule (common.Schedule; the first run's epsilon +
    # scaled_linear read its backgrounds from the schedule's signal leak, README)
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    min_snr_gamma: float | None = 5.0  # Min-SNR loss weighting (Hang et al. 2023); None: off
    ema_decay: float = 0.999
    bf16: bool = False  # no faster than fp32 at these widths (README), so off
    # progress check: the EMA model draws evaluation prompts (DDIM, CFG 7.5), the analyzer scores
    sample_every: int = 500
    sample_prompts: int = 20  # half single-object, half two-object
    sample_steps: int = 25
    seed: int = 2
    data_seed: int = 2
    checkpoint_minutes: float = 5.0


@dataclasses.dataclass(frozen=True)
class LCMConfig:
    time_cond_proj_dim: int = 128  # guidance-embedding width (LCM Dreamshaper: 256)
    num_ddim_timesteps: int = 50  # skip k = 1000 / 50 = 20; = LCMScheduler original_inference_steps
    # guidance scale w + 1 of the teacher, drawn uniformly per sample; around the student's
    # default 8.5 only: 70% single-object at 4 steps against 60% with U[2, 10] (README)
    w_min: float = 6.0
    w_max: float = 10.0
    batch_size: int = 32
    max_steps: int = 250  # every run's sample checks peaked at step 250 (README)
    learning_rate: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    target_ema_decay: float = 0.95  # the target network (LCM paper, diffusers' script)
    huber_c: float = 0.001  # pseudo-Huber loss constant
    bf16: bool = False
    # progress check: the student draws evaluation prompts (LCM, guidance 8.5)
    sample_every: int = 250
    sample_prompts: int = 20
    sample_steps: int = 4
    seed: int = 3
    checkpoint_minutes: float = 5.0


# The fifth run's U-Net: the default's first 6000 steps, without the restart.
FIFTH_UNET: dict[str, Any] = {"max_steps": 6000, "lr_restarts": ()}

PRESETS: dict[str, dict[str, Any]] = {
    "default": {"vae": {}, "unet": {}, "lcm": {}},
    "fifth": {"vae": {}, "unet": FIFTH_UNET, "lcm": {}},
    # The third run's U-Net (shipped before the fifth's): attention at every level, 1.8 M
    # parameters, 5000 steps.
    "third": {
        "vae": {},
        "unet": {
            "block_out_channels": (32, 64, 64),
            "cross_attention_levels": (True, True, True),
            "max_steps": 5000,
            "lr_restarts": (),
        },
        "lcm": {},
    },
    # Distillations of the fifth run's teacher that were not shipped (README): w ~ U[2, 10],
    # and that with twice the batch.
    "lcm-w2-10": {"vae": {}, "unet": FIFTH_UNET, "lcm": {"w_min": 2.0}},
    "lcm-batch64": {"vae": {}, "unet": FIFTH_UNET, "lcm": {"w_min": 2.0, "batch_size": 64}},
    # the default models with a small latent cache: for minute-long timing runs
    "smoke": {"vae": {}, "unet": {"num_scenes": 4096}, "lcm": {}},
    "tiny": {
        "vae": {
            "block_out_channels": (8, 8),
            "norm_num_groups": 4,
            "batch_size": 4,
            "max_steps": 4,
            "warmup_steps": 2,
            "eval_every": 2,
            "eval_scenes": 16,
        },
        "unet": {
            "block_out_channels": (8, 16),
            "attention_heads": 1,
            "norm_num_groups": 4,
            "cross_attention_levels": (True, False),
            "text_hidden_size": 16,
            "text_intermediate_size": 16,
            "text_layers": 1,
            "text_heads": 2,
            "text_pretrain_steps": 2,
            "text_pretrain_batch": 4,
            "num_scenes": 24,
            "batch_size": 4,
            "max_steps": 4,
            "warmup_steps": 2,
            "sample_prompts": 4,
            "sample_steps": 2,
            "lr_restarts": (),
        },
        "lcm": {
            "time_cond_proj_dim": 8,
            "batch_size": 2,
            "max_steps": 4,
            "warmup_steps": 2,
            "sample_prompts": 4,
            "sample_steps": 2,
        },
    },
}
STAGES = {"vae": VAEConfig, "unet": UNetConfig, "lcm": LCMConfig}


def from_name(stage: str, name: str) -> Any:
    """The config of `stage` ("vae" | "unet" | "lcm") in preset `name`."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {tuple(STAGES)}, got {stage!r}")
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return STAGES[stage](**PRESETS[name][stage])
