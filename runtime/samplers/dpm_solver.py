"""DPM-Solver++ samplers ("DPM++ 2M", "DPM++ 2M SDE"): Lu et al. 2022, "DPM-Solver++: Fast
Solver for Guided Sampling of Diffusion Probabilistic Models".

The diffusion ODE in the data prediction x̂0 and the half log-SNR λ (fewstep.samplers.sigmas)
is solved by exponential integrators from step s to t, h = λ_t − λ_s:
- first order (DPM-Solver++ 1, which is DDIM): x_t = (σ_t/σ_s)·x_s − α_t·(e^−h − 1)·D0;
- multistep second order (DPM-Solver++(2M), Algorithm 2): with r = h_prev/h and
  D1 = (D0 − D0_prev)/r, add −½·α_t·(e^−h − 1)·D1 ("midpoint") or
  α_t·((e^−h − 1)/h + 1)·D1 ("heun");
- SDE variant (``algorithm_type="sde-dpmsolver++"``, the same authors' solver of the reverse
  diffusion SDE, as their dpm-solver code and diffusers write it): the data term weights
  become α_t·(1 − e^−2h), the sample's σ_t/σ_s·e^−h, and fresh noise σ_t·√(1 − e^−2h)·z is
  added.
D0 is this step's x̂0. The first step is first order; so is the last with
``final_sigmas_type="zero"`` (it lands on x̂0), with ``euler_at_final``, or with
``lower_order_final`` below 15 steps.

Follows diffusers `src/diffusers/schedulers/scheduling_dpmsolver_multistep.py` (0.42:
``set_timesteps``, ``convert_model_output``, ``dpm_solver_first_order_update``,
``multistep_dpm_solver_second_order_update``, ``step``) and matches it to float64 precision
given the same σ table. Timesteps are integers, n + 1 points over [0, T) less the lowest
(fewstep.samplers.base.multistep_timesteps); ``use_karras_sigmas`` puts EDM's levels between
the lowest and highest train σ and rounds their fractional timesteps (truncates them for
``squaredcos_cap_v2``, as diffusers' int64 cast does).

Deviations and limits:
- ``solver_order`` 1 or 2, ``algorithm_type`` "dpmsolver++" or "sde-dpmsolver++" (the
  deprecated noise-prediction "dpmsolver" variants and 3M raise NotImplementedError).
  As in diffusers, solver_type "logrho", "bh1" and "bh2" (UniPC's) mean "midpoint",
  algorithm_type "deis" means "dpmsolver++".
- The SDE variant takes its noise as ``noise=``, needed wherever σ_next > 0; diffusers
  draws noise on the last step too.
- diffusers computes λ, α and σ in float32 from a float32 σ table; here float64.
- Timesteps that repeat (more steps than the spacing has distinct train steps) raise
  ValueError; diffusers divides by zero there.
- With ``squaredcos_cap_v2`` and Karras sigmas diffusers truncates timesteps it found from
  float32 logarithms: a whole number in exact arithmetic (the top level, T − 1) can come out
  one lower there, and where the top timesteps then repeat diffusers starts at the second of
  them. fewstep truncates float64 values and starts at the first.
"""

from __future__ import annotations

import dataclasses
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
    multistep_timesteps,
)
from .sigmas import (
    final_sigma,
    half_log_snr,
    karras_sigmas,
    sigma_to_t,
    train_sigmas,
    vp_alpha_sigma,
    vp_x0,
)

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
# What diffusers' DPMSolverMultistepScheduler reads other solvers' values as.
ALGORITHM_ALIASES = {"deis": "dpmsolver++"}
SOLVER_TYPE_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}
LOWER_ORDER_FINAL_BELOW = 15  # steps; diffusers' threshold for `lower_order_final`


def unique_descending(timesteps: np.ndarray, n: int, label: str) -> None:
    """ValueError where timesteps repeat: equal σ make a multistep solver divide by zero."""
    if np.any(np.diff(timesteps) >= 0):
        raise ValueError(
            f"num_inference_steps={n} repeats timesteps for {label} (the spacing has fewer "
            "distinct train steps); take fewer steps"
        )


