"""Heun sampler: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (EDM), Algorithm 1 (deterministic, no churn): an Euler step of the
probability-flow ODE dx/dσ = (x − D(x; σ))/σ from σ_i to σ_{i+1} (line 5), then, unless
σ_{i+1} = 0, the trapezoidal correction with the derivative at the Euler step's result
(lines 7–8). Two U-Net calls per step, one for the last.

Follows diffusers `src/diffusers/schedulers/scheduling_heun_discrete.py` (0.42:
``set_timesteps``, ``scale_model_input``, ``step``) and matches it to float64 precision given
the same σ table. As there, ``timesteps`` and ``sigmas`` hold one entry per U-Net call:
``[t_0, t_1, t_1, …, t_{n−1}, t_{n−1}]`` (2n − 1) and ``[σ_0, σ_1, σ_1, …, σ_{n−1}, σ_{n−1},
0]``; the σ schedule is Euler's (fewstep.samplers.sigmas.euler_schedule), Karras levels with
``use_karras_sigmas``. D(x; σ) and the VP input scaling are Euler's (fewstep.samplers.euler).

Deviations and limits:
- ``num_inference_steps`` outside 1..T raises ValueError; "trailing" takes n timesteps (see
  fewstep.samplers.base.spaced_timesteps).
- The "exp" beta schedule, exponential and beta sigmas are not implemented.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import Array, SamplerOutput, SchedulerConfig, spaced_timesteps
from .euler import EulerSampler
from .sigmas import euler_schedule


class HeunSampler(EulerSampler):
    family = "heun"
    label = "Heun"
    order = 2  # img2img skips two calls per step: call 2k starts step k

    def __init__(self, config: SchedulerConfig | Mapping[str, Any]) -> None:
        super().__init__(config)
        self._first: tuple[Array, Array, float] | None = None  # (x_i, d_i, σ_{i+1} − σ_i)

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = num_inference_steps
        self._check_num_inference_steps(n, self.config.num_train_timesteps)
        spaced = spaced_timesteps(self.config, n)
        timesteps, sigmas = euler_schedule(self.config, self.train_sigmas, spaced)
        # Every level but the first and the final 0 is visited twice: at the end of one
        # step's Euler part (its correction) and at the start of the next step.
        self.timesteps = np.concatenate([timesteps[:1], timesteps[1:].repeat(2)])
        self.sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
        self.init_noise_sigma = self._init_noise_sigma(self.sigmas)
        self.num_inference_steps = n
        self.begin_index = 0
        self._first = None
        self._next_step = 0

    def step(
        self, model_output: Array, step_index: int, sample: Array, noise: Array | None = None
    ) -> SamplerOutput:
        """The Euler part of a step (even calls) or its correction (odd calls); ``noise`` is
        not used."""
        self._check_next_step(step_index)
        self._next_step += 1
        if self._first is None:
            # 1. Euler step from σ_i to σ_{i+1}, d_i = (x_i − D(x_i; σ_i))/σ_i.
            sigma = float(self.sigmas[step_index])
            sigma_next = float(self.sigmas[step_index + 1])
            denoised = self._clipped_denoise(model_output, sigma, sample)
            derivative = (sample - denoised) / sigma
            dt = sigma_next - sigma
            self._first = (sample, derivative, dt)
            return SamplerOutput(prev_sample=sample + derivative * dt, denoised=denoised)
        # 2. Correction at σ_{i+1}: x_{i+1} = x_i + (σ_{i+1} − σ_i)·(d_i + d'_i)/2.
        sigma_next = float(self.sigmas[step_index])
        denoised = self._clipped_denoise(model_output, sigma_next, sample)
        start, first_derivative, dt = self._first
        self._first = None
        derivative = (first_derivative + (sample - denoised) / sigma_next) / 2
        return SamplerOutput(prev_sample=start + derivative * dt, denoised=denoised)

    def _clipped_denoise(self, model_output: Array, sigma: float, sample: Array) -> Array:
        denoised = self._denoise(model_output, sigma, sample)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            denoised = denoised.clip(-r, r)
        return denoised
