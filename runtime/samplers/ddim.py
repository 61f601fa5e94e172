"""DDIM sampler: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models".

Follows diffusers `src/diffusers/schedulers/scheduling_ddim.py` (0.42:
``DDIMScheduler.set_timesteps`` and ``step``) and matches it to float64
precision on random inputs.

Like diffusers, ᾱ_prev is read at ``t − T // n`` (T = num_train_timesteps,
n = num_inference_steps), not at the next timestep of the list. The two agree
for "leading" spacing and for "trailing" when n divides T; for "linspace" and
other "trailing" counts diffusers (and so fewstep) steps to a slightly
different noise level than the next one it evaluates the U-Net at.

Deviations and limits:
- ``num_inference_steps`` outside 1..T raises ValueError (diffusers divides by
  zero for 0). A "leading" schedule that ``steps_offset`` pushes past T − 1
  (e.g. n = 1000 with steps_offset 1) raises ValueError here; diffusers fails
  later with an IndexError.
- "trailing" spacing takes n timesteps; diffusers' float ``arange`` adds a
  spurious last timestep −1 for some n (61, 103, …), which indexes ᾱ[−1].
- ``eta`` must lie in [0, 1] (η = 1 is DDPM's posterior variance; larger
  values make eq. 12's direction coefficient imaginary, diffusers returns NaN).
- The noise for η > 0 is passed in (``noise=``); nothing here draws random
  numbers. ``thresholding`` and ``use_clipped_model_output`` are not supported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import (
    Array,
    Sampler,
    SamplerOutput,
    SchedulerConfig,
    check_timestep_range,
    spaced_timesteps,
)


class DDIMSampler(Sampler):
    family = "ddim"
    label = "DDIM"

    def __init__(self, config: SchedulerConfig | Mapping[str, Any], eta: float = 0.0) -> None:
        super().__init__(config)
        self.eta = self._check_eta(eta)
        # ᾱ "before" the first train step, used when t − T//n < 0.
        self.final_alpha_cumprod = (
            1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])
        )

    @property
    def needs_noise(self) -> bool:
        return self.eta > 0

    @staticmethod
    def _check_eta(eta: float) -> float:
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be between 0 and 1, got {eta}")
        return float(eta)

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        timesteps = np.round(spaced_timesteps(self.config, num_inference_steps)).astype(np.int64)
        check_timestep_range(self.config, timesteps, num_inference_steps)
        self.timesteps = timesteps
        self.num_inference_steps = num_inference_steps
        self.begin_index = 0

    def step(
        self,
        model_output: Array,
        step_index: int,
        sample: Array,
        noise: Array | None = None,
        eta: float | None = None,
    ) -> SamplerOutput:
        """x_t → x_{t−1} by DDIM eq. 12; ``eta`` defaults to the constructor's."""
        self._check_step_index(step_index)
        eta = self.eta if eta is None else self._check_eta(eta)

        # 1. The timestep and the one eq. 12 steps to (diffusers' rule: t − T//n).
        t = int(self.timesteps[step_index])
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = float(self.alphas_cumprod[t])
        alpha_prod_prev = (
            float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        )

        # 2. Predicted x0 ("predicted x0" term of eq. 12) and the ε it implies.
        x0, sqrt_alpha, sqrt_beta = self._x0_from_model_output(model_output, sample, alpha_prod_t)
        kind = self.config.prediction_type
        if kind == "epsilon":
            eps = model_output
        elif kind == "v_prediction":
            eps = sqrt_alpha * model_output + sqrt_beta * sample
        else:
            eps = (sample - sqrt_alpha * x0) / sqrt_beta

        # 3. Clip x0 (ε keeps the unclipped value, as in diffusers).
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = x0.clip(-r, r)

        # 4. σ_t(η), eq. 16: η · √((1 − ᾱ_{t−1}) / (1 − ᾱ_t)) · √(1 − ᾱ_t / ᾱ_{t−1}).
        variance = (
            (1.0 - alpha_prod_prev) / (1.0 - alpha_prod_t) * (1.0 - alpha_prod_t / alpha_prod_prev)
        )
        std_dev = eta * math.sqrt(variance)

        # 5. "Direction pointing to x_t", eq. 12: √(1 − ᾱ_{t−1} − σ_t²) · ε.
        direction = math.sqrt(1.0 - alpha_prod_prev - std_dev**2) * eps

        # 6. x_{t−1} = √ᾱ_{t−1} · x0 + direction + σ_t · z, eq. 12.
        prev_sample = math.sqrt(alpha_prod_prev) * x0 + direction
        if std_dev > 0:
            prev_sample = prev_sample + std_dev * self._check_noise(noise, model_output)
        return SamplerOutput(prev_sample=prev_sample, denoised=x0)
