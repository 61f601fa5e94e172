"""UniPC sampler: Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models", data prediction, B(h) = e^h − 1 ("bh2"), order 2.

Each step first corrects the sample the previous step predicted, with the x̂0 the U-Net
now gives there (UniC, Algorithm 2), then predicts the next one (UniP, Algorithm 1); the
last step is predictor only. With h = λ_t − λ_s (fewstep.samplers.sigmas), φ = e^−h − 1,
B = φ and m_0 the newest x̂0:
- predictor: x_t = (σ_t/σ_s)·x_s − α_t·φ·m_0, plus −α_t·B·½·D_1 at order 2, where
  D_1 = (m_1 − m_0)/r and r = (λ_{s1} − λ_s)/h for the x̂0 m_1 one step older;
- corrector: the same first-order step from the previous sample, plus
  −α_t·B·(ρ_1·D_1 + ρ_c·(m_t − m_0)) with m_t the new x̂0 and (ρ_1, ρ_c) solving
  [[1, 1], [r, 1]]·ρ = (φ_1/B, 2·φ_2/B) (φ_1 = φ/(−h) − 1, φ_2 = φ_1/(−h) − ½); at first
  order ρ_c = ½ alone.
Orders rise from 1 at the first step; with ``lower_order_final`` the last step is first
order. The schedule is DPM-Solver's (integer timesteps; fewstep.samplers.base.
multistep_timesteps), Karras levels with ``use_karras_sigmas``.

Follows diffusers `src/diffusers/schedulers/scheduling_unipc_multistep.py` (0.42:
``set_timesteps``, ``convert_model_output``, ``multistep_uni_p_bh_update``,
``multistep_uni_c_bh_update``, ``step``) and matches it to float64 precision given the same
σ table.

Deviations and limits:
- ``solver_order`` 1 or 2 and ``solver_type`` "bh2" (as in diffusers, "midpoint", "heun"
  and "logrho" mean "bh2"); "bh1", order 3 and ``predict_x0=False`` raise
  NotImplementedError. ``disable_corrector`` is honoured; ``solver_p`` (an object, not a
  config value) is not.
- ``lower_order_final=False`` with ``final_sigmas_type="zero"`` raises ValueError: the
  last step's second-order term divides by h = ∞ (diffusers returns NaN).
- Timesteps that repeat raise ValueError, as for DPM-Solver.
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
from .dpm_solver import unique_descending
from .sigmas import (
    final_sigma,
    half_log_snr,
    karras_sigmas,
    sigma_to_t,
    train_sigmas,
    vp_alpha_sigma,
    vp_x0,
)

SOLVER_TYPE_ALIASES = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}


class UniPCSampler(Sampler):
    family = "unipc"
    label = "UniPC"
    takes_karras = True

    def __init__(self, config: SchedulerConfig | Mapping[str, Any]) -> None:
        super().__init__(config)
        c = self.config
        solver_type = SOLVER_TYPE_ALIASES.get(c.solver_type, c.solver_type)
        if solver_type != "bh2":
            raise NotImplementedError(f"solver_type must be 'bh2', got {c.solver_type!r}")
        if c.solver_order not in (1, 2):
            raise NotImplementedError(f"solver_order must be 1 or 2, got {c.solver_order}")
        if c.solver_order == 2 and not c.lower_order_final and c.final_sigmas_type == "zero":
            raise ValueError(
                "lower_order_final=False with final_sigmas_type='zero' gives UniPC a "
                "second-order last step to sigma 0, which divides by infinity"
            )
        self.config = dataclasses.replace(c, solver_type=solver_type)
        self.train_sigmas = train_sigmas(self.config, self.alphas_cumprod)  # [T] ascending
        self.sigmas = np.zeros(0)  # [n + 1] after set_timesteps

    def set_timesteps(self, num_inference_steps: int) -> None:
        n, c = num_inference_steps, self.config
        self._check_num_inference_steps(n, c.num_train_timesteps)
        train = self.train_sigmas
        if c.use_karras_sigmas:
            sigma_min = c.sigma_min if c.sigma_min is not None else float(train[0])
            sigma_max = c.sigma_max if c.sigma_max is not None else float(train[-1])
            sigmas = karras_sigmas(sigma_min, sigma_max, n)
            self.timesteps = np.round(sigma_to_t(sigmas, train)).astype(np.int64)
            last = float(sigmas[-1]) if c.final_sigmas_type == "sigma_min" else 0.0
        else:
            self.timesteps = multistep_timesteps(c, n, c.num_train_timesteps)
            check_timestep_range(c, self.timesteps, n)
            unique_descending(self.timesteps, n, self.label)
            sigmas = train[self.timesteps]
            last = final_sigma(c, train)
        self.sigmas = np.append(sigmas, last)
        self.num_inference_steps = len(self.timesteps)
        self.begin_index = 0
        self._x0s: list[Array] = []  # the x̂0 of the last steps, newest last
        self._last: tuple[Array, int] | None = None  # (x, order) the last prediction was from
        self._next_step = 0

    def add_noise(self, original: Array, noise: Array, step_index: int) -> Array:
        """α_t·x0 + σ_t·ε at the σ of call `step_index` (a Karras level where there is one),
        as diffusers' ``add_noise`` from its begin index, for img2img."""
        self._check_step_index(step_index)
        alpha_t, sigma_t = vp_alpha_sigma(float(self.sigmas[step_index]))
        return alpha_t * original + sigma_t * noise

    def step(
        self, model_output: Array, step_index: int, sample: Array, noise: Array | None = None
    ) -> SamplerOutput:
        """Correct x at σ_i (UniC), then predict x at σ_{i+1} (UniP); ``noise`` is not used."""
        self._check_next_step(step_index)
        i = step_index
        x0 = vp_x0(model_output, sample, float(self.sigmas[i]), self.config.prediction_type)
        if self._last is not None and i - 1 not in self.config.disable_corrector:
            last_sample, order = self._last
            sample = self._correct(last_sample, x0, i, order)
        self._x0s = [*self._x0s[-1:], x0]
        order = self.config.solver_order
        if self.config.lower_order_final:
            order = min(order, len(self.timesteps) - i)
        order = min(order, len(self._x0s))  # warm-up: as many x̂0 as there are
        self._last = (sample, order)
        prev_sample = self._predict(sample, i, order)
        self._next_step += 1
        return SamplerOutput(prev_sample=prev_sample, denoised=x0)

    def _coefficients(self, s: int, t: int) -> tuple[float, float, float, float, float]:
        """(α_t, σ_t/σ_s, h, φ = e^−h − 1, B = φ) from σ index s to σ index t."""
        sigma_s, sigma_t = float(self.sigmas[s]), float(self.sigmas[t])
        alpha_t, vp_sigma_t = vp_alpha_sigma(sigma_t)
        _, vp_sigma_s = vp_alpha_sigma(sigma_s)
        h = half_log_snr(sigma_t) - half_log_snr(sigma_s)
        phi = math.expm1(-h)
        return alpha_t, vp_sigma_t / vp_sigma_s, h, phi, phi

    def _ratio(self, older: int, s: int, h: float) -> float:
        """r = (λ_older − λ_s)/h: where the older x̂0 sits, in units of this step."""
        lambda_s = half_log_snr(float(self.sigmas[s]))
        return (half_log_snr(float(self.sigmas[older])) - lambda_s) / h

    def _predict(self, sample: Array, i: int, order: int) -> Array:
        """UniP-p from σ_i to σ_{i+1} with the newest `order` x̂0."""
        m0 = self._x0s[-1]
        if float(self.sigmas[i + 1]) == 0.0:
            return m0  # h = ∞, φ = −1: a first-order step to σ = 0 lands on x̂0
        alpha_t, ratio, h, phi, b_h = self._coefficients(i, i + 1)
        if h == 0.0:
            return ratio * sample  # a Karras "sigma_min" end, σ_min to itself: φ = B = 0
        out = ratio * sample - (alpha_t * phi) * m0
        if order == 2:
            d1 = (self._x0s[-2] - m0) / self._ratio(i - 1, i, h)
            out = out - (alpha_t * b_h) * (0.5 * d1)
        return out

    def _correct(self, last_sample: Array, x0: Array, i: int, order: int) -> Array:
        """UniC-p: redo the step σ_{i−1} → σ_i from `last_sample`, with the new x̂0 `x0`."""
        m0 = self._x0s[-1]
        alpha_t, ratio, h, phi, b_h = self._coefficients(i - 1, i)
        out = ratio * last_sample - (alpha_t * phi) * m0
        if order == 1:
            return out - (alpha_t * b_h) * (0.5 * (x0 - m0))
        hh = -h
        phi_1 = phi / hh - 1.0
        phi_2 = phi_1 / hh - 0.5
        b1, b2 = phi_1 / b_h, phi_2 * 2.0 / b_h
        r = self._ratio(i - 2, i - 1, h)
        rho_1 = (b1 - b2) / (1.0 - r)
        rho_c = b1 - rho_1
        d1 = (self._x0s[-2] - m0) / r
        return out - (alpha_t * b_h) * (rho_1 * d1 + rho_c * (x0 - m0))
