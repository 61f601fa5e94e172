"""PNDM and PLMS samplers: Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models
on Manifolds" (PNDM).

Every step moves x_t to x_{t−δ} by the transfer part φ of PNDM eq. 9 (the DDIM update
written for ε), driven by an ε that combines several U-Net outputs:
- PLMS (eq. 12, a linear multistep method): (55ε_t − 59ε_{t+δ} + 37ε_{t+2δ} − 9ε_{t+3δ})/24
  once four outputs are known; lower orders (ε, (3ε − ε')/2, (23ε − 16ε' + 5ε'')/12) before.
- PRK warm-up (eq. 13, a Runge-Kutta method): the first three steps take four U-Net calls
  each, at t, twice at the midpoint t − δ/2, and at t − δ, weighted 1/6, 1/3, 1/3, 1/6.
With ``skip_prk_steps`` (SD 1.x's configs, and the "plms" name) the warm-up is skipped and
the first step is the pseudo improved Euler step of Stable Diffusion's original PLMS
sampler: an Euler step, a second U-Net call at its result, and the step again from the start
with the mean of both outputs.

Follows diffusers `src/diffusers/schedulers/scheduling_pndm.py` (0.42: ``set_timesteps``,
``step_prk``, ``step_plms``, ``_get_prev_sample``) and matches it to float64 precision on
random inputs. ``timesteps`` hold one entry per U-Net call: n + 1 with ``skip_prk_steps``
(the second timestep twice), n + 9 without (12 PRK calls, then n − 3 PLMS steps); δ is
T // n throughout, as in diffusers, whatever the spacing.

Deviations and limits:
- ``prediction_type`` is epsilon or v_prediction (diffusers raises for "sample" at the first
  step; here the constructor raises NotImplementedError).
- The PRK warm-up needs num_inference_steps >= 4 (diffusers fails with a shape error below);
  "trailing" takes n timesteps (see fewstep.samplers.base.spaced_timesteps).
- diffusers returns no x0 estimate; ``denoised`` here is the x0 that this call's own U-Net
  output predicts at its timestep (DDIM eq. 12's "predicted x0").
- img2img (``skip_steps``) starts the method afresh at the first kept timestep, where
  diffusers' img2img pipelines misalign it (see ``skip_steps``).
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

PRK_STEPS = 3  # Runge-Kutta steps before PLMS takes over, 4 U-Net calls each
PRK_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)  # classic RK4


class PNDMSampler(Sampler):
    family = "pndm"
    label = "PNDM"

    def __init__(self, config: SchedulerConfig | Mapping[str, Any]) -> None:
        super().__init__(config)
        if self.config.prediction_type not in ("epsilon", "v_prediction"):
            raise NotImplementedError(
                "prediction_type must be 'epsilon' or 'v_prediction' for PNDM, got "
                f"{self.config.prediction_type!r}"
            )
        # ᾱ "before" the first train step, used when t − δ < 0.
        self.final_alpha_cumprod = (
            1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])
        )
        self._reset()

    @property
    def name(self) -> str:
        return "plms" if self.config.skip_prk_steps else "pndm"

    def _reset(self) -> None:
        self._outputs: list[Array] = []  # ε_t, ε_{t+δ}, …: one per PLMS/PRK step (newest last)
        self._start: Array | None = None  # x at the start of the current two-call step
        self._prk_sum: Array | float = 0.0  # PRK: the weighted outputs of this step so far
        self._next_step = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = num_inference_steps
        T = self.config.num_train_timesteps
        minimum = 1 if self.config.skip_prk_steps else PRK_STEPS + 1
        if not minimum <= n <= T:
            raise ValueError(
                f"num_inference_steps must be between {minimum} and {T} for {self.label}"
                f"{'' if self.config.skip_prk_steps else ' with its PRK warm-up'}, got {n}"
            )
        ascending = np.round(spaced_timesteps(self.config, n)).astype(np.int64)[::-1]
        check_timestep_range(self.config, ascending, n)
        self.step_ratio = T // n  # δ
        self._ascending = ascending
        self._set_calls(ascending)
        self.num_inference_steps = n
        self.begin_index = 0
        self._reset()

    def _set_calls(self, ascending: np.ndarray) -> None:
        """The U-Net calls of a run over the `ascending` timesteps, from the top one."""
        if self.config.skip_prk_steps:
            # PLMS from the top; the second timestep comes twice (pseudo improved Euler).
            calls = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
            self.prk_calls = 0
        else:
            # RK4 over the top three intervals: each step at t, the midpoint twice, t − δ.
            tops = ascending[-(PRK_STEPS + 1) :].repeat(2)
            tops = tops + np.tile([0, self.step_ratio // 2], PRK_STEPS + 1)
            prk = tops[:-1].repeat(2)[1:-1][::-1]
            calls = np.concatenate([prk, ascending[:-PRK_STEPS][::-1]])
            self.prk_calls = len(prk)
        self.timesteps = calls.astype(np.int64)

    def skip_steps(self, steps: int) -> None:
        """Begin `steps` steps in (img2img): the run starts afresh at the first kept
        timestep, with the pseudo improved Euler step (PLMS) or the PRK warm-up over the top
        kept steps, δ still T // n; ``timesteps`` become the kept run's calls.

        Deviation: diffusers' PNDMScheduler has no begin index, and its img2img pipelines
        feed it the tail of the full call list, which its call counter misreads: the PLMS
        start's second call lands one level off (or, for steps >= 2, every later step is
        labelled one level lower than its sample), and the PRK warm-up ignores the skip.
        """
        if not 0 <= steps < self.num_inference_steps:
            raise ValueError(
                f"steps must be between 0 and {self.num_inference_steps - 1}, got {steps}"
            )
        kept = self._ascending[: len(self._ascending) - steps]
        if not self.config.skip_prk_steps and len(kept) < PRK_STEPS + 1:
            raise ValueError(
                f"{self.label} with its PRK warm-up needs at least {PRK_STEPS + 1} steps to run, "
                f"got {len(kept)} (img2img runs int(num_inference_steps × strength)): raise "
                "num_inference_steps or strength, or use 'plms'"
            )
        self._set_calls(kept)
        self.begin_index = 0
        self._reset()

    def step(
        self, model_output: Array, step_index: int, sample: Array, noise: Array | None = None
    ) -> SamplerOutput:
        """One U-Net call's update (PRK or PLMS); ``noise`` is not used."""
        self._check_next_step(step_index)
        t = int(self.timesteps[step_index])
        denoised = self._x0(model_output, sample, t)
        if step_index < self.prk_calls:
            prev_sample = self._prk_step(model_output, step_index, sample, t)
        else:
            prev_sample = self._plms_step(model_output, step_index, sample, t)
        self._next_step += 1
        return SamplerOutput(prev_sample=prev_sample, denoised=denoised)

    def _prk_step(self, model_output: Array, call: int, sample: Array, t: int) -> Array:
        """Call `call` of the PRK warm-up: 4 per RK4 step, each a φ from the step's start."""
        stage = call % 4
        # φ is evaluated from the step's start at the step's top timestep, to the midpoint
        # (stages 0, 1) or to the end (stages 2, 3).
        top = int(self.timesteps[call - stage])
        to = t - self.step_ratio // 2 if stage % 2 == 0 else t
        if stage == 0:
            self._start = sample
            self._outputs.append(model_output)
        if stage < 3:
            self._prk_sum = self._prk_sum + PRK_WEIGHTS[stage] * model_output
            combined = model_output
        else:
            combined = self._prk_sum + PRK_WEIGHTS[3] * model_output
            self._prk_sum = 0.0
        return self._transfer(self._start, top, to, combined)

    def _plms_step(self, model_output: Array, call: int, sample: Array, t: int) -> Array:
        """Linear multistep on the last outputs (PNDM eq. 12), with the pseudo improved
        Euler start when the warm-up is skipped."""
        to = t - self.step_ratio
        if call == 1 and self.config.skip_prk_steps:
            # Second call of the first step: at the Euler step's result, but the step is
            # redone from the start with the mean of both outputs.
            combined = (model_output + self._outputs[-1]) / 2
            sample, self._start = self._start, None
            return self._transfer(sample, t + self.step_ratio, t, combined)
        self._outputs = [*self._outputs[-3:], model_output]
        e = self._outputs[::-1]  # newest first
        if len(e) == 1:
            self._start = sample
            combined = e[0]
        elif len(e) == 2:
            combined = (3 * e[0] - e[1]) / 2
        elif len(e) == 3:
            combined = (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
        else:
            combined = (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])
        return self._transfer(sample, t, to, combined)

    def _alpha_cumprod(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def _transfer(self, sample: Array, t: int, to: int, model_output: Array) -> Array:
        """φ(x_t, ε, t, t − δ), PNDM eq. 9, with `model_output` converted to ε (v: ε =
        √ᾱ·v + √(1−ᾱ)·x). Written as x·√(ᾱ'/ᾱ) − (ᾱ' − ᾱ)·ε/(ᾱ·√(1−ᾱ') + √(ᾱ(1−ᾱ)ᾱ'))."""
        alpha, alpha_to = self._alpha_cumprod(t), self._alpha_cumprod(to)
        eps = model_output
        if self.config.prediction_type == "v_prediction":
            eps = math.sqrt(alpha) * model_output + math.sqrt(1.0 - alpha) * sample
        denominator = alpha * math.sqrt(1.0 - alpha_to) + math.sqrt(
            alpha * (1.0 - alpha) * alpha_to
        )
        return math.sqrt(alpha_to / alpha) * sample - ((alpha_to - alpha) / denominator) * eps

    def _x0(self, model_output: Array, sample: Array, t: int) -> Array:
        x0, _, _ = self._x0_from_model_output(model_output, sample, self._alpha_cumprod(t))
        return x0
