"""Euler and Euler-ancestral samplers in σ-space: Karras et al. 2022, "Elucidating
the Design Space of Diffusion-Based Generative Models" (EDM).

Euler: the first-order step of EDM Algorithm 1 (lines 4–5, no Heun correction)
on the probability-flow ODE dx/dσ = (x − D(x; σ))/σ, with the VP
preconditioning of EDM Table 1 (c_in = 1/√(σ² + 1), c_out = −σ for ε).
Euler-ancestral: the same Euler step to σ_down, then fresh noise of std σ_up,
the ancestral split of σ_from → σ_to that k-diffusion's
``sample_euler_ancestral`` / ``get_ancestral_step`` (Crowson) uses.

Follows diffusers `src/diffusers/schedulers/scheduling_euler_discrete.py` and
`scheduling_euler_ancestral_discrete.py` (0.42: ``set_timesteps``,
``init_noise_sigma``, ``scale_model_input``, ``step``) and matches them on
random inputs (see "precision" below). σ_t = √((1 − ᾱ_t)/ᾱ_t) is interpolated
linearly at the (float) timesteps and 0 is appended; ``timesteps`` are
diffusers' float32 values, which the U-Net receives. ``use_karras_sigmas``
(EDM eq. 5 between the ends of that schedule, fewstep.samplers.sigmas) and
``final_sigmas_type`` as in EulerDiscreteScheduler.

Precision: diffusers builds σ in float32 with torch's float32 sqrt (within
1 ulp on the CPU, not correctly rounded) and casts ``sample`` to float32
inside ``step`` ("upcast", which for float64 input is a downcast). Here σ is
computed in float64 from the same ᾱ, and nothing is downcast: a float64
trajectory agrees with diffusers' to float32 precision, and to float64
precision given the same σ and float32-representable samples.

Deviations and limits:
- ``num_inference_steps`` outside 1..T raises ValueError (diffusers accepts 0
  and divides by zero for "leading"); "trailing" takes n timesteps where
  diffusers' float ``arange`` adds a spurious −1 for some n (61, 103, …).
- Euler: ``s_churn`` and friends at their defaults (0: no churn). Exponential
  and beta sigmas, log-linear interpolation and continuous timesteps are not
  implemented.
- Euler-ancestral takes its noise as ``noise=``; it is needed wherever σ_up > 0
  (every step but the last). diffusers draws (and discards) noise on the last
  step too. ``prediction_type="sample"`` raises NotImplementedError there, as
  in diffusers.
- diffusers' EulerAncestralDiscreteScheduler takes no ``use_karras_sigmas`` (a
  config's is ignored, as there). fewstep's "euler_ancestral_karras" sets it:
  EulerDiscreteScheduler's Karras schedule under the ancestral step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import Array, Sampler, SamplerOutput, SchedulerConfig, spaced_timesteps
from .sigmas import euler_schedule, train_sigmas


class EulerSampler(Sampler):
    family = "euler"
    label = "Euler"
    takes_karras = True

    def __init__(self, config: SchedulerConfig | Mapping[str, Any]) -> None:
        super().__init__(config)
        # σ_t of each train timestep t = 0..T−1, ascending.   [T]
        self.train_sigmas = train_sigmas(self.config, self.alphas_cumprod)
        self.sigmas = np.zeros(0)  # [n + 1] after set_timesteps
        self.init_noise_sigma = self._init_noise_sigma(self.train_sigmas)

    def _init_noise_sigma(self, sigmas: np.ndarray) -> float:
        # The std of x_T. "leading" starts below the top train step, and diffusers
        # then scales by √(σ_max² + 1) rather than σ_max.
        sigma_max = float(sigmas.max())
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return sigma_max
        return math.sqrt(sigma_max**2 + 1.0)

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = num_inference_steps
        self._check_num_inference_steps(n, self.config.num_train_timesteps)
        spaced = spaced_timesteps(self.config, n)
        self.timesteps, self.sigmas = euler_schedule(self.config, self.train_sigmas, spaced)
        self.init_noise_sigma = self._init_noise_sigma(self.sigmas)
        self.num_inference_steps = n
        self.begin_index = 0

    def scale_model_input(self, sample: Array, step_index: int) -> Array:
        """c_in(σ)·x = x/√(σ² + 1): the VP U-Net's input at noise level σ (EDM Table 1)."""
        self._check_step_index(step_index)
        sigma = float(self.sigmas[step_index])
        return sample / math.sqrt(sigma**2 + 1.0)

    def add_noise(self, original: Array, noise: Array, step_index: int) -> Array:
        """x0 + σ·ε at the σ of call `step_index` (diffusers' ``add_noise`` from its
        begin index), for img2img."""
        self._check_step_index(step_index)
        return original + float(self.sigmas[step_index]) * noise

    def _denoise(self, model_output: Array, sigma: float, sample: Array) -> Array:
        """D(x; σ), the denoised estimate, from the U-Net output (EDM Table 1, VP column)."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return sample - sigma * model_output
        if kind == "v_prediction":
            return (-sigma / math.sqrt(sigma**2 + 1.0)) * model_output + sample / (sigma**2 + 1.0)
        return model_output

    def step(
        self, model_output: Array, step_index: int, sample: Array, noise: Array | None = None
    ) -> SamplerOutput:
        """x at σ_i → x at σ_{i+1} (EDM Algorithm 1, lines 4–5); ``noise`` is not used."""
        self._check_step_index(step_index)

        # 1. The noise levels of this step and the next (σ_n = 0).
        sigma = float(self.sigmas[step_index])
        sigma_next = float(self.sigmas[step_index + 1])

        # 2. Denoised estimate D(x_i; σ_i).
        denoised = self._denoise(model_output, sigma, sample)

        # 3. ODE derivative d_i = (x_i − D(x_i; σ_i))/σ_i (EDM Algorithm 1, line 4).
        derivative = (sample - denoised) / sigma

        # 4. Euler step x_{i+1} = x_i + (σ_{i+1} − σ_i)·d_i.
        prev_sample = sample + (sigma_next - sigma) * derivative
        return SamplerOutput(prev_sample=prev_sample, denoised=denoised)


class EulerAncestralSampler(EulerSampler):
    family = "euler_ancestral"
    label = "Euler-ancestral"

    def __init__(self, config: SchedulerConfig | Mapping[str, Any]) -> None:
        super().__init__(config)
        if self.config.prediction_type == "sample":
            raise NotImplementedError(
                "prediction_type='sample' is not implemented for Euler-ancestral"
            )

    @property
    def needs_noise(self) -> bool:
        return True

    def step(
        self, model_output: Array, step_index: int, sample: Array, noise: Array | None = None
    ) -> SamplerOutput:
        """An Euler step to σ_down plus σ_up·noise; ``noise`` is needed where σ_up > 0."""
        self._check_step_index(step_index)

        # 1. σ_from → σ_to, split so that σ_down² + σ_up² = σ_to² and the step matches
        #    DDPM's ancestral posterior: σ_up² = σ_to²·(σ_from² − σ_to²)/σ_from².
        sigma = float(self.sigmas[step_index])
        sigma_to = float(self.sigmas[step_index + 1])
        sigma_up = math.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
        sigma_down = math.sqrt(max(sigma_to**2 - sigma_up**2, 0.0))  # ≥ 0 up to rounding

        # 2. Denoised estimate D(x_i; σ_i) and the ODE derivative (EDM Algorithm 1, line 4).
        denoised = self._denoise(model_output, sigma, sample)
        derivative = (sample - denoised) / sigma

        # 3. Deterministic Euler step to σ_down (EDM Algorithm 1, line 5).
        prev_sample = sample + (sigma_down - sigma) * derivative

        # 4. Fresh noise back up to σ_to.
        if sigma_up > 0:
            prev_sample = prev_sample + sigma_up * self._check_noise(noise, model_output)
        return SamplerOutput(prev_sample=prev_sample, denoised=denoised)
