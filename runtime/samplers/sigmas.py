"""Noise levels σ of the variance-preserving process, and the schedules built from them.

A VP sample x_t = √ᾱ·x0 + √(1−ᾱ)·ε is, divided by √ᾱ, the sample x0 + σ·ε of noise level
σ = √((1−ᾱ)/ᾱ) (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (EDM), Table 1, VP column). The Euler-type samplers step in σ; the
multistep solvers (DPM-Solver++, UniPC) step in the VP sample, with α_t = 1/√(σ²+1),
σ_t = σ·α_t and the half log-SNR λ = log α_t − log σ_t (Lu et al. 2022, "DPM-Solver", §3.1).

Follows diffusers' ``_sigma_to_t``, ``_convert_to_karras`` and ``_sigma_to_alpha_sigma_t``
(`src/diffusers/schedulers/scheduling_euler_discrete.py`,
`scheduling_dpmsolver_multistep.py`, 0.42), computed in float64: diffusers builds σ and its
logarithm in float32, so a fractional timestep found from σ (Karras schedules) can differ
from diffusers' by ~1e-3 of a train step.
"""

from __future__ import annotations

import math

import numpy as np

from .base import Array, SchedulerConfig

KARRAS_RHO = 7.0  # EDM eq. 5's ρ, "7 for all our experiments"
# What diffusers puts in for ᾱ_T = 0 (zero terminal SNR), so that σ_T stays finite (≈ 4096).
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def train_sigmas(config: SchedulerConfig, alphas_cumprod: np.ndarray) -> np.ndarray:
    """σ_t of each train timestep t = 0..T−1, ascending, float64."""
    alphas_cumprod = alphas_cumprod.copy()
    if config.rescale_betas_zero_snr:
        alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """EDM eq. 5: n levels from σ_max down to σ_min, evenly spaced in σ^(1/ρ)."""
    ramp = np.linspace(0, 1, n)
    low, high = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return (high + ramp * (low - high)) ** KARRAS_RHO


def sigma_to_t(sigmas: np.ndarray, train: np.ndarray) -> np.ndarray:
    """The fractional train timestep of each σ: linear in log σ between the two train
    levels around it (`train`, ascending), clamped to 0..T−1."""
    log_train = np.log(train)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_train, log_sigma, side="right") - 1, 0, len(train) - 2)
    weight = (log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1])
    weight = np.clip(weight, 0.0, 1.0)
    return (1.0 - weight) * low + weight * (low + 1)


def euler_schedule(
    config: SchedulerConfig, train: np.ndarray, spaced: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float32 [n], σ float64 [n + 1]) of the Euler-type samplers, for the n
    `spaced` timesteps (fewstep.samplers.base.spaced_timesteps) and the train σ `train`.

    σ is interpolated linearly in t at the `spaced` timesteps (as float32, what the U-Net
    sees), with the final level appended (0, or the lowest train σ for
    ``final_sigmas_type="sigma_min"``). With ``use_karras_sigmas`` the n levels become
    EDM eq. 5's between the ends of that schedule (or ``sigma_min``/``sigma_max``), and the
    timesteps the fractional ones of those levels.
    """
    timesteps = spaced.astype(np.float32)
    sigmas = np.interp(timesteps.astype(np.float64), np.arange(len(train)), train)
    if config.use_karras_sigmas:
        sigma_min = config.sigma_min if config.sigma_min is not None else float(sigmas[-1])
        sigma_max = config.sigma_max if config.sigma_max is not None else float(sigmas[0])
        sigmas = karras_sigmas(sigma_min, sigma_max, len(spaced))
        timesteps = sigma_to_t(sigmas, train).astype(np.float32)
    return timesteps, np.append(sigmas, final_sigma(config, train))


def final_sigma(config: SchedulerConfig, train: np.ndarray) -> float:
    """The level the last step lands on: 0, or σ of train step 0 ("sigma_min")."""
    return float(train[0]) if config.final_sigmas_type == "sigma_min" else 0.0


def vp_alpha_sigma(sigma: float) -> tuple[float, float]:
    """(α_t, σ_t) of noise level σ: x_t = α_t·x0 + σ_t·ε with α_t² + σ_t² = 1."""
    alpha_t = 1.0 / math.sqrt(sigma**2 + 1.0)
    return alpha_t, sigma * alpha_t


def half_log_snr(sigma: float) -> float:
    """λ = log(α_t/σ_t) = −log σ; +∞ at σ = 0 (the clean end)."""
    return math.inf if sigma == 0.0 else -math.log(sigma)


def vp_x0(model_output: Array, sample: Array, sigma: float, prediction_type: str) -> Array:
    """The data prediction x̂0 from a VP sample at noise level σ (DPM-Solver++ eq. 8's
    x_θ): ε → (x − σ_t·ε)/α_t; v → α_t·x − σ_t·v; sample → the output."""
    alpha_t, sigma_t = vp_alpha_sigma(sigma)
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output
    return model_output