class DPMSolverMultistepSampler(Sampler):
    family = "dpmpp_2m"
    label = "DPM-Solver++"
    takes_karras = True

    def __init__(self, config: SchedulerConfig | Mapping[str, Any]) -> None:
        super().__init__(config)
        c = self.config
        algorithm = ALGORITHM_ALIASES.get(c.algorithm_type, c.algorithm_type)
        solver_type = SOLVER_TYPE_ALIASES.get(c.solver_type, c.solver_type)
        if algorithm not in ALGORITHMS:
            raise NotImplementedError(
                f"algorithm_type must be one of {ALGORITHMS}, got {c.algorithm_type!r}"
            )
        if solver_type not in SOLVER_TYPES:
            raise NotImplementedError(
                f"solver_type must be one of {SOLVER_TYPES}, got {c.solver_type!r}"
            )
        if c.solver_order not in (1, 2):
            raise NotImplementedError(f"solver_order must be 1 or 2, got {c.solver_order}")
        self.config = dataclasses.replace(c, algorithm_type=algorithm, solver_type=solver_type)
        self.sde = algorithm == "sde-dpmsolver++"
        self.train_sigmas = train_sigmas(self.config, self.alphas_cumprod)  # [T] ascending
        self.sigmas = np.zeros(0)  # [n + 1] after set_timesteps

    @property
    def name(self) -> str:
        base = "dpmpp_2m_sde" if self.sde else "dpmpp_2m"
        return base + ("_karras" if self.config.use_karras_sigmas else "")

    @property
    def needs_noise(self) -> bool:
        return self.sde

    def last_timestep(self) -> int:
        """T, less the train steps whose λ lies below ``lambda_min_clipped``."""
        lambdas = -np.log(self.train_sigmas)  # descending in t
        clipped = int(np.searchsorted(lambdas[::-1], self.config.lambda_min_clipped))
        return self.config.num_train_timesteps - clipped

    def set_timesteps(self, num_inference_steps: int) -> None:
        n, c = num_inference_steps, self.config
        self._check_num_inference_steps(n, c.num_train_timesteps)
        train = self.train_sigmas
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(float(train[0]), float(train[-1]), n)
            t = sigma_to_t(sigmas, train)
            t = np.trunc(t) if c.beta_schedule == "squaredcos_cap_v2" else np.round(t)
            timesteps = t.astype(np.int64)
        else:
            timesteps = multistep_timesteps(c, n, self.last_timestep())
            check_timestep_range(c, timesteps, n)
            unique_descending(timesteps, n, self.label)
            sigmas = train[timesteps]
        self.timesteps = timesteps
        self.sigmas = np.append(sigmas, final_sigma(c, train))
        self.num_inference_steps = len(timesteps)
        self.begin_index = 0
        self._previous: tuple[Array, float] | None = None  # (x̂0, σ) of the step before
        self._next_step = 0

    def _order(self, step_index: int) -> int:
        """1 for the first step and a lower-order final one, else ``solver_order``."""
        c = self.config
        last = step_index == len(self.timesteps) - 1
        lower_final = last and (
            c.euler_at_final
            or (c.lower_order_final and len(self.timesteps) < LOWER_ORDER_FINAL_BELOW)
            or c.final_sigmas_type == "zero"
        )
        if self._previous is None or lower_final:
            return 1
        return c.solver_order

    def add_noise(self, original: Array, noise: Array, step_index: int) -> Array:
        """α_t·x0 + σ_t·ε at the σ of call `step_index` (a Karras level where there is one),
        as diffusers' ``add_noise`` from its begin index, for img2img."""
        self._check_step_index(step_index)
        alpha_t, sigma_t = vp_alpha_sigma(float(self.sigmas[step_index]))
        return alpha_t * original + sigma_t * noise

    def step(
        self, model_output: Array, step_index: int, sample: Array, noise: Array | None = None
    ) -> SamplerOutput:
        """x at σ_i → x at σ_{i+1}; ``noise`` for the SDE variant where σ_{i+1} > 0."""
        self._check_next_step(step_index)
        sigma, sigma_next = float(self.sigmas[step_index]), float(self.sigmas[step_index + 1])
        x0 = vp_x0(model_output, sample, sigma, self.config.prediction_type)
        if self.sde and sigma_next > 0:
            noise = self._check_noise(noise, model_output)
        h = half_log_snr(sigma_next) - half_log_snr(sigma)
        if h == 0.0:
            # σ_next = σ to rounding (a "sigma_min" end after Karras' own σ_min): the data and
            # noise terms vanish, as diffusers' formulas give them at h = 0.
            prev_sample = (vp_alpha_sigma(sigma_next)[1] / vp_alpha_sigma(sigma)[1]) * sample
        elif self._order(step_index) == 1 or self._previous is None:
            prev_sample = self._update(sample, sigma, sigma_next, x0, None, noise)
        else:
            x0_prev, sigma_prev = self._previous
            h_prev = half_log_snr(sigma) - half_log_snr(sigma_prev)
            d1 = (1.0 / (h_prev / h)) * (x0 - x0_prev)
            prev_sample = self._update(sample, sigma, sigma_next, x0, d1, noise)
        self._previous = (x0, sigma)
        self._next_step += 1
        return SamplerOutput(prev_sample=prev_sample, denoised=x0)

    def _update(
        self,
        sample: Array,
        sigma: float,
        sigma_next: float,
        d0: Array,
        d1: Array | None,
        noise: Array | None,
    ) -> Array:
        """The exponential-integrator step from σ to σ_next with x̂0 = d0 and, for second
        order, its divided difference d1 (DPM-Solver++ eq. 9 and Algorithm 2)."""
        if sigma_next == 0.0:
            return d0  # e^−h = 0: the (first-order, see _order) last step lands on x̂0
        alpha_t, sigma_t = vp_alpha_sigma(sigma_next)
        _, sigma_s = vp_alpha_sigma(sigma)
        h = half_log_snr(sigma_next) - half_log_snr(sigma)
        midpoint = self.config.solver_type == "midpoint"
        if self.sde:
            decay = -math.expm1(-2.0 * h)  # 1 − e^−2h
            out = (sigma_t / sigma_s * math.exp(-h)) * sample + (alpha_t * decay) * d0
            if d1 is not None:
                weight = 0.5 * decay if midpoint else decay / (-2.0 * h) + 1.0
                out = out + (alpha_t * weight) * d1
            assert noise is not None  # step() checked it: σ_next > 0
            return out + (sigma_t * math.sqrt(decay)) * noise
        phi = math.expm1(-h)  # e^−h − 1
        out = (sigma_t / sigma_s) * sample - (alpha_t * phi) * d0
        if d1 is not None:
            weight = -0.5 * phi if midpoint else phi / h + 1.0
            out = out + (alpha_t * weight) * d1
        return out
