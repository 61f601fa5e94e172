"""LCM sampler: Luo et al. 2023, "Latent Consistency Models" (§4.1 for the
consistency function f_θ, Algorithm 3 "multistep latent consistency
sampling"), with the boundary condition of Song et al. 2023, "Consistency
Models" (§3, f_θ = c_skip·x + c_out·F_θ; scalings after Appendix C, in
diffusers' discrete form with σ_data = 0.5 and t scaled by timestep_scaling).

Follows diffusers `src/diffusers/schedulers/scheduling_lcm.py` (0.42:
``LCMScheduler.set_timesteps``, ``get_scalings_for_boundary_condition_discrete``,
``step``) and, for ``guidance_scale_embedding``,
``pipelines/latent_consistency_models/pipeline_latent_consistency_text2img.py``
(``get_guidance_scale_embedding``). Matches them to float64 precision on
random inputs.

Deviations and limits:
- ``num_inference_steps`` must lie in 1..original_inference_steps (diffusers
  divides by zero for 0); with img2img's ``strength``, at most
  ⌊original_inference_steps · strength⌋ (diffusers raises there too). Custom
  timesteps are not implemented. ``thresholding`` is not supported.
- LCM timesteps are all ≥ k − 1 ≥ 0, so ``set_alpha_to_one`` never applies
  (as in diffusers); ``timestep_spacing`` is ignored (as in diffusers).
- The noise added between steps is passed in (``noise=``); the last step adds
  none (diffusers draws none there either).
- diffusers evaluates c_skip and c_out in float32 (the timestep is an int64
  tensor); here they are float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import Array, Sampler, SamplerOutput, SchedulerConfig, check_strength

SIGMA_DATA = 0.5  # σ_data of the boundary condition (Consistency Models, Appendix C)


class LCMSampler(Sampler):
    family = "lcm"
    label = "LCM"

    def __init__(self, config: SchedulerConfig | Mapping[str, Any]) -> None:
        super().__init__(config)
        T, original = self.config.num_train_timesteps, self.config.original_inference_steps
        if not 1 <= original <= T:
            raise ValueError(
                f"original_inference_steps must be between 1 and num_train_timesteps={T}, "
                f"got {original}"
            )

    @property
    def needs_noise(self) -> bool:
        return True

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> None:
        """n timesteps of the distillation schedule; with `strength` < 1 (img2img) of its
        lowest ⌊original_inference_steps · strength⌋ timesteps only."""
        check_strength(strength)
        original = self.config.original_inference_steps
        self._check_num_inference_steps(num_inference_steps, original)
        # The distillation schedule: every k-th train timestep, k = T // original
        # ("skipping step" k of LCM §4.3), ending at k − 1; descending.
        k = self.config.num_train_timesteps // original
        count = int(original * strength)
        if count < num_inference_steps:
            raise ValueError(
                f"num_inference_steps must be at most int(original_inference_steps × strength) "
                f"= int({original} × {strength}) = {count} for LCM img2img (its steps are taken "
                f"from that many distillation timesteps), got {num_inference_steps}: lower "
                "num_inference_steps or raise strength"
            )
        origin = (np.arange(count, 0, -1) * k - 1).astype(np.int64)
        # n of them, evenly spaced by index, starting at the noisiest.
        picks = np.floor(np.linspace(0, count, num_inference_steps, endpoint=False))
        self.timesteps = origin[picks.astype(np.int64)]
        self.num_inference_steps = num_inference_steps
        self.begin_index = 0

    def set_img2img_timesteps(self, num_inference_steps: int, strength: float) -> None:
        """LCM's own img2img schedule (diffusers' LatentConsistencyModelImg2ImgPipeline
        passes `strength` to ``LCMScheduler.set_timesteps``): all n steps run, over the lower
        part of the distillation schedule; nothing is skipped."""
        self.set_timesteps(num_inference_steps, strength)

    def boundary_condition(self, timestep: int) -> tuple[float, float]:
        """(c_skip, c_out) at ``timestep``, with s = timestep·timestep_scaling:
        c_skip = σ_d²/(s² + σ_d²), c_out = s/√(s² + σ_d²); c_skip → 1, c_out → 0 as t → 0,
        so f_θ(x, 0) = x (the boundary condition)."""
        scaled = timestep * self.config.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / math.sqrt(scaled**2 + SIGMA_DATA**2)
        return c_skip, c_out

    def step(
        self, model_output: Array, step_index: int, sample: Array, noise: Array | None = None
    ) -> SamplerOutput:
        """One iteration of LCM Algorithm 3; ``noise`` is needed except at the last step."""
        self._check_step_index(step_index)
        last = step_index == len(self.timesteps) - 1

        # 1. The timestep τ_n and the next one, τ_{n−1} (unused at the last step).
        t = int(self.timesteps[step_index])
        prev_t = t if last else int(self.timesteps[step_index + 1])
        alpha_prod_t = float(self.alphas_cumprod[t])
        alpha_prod_prev = float(self.alphas_cumprod[prev_t])

        # 2. Boundary-condition scalings c_skip(t), c_out(t).
        c_skip, c_out = self.boundary_condition(t)

        # 3. x̂0 from the model output (LCM §4.1: ε-, x- or v-parameterisation of f_θ).
        x0, _, _ = self._x0_from_model_output(model_output, sample, alpha_prod_t)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = x0.clip(-r, r)

        # 4. The consistency function f_θ(z_t, t) = c_skip·z_t + c_out·x̂0 (LCM §4.1).
        denoised = c_out * x0 + c_skip * sample

        # 5. Algorithm 3: re-noise to τ_{n−1}, z = √ᾱ·x̂0 + √(1−ᾱ)·ε; not after the last step.
        if last:
            return SamplerOutput(prev_sample=denoised, denoised=denoised)
        noise = self._check_noise(noise, model_output)
        prev_sample = (
            math.sqrt(alpha_prod_prev) * denoised + math.sqrt(1.0 - alpha_prod_prev) * noise
        )
        return SamplerOutput(prev_sample=prev_sample, denoised=denoised)


def guidance_scale_embedding(
    w: np.ndarray, embedding_dim: int, dtype: Any = np.float32
) -> np.ndarray:
    """The U-Net's ``timestep_cond`` for guidance-distilled LCMs: [len(w), embedding_dim].

    Sinusoidal embedding (VDM, Kingma et al. 2021, `model_vdm.py`
    ``get_timestep_embedding``) of w·1000 with frequencies 10000^(−i/(d/2 − 1)),
    sin half then cos half, zero-padded when ``embedding_dim`` is odd. ``w`` is
    diffusers' ``guidance_scale − 1`` (the pipeline's business). Computed in
    float64 and cast to ``dtype``: diffusers computes it in float32, whose
    arguments w·1000·f are rounded to float32 (an error of ~|arg|·6e-8).
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"w must be one-dimensional [batch], got shape {w.shape}")
    if embedding_dim < 4:
        raise ValueError(f"embedding_dim must be >= 4, got {embedding_dim}")
    half = embedding_dim // 2
    freqs = np.exp(np.arange(half) * (-math.log(10000.0) / (half - 1)))  # [half]
    args = (w * 1000.0)[:, None] * freqs[None, :]  # [B, half]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)  # [B, 2·half]
    if embedding_dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(dtype)
