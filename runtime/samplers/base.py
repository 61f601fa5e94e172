"""Shared pieces of fewstep's samplers: config, noise schedule, step output, base class.

Follows diffusers `src/diffusers/schedulers/scheduling_ddim.py` (``__init__``:
beta schedules and ``alphas_cumprod``; ``rescale_zero_terminal_snr``) and
``configuration_utils.ConfigMixin.from_config`` (field names and defaults: each
diffusers class reads only the keys its ``__init__`` takes, ``CLASS_KEYS``).
Pure numpy: no torch or diffusers import, so the lean runtime can sample.

The noise schedule is the *float32* one diffusers builds (and that training
scripts built with the same code): betas as ``torch.linspace(...,
dtype=float32)`` computes them on the CPU, ``1 - beta`` in float32, and a
cumulative product accumulated in float64 and rounded to float32 per element
(what ``torch.cumprod`` does on the CPU). The values are then held in float64
and every coefficient derived from them is computed in float64. Computing the
betas in float64 instead moves ᾱ by up to ~1e-6 relative, which moves the
predicted x0 at t = 999 by ~1e-5: enough to lose exactness against
diffusers for no gain in quality.

Deviations and limits:
- ``thresholding=True`` (dynamic thresholding), exponential, beta, λ-uniform
  and flow sigmas, dynamic shifting, ``interpolation_type="log_linear"``,
  continuous timesteps, learned variances and UniPC's ``predict_x0=False``
  raise NotImplementedError naming the field.
- The betas reproduce torch's CPU linspace (each value computed from the
  nearer end as one fused multiply-add). Our sum is formed in float64 and
  rounded once more to float32; that is exact whenever the sum fits in
  float64's 53 bits, which holds for every practical schedule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, TypeAlias

import numpy as np

# A numpy array or a torch tensor: samplers touch them only through `*`, `+`,
# `-`, `/` with python floats (and `.clip` for clip_sample), which both support
# and which preserve the array's dtype and device.
Array: TypeAlias = Any

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# A schedule's arrays are O(T): bound T so a config cannot ask for gigabytes.
MAX_TRAIN_TIMESTEPS = 100_000


class SamplerOutput(NamedTuple):
    prev_sample: Array  # x_{t-1}: the next step's input   [B, C, H, W]
    denoised: Array  # the model's current estimate of x0   [B, C, H, W]


# The keys each diffusers class's __init__ takes (diffusers 0.42), by our sampler family;
# ``from_dict`` ignores the others, as ``from_config`` does.
_COMMON_KEYS = frozenset(
    {
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "prediction_type",
        "timestep_spacing",
        "steps_offset",
    }
)
_OTHER_SIGMAS = frozenset({"use_exponential_sigmas", "use_beta_sigmas"})
CLASS_KEYS: dict[str, frozenset[str]] = {
    "ddim": _COMMON_KEYS
    | {
        "set_alpha_to_one",
        "clip_sample",
        "clip_sample_range",
        "thresholding",
        "rescale_betas_zero_snr",
    },
    "pndm": _COMMON_KEYS | {"set_alpha_to_one", "skip_prk_steps"},
    "lcm": _COMMON_KEYS
    | {
        "set_alpha_to_one",
        "clip_sample",
        "clip_sample_range",
        "thresholding",
        "rescale_betas_zero_snr",
        "original_inference_steps",
        "timestep_scaling",
    },
    "euler": _COMMON_KEYS
    | _OTHER_SIGMAS
    | {
        "interpolation_type",
        "use_karras_sigmas",
        "sigma_min",
        "sigma_max",
        "timestep_type",
        "rescale_betas_zero_snr",
        "final_sigmas_type",
    },
    "euler_ancestral": _COMMON_KEYS | {"rescale_betas_zero_snr"},
    "heun": _COMMON_KEYS
    | _OTHER_SIGMAS
    | {"use_karras_sigmas", "clip_sample", "clip_sample_range"},
    "dpmpp_2m": _COMMON_KEYS
    | _OTHER_SIGMAS
    | {
        "solver_order",
        "thresholding",
        "algorithm_type",
        "solver_type",
        "lower_order_final",
        "euler_at_final",
        "use_karras_sigmas",
        "use_lu_lambdas",
        "use_flow_sigmas",
        "final_sigmas_type",
        "lambda_min_clipped",
        "variance_type",
        "rescale_betas_zero_snr",
        "use_dynamic_shifting",
    },
    "unipc": _COMMON_KEYS
    | _OTHER_SIGMAS
    | {
        "solver_order",
        "thresholding",
        "predict_x0",
        "solver_type",
        "lower_order_final",
        "disable_corrector",
        "use_karras_sigmas",
        "use_flow_sigmas",
        "final_sigmas_type",
        "rescale_betas_zero_snr",
        "use_dynamic_shifting",
        "sigma_min",
        "sigma_max",
    },
}
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@dataclass(frozen=True)
class SchedulerConfig:
    """A diffusers ``scheduler_config.json`` with diffusers' field names.

    Defaults are ``DDIMScheduler``'s; ``from_dict(..., sampler=...)`` reads the
    keys and applies the defaults of the diffusers class that the sampler
    stands for, so a partial dict means what it means to diffusers' ``from_config``.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    rescale_betas_zero_snr: bool = False
    # LCM
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    # PNDM
    skip_prk_steps: bool = False
    # Euler, Heun, DPM-Solver, UniPC: σ schedules
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    use_dynamic_shifting: bool = False
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"
    sigma_min: float | None = None
    sigma_max: float | None = None
    # DPM-Solver and UniPC: multistep solvers
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    predict_x0: bool = True
    disable_corrector: tuple[int, ...] = ()

    # Defaults of the diffusers classes, where they differ from DDIMScheduler's.
    CLASS_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "ddim": {},
        "pndm": {"set_alpha_to_one": False},
        "lcm": {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
        },
        "euler": {"timestep_spacing": "linspace"},
        "euler_ancestral": {"timestep_spacing": "linspace"},
        "heun": {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "clip_sample": False,
            "timestep_spacing": "linspace",
        },
        "dpmpp_2m": {"timestep_spacing": "linspace"},
        "unipc": {"timestep_spacing": "linspace", "solver_type": "bh2"},
    }

    def __post_init__(self) -> None:
        if not 1 <= self.num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
            raise ValueError(
                f"num_train_timesteps must be between 1 and {MAX_TRAIN_TIMESTEPS}, "
                f"got {self.num_train_timesteps}"
            )
        for field in ("beta_start", "beta_end"):
            value = getattr(self, field)
            if not (math.isfinite(value) and 0 < value < 1):
                raise ValueError(f"{field} must be between 0 and 1 (exclusive), got {value!r}")
        if not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ValueError(
                f"steps_offset must be between 0 and num_train_timesteps - 1, "
                f"got {self.steps_offset}"
            )
        for field in ("original_inference_steps", "solver_order"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        for field in ("clip_sample_range", "timestep_scaling", "sigma_min", "sigma_max"):
            value = getattr(self, field)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{field} must be a finite number > 0, got {value!r}")
        low, high = self.sigma_min, self.sigma_max
        if low is not None and high is not None and not low < high:
            raise ValueError(f"sigma_min must be below sigma_max, got {low} and {high}")
        if math.isnan(self.lambda_min_clipped):
            raise ValueError("lambda_min_clipped must be a number or -inf, got nan")
        if self.trained_betas is not None:
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError(
                    f"trained_betas must have num_train_timesteps={self.num_train_timesteps} "
                    f"values, got {len(self.trained_betas)}"
                )
        elif self.beta_schedule not in BETA_SCHEDULES:
            raise NotImplementedError(
                f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise NotImplementedError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise NotImplementedError(
                f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, "
                f"got {self.timestep_spacing!r}"
            )
        if self.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise NotImplementedError(
                f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, "
                f"got {self.final_sigmas_type!r}"
            )
        unsupported = {
            "thresholding": (self.thresholding, False),
            "use_exponential_sigmas": (self.use_exponential_sigmas, False),
            "use_beta_sigmas": (self.use_beta_sigmas, False),
            "use_lu_lambdas": (self.use_lu_lambdas, False),
            "use_flow_sigmas": (self.use_flow_sigmas, False),
            "use_dynamic_shifting": (self.use_dynamic_shifting, False),
            "interpolation_type": (self.interpolation_type, "linear"),
            "timestep_type": (self.timestep_type, "discrete"),
            "variance_type": (self.variance_type, None),
            "predict_x0": (self.predict_x0, True),
        }
        for field, (value, supported) in unsupported.items():
            if value != supported:
                raise NotImplementedError(
                    f"{field}={value!r} is not implemented (only {supported!r})"
                )

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], sampler: str = "ddim") -> SchedulerConfig:
        """Build from a diffusers scheduler config dict, as the diffusers class of
        `sampler` (a key of ``CLASS_DEFAULTS``) reads it: its own keys, its defaults for
        the absent ones; other keys are ignored. A null flag is False, as it is to
        diffusers; a null number or string is an error.
        """
        if sampler not in cls.CLASS_DEFAULTS:
            raise ValueError(f"sampler must be one of {tuple(cls.CLASS_DEFAULTS)}, got {sampler!r}")
        values: dict[str, Any] = dict(cls.CLASS_DEFAULTS[sampler])
        keys = CLASS_KEYS[sampler]
        for field in dataclasses.fields(cls):
            if field.name not in config or field.name not in keys:
                continue
            value = config[field.name]
            if value is None:
                if isinstance(field.default, bool):
                    values[field.name] = False
                elif field.default is not None:
                    raise ValueError(f"{field.name} must not be null")
                continue
            values[field.name] = _field_value(field.name, field.default, value)
        return cls(**values)


def _field_value(name: str, default: Any, value: Any) -> Any:
    """A config value as the type of its field's default; ValueError naming the field."""
    if isinstance(default, bool):
        return bool(value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "trained_betas":
        if not isinstance(value, list) or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in value
        ):
            raise ValueError(f"trained_betas must be a list of numbers, got {value!r:.80}")
        return tuple(float(b) for b in value)
    if name == "disable_corrector":
        if not isinstance(value, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in value
        ):
            raise ValueError(f"disable_corrector must be a list of integers, got {value!r:.80}")
        return tuple(value)
    if isinstance(default, int):
        if not number or not math.isfinite(value) or value != int(value):
            raise ValueError(f"{name} must be an integer, got {value!r:.80}")
        return int(value)
    if isinstance(default, float) or name in ("sigma_min", "sigma_max"):
        if not number:
            raise ValueError(f"{name} must be a number, got {value!r:.80}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r:.80}")
    return value


def _torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` as computed on the CPU.

    torch rounds the ends and the step to float32, then computes the first half
    as ``start + step·i`` and the second half as ``end − step·(steps−1−i)``,
    each a fused multiply-add (one rounding). ``step·i`` is exact in float64.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = float(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    from_start = float(start32) + step * i
    from_end = float(end32) - step * (steps - 1 - i)
    return np.where(i < steps // 2, from_start, from_end).astype(np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """squaredcos_cap_v2: Nichol & Dhariwal 2021, "Improved DDPM", eq. 17 (s = 0.008)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float32)


def _cumprod_float32(alphas: np.ndarray) -> np.ndarray:
    # torch.cumprod on the CPU accumulates float32 in float64, rounding each output.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", Algorithm 1: shift and scale √ᾱ so that √ᾱ_T = 0 and √ᾱ_0 is kept.
    In float32 like diffusers."""
    sqrt_ab = np.sqrt(_cumprod_float32(np.float32(1.0) - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab * sqrt_ab
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def betas_float32(config: SchedulerConfig) -> np.ndarray:
    """The betas β_1..β_T, float32, exactly as diffusers builds them."""
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.array(config.trained_betas, dtype=np.float32)
    elif config.beta_schedule == "linear":
        betas = _torch_linspace_float32(config.beta_start, config.beta_end, T)
    elif config.beta_schedule == "scaled_linear":
        # Linear in √β (the schedule Stable Diffusion was trained with).
        sqrt_betas = _torch_linspace_float32(config.beta_start**0.5, config.beta_end**0.5, T)
        betas = sqrt_betas * sqrt_betas
    else:
        betas = _cosine_betas(T)
    if not (np.isfinite(betas).all() and (betas > 0).all() and (betas < 1).all()):
        raise ValueError(
            "every beta must be between 0 and 1 (exclusive); trained_betas, or beta_start and "
            f"beta_end of the {config.beta_schedule!r} schedule, give {betas.min()}..{betas.max()}"
        )
    if config.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """ᾱ_t = Π_{s≤t} (1 − β_s) for t = 0..T−1: float64 array of diffusers' float32 values."""
    return _cumprod_float32(np.float32(1.0) - betas_float32(config)).astype(np.float64)


def spaced_timesteps(config: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """The descending inference timesteps of `timestep_spacing`, float64, unrounded.

    Lin et al. 2023, Table 2: "linspace" (evenly spaced including both ends;
    fractional), "leading" (multiples of T//n, plus steps_offset), "trailing"
    (evenly spaced from T down, minus 1: starts at the last train step).
    Trailing uses n terms of diffusers' ``arange(T, 0, -T/n)``; diffusers' own
    arange yields a spurious (n+1)-th timestep −1 for some n (61, 103, …).
    """
    T, n = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if config.timestep_spacing == "leading":
        return (np.arange(n) * (T // n))[::-1].astype(np.float64) + config.steps_offset
    return np.round(T - np.arange(n) * (T / n)) - 1


def multistep_timesteps(config: SchedulerConfig, num_inference_steps: int, last: int) -> np.ndarray:
    """The descending integer timesteps of DPM-Solver and UniPC, int64.

    diffusers spaces n + 1 points over [0, last) and drops the lowest ("linspace",
    "leading"), so the last step starts above t = 0; "trailing" steps down from `last`
    by T/n. `last` is T, or fewer where DPM-Solver's ``lambda_min_clipped`` cuts the
    noisiest train steps (then "trailing" can give fewer than n timesteps, as in
    diffusers). Trailing values below 0 (diffusers' spurious −1, see
    ``spaced_timesteps``) are dropped.
    """
    n = num_inference_steps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        leading = (np.arange(n + 1) * (last // (n + 1)))[::-1][:-1]
        return leading.astype(np.int64) + config.steps_offset
    trailing = np.arange(last, 0, -config.num_train_timesteps / n).round().astype(np.int64) - 1
    return trailing[trailing >= 0]


def check_timestep_range(config: SchedulerConfig, timesteps: np.ndarray, n: int) -> None:
    """ValueError when a schedule leaves 0..T−1 (a "leading" schedule that ``steps_offset``
    pushes past T − 1, say); diffusers fails later with an IndexError or reads ᾱ[−1]."""
    T = config.num_train_timesteps
    if timesteps.min() < 0 or timesteps.max() >= T:
        raise ValueError(
            f"num_inference_steps={n} with timestep_spacing={config.timestep_spacing!r} and "
            f"steps_offset={config.steps_offset} gives timesteps {timesteps.max()}.."
            f"{timesteps.min()}, outside 0..{T - 1}"
        )


def check_strength(strength: float) -> float:
    """img2img's `strength`, the share of the schedule that runs: 0 < strength <= 1."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return float(strength)


class Sampler:
    """What every sampler offers; one instance per generation (it holds the schedule, and a
    multistep sampler the history of its steps).

    ``set_timesteps(n)`` first, then for each ``step_index`` in
    ``range(len(timesteps))``, in order: ``scale_model_input`` → U-Net at
    ``timesteps[step_index]`` → ``step``. ``len(timesteps)`` is the number of U-Net calls:
    n for most samplers, more for some (Heun: 2n − 1, PNDM: n + 1 or n + 9).

    img2img: ``set_img2img_timesteps(n, strength)`` instead, then ``add_noise`` at
    ``begin_index`` and the steps from ``begin_index`` on.
    """

    family: ClassVar[str]  # whose diffusers keys and defaults: a key of CLASS_DEFAULTS
    label: ClassVar[str]  # for messages
    takes_karras: ClassVar[bool] = False  # whether use_karras_sigmas means something here
    config: SchedulerConfig
    alphas_cumprod: np.ndarray  # [T] float64
    timesteps: np.ndarray  # [calls] what the U-Net receives as `timestep`
    num_inference_steps: int
    init_noise_sigma: float = 1.0  # std of the initial latents x_T
    order: ClassVar[int] = 1  # calls per step as diffusers' img2img counts them (Heun: 2)
    begin_index: int = 0  # the call a run begins at: later for img2img (skip_steps)

    def __init__(self, config: SchedulerConfig | Mapping[str, Any]) -> None:
        if not isinstance(config, SchedulerConfig):
            config = SchedulerConfig.from_dict(config, sampler=self.family)
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.num_inference_steps = 0
        self._next_step = 0  # the step_index a multistep sampler takes next

    @property
    def name(self) -> str:
        """The ``scheduler=`` value that makes this sampler (a member of
        fewstep.samplers.SAMPLERS): the family, plus "_karras" with Karras sigmas."""
        karras = self.takes_karras and self.config.use_karras_sigmas
        return self.family + ("_karras" if karras else "")

    @property
    def needs_noise(self) -> bool:
        """Whether ``step`` takes a ``noise`` array (shaped and typed like model_output).

        A step that adds noise raises ValueError without it; a step that adds
        none (e.g. the last one) ignores it.
        """
        return False

    def set_timesteps(self, num_inference_steps: int) -> None:
        raise NotImplementedError

    def set_img2img_timesteps(self, num_inference_steps: int, strength: float) -> None:
        """The schedule of an img2img run that starts from an image noised to `strength`
        (0 < strength <= 1), as diffusers' img2img pipelines build it (``get_timesteps``):
        ``set_timesteps(n)``, then the first t_start = n − min(⌊n·strength⌋, n) steps are
        skipped (``skip_steps``), so ⌊n·strength⌋ steps run. ValueError when none would."""
        check_strength(strength)
        self.set_timesteps(num_inference_steps)
        kept = min(int(num_inference_steps * strength), num_inference_steps)
        if kept < 1:
            enough = math.ceil(1 / strength)
            while int(enough * strength) < 1:  # float rounding: 49 × (1/49) < 1
                enough += 1
            raise ValueError(
                f"num_inference_steps × strength must be at least 1 (img2img runs "
                f"int(num_inference_steps × strength) steps), got {num_inference_steps} × "
                f"{strength} = {num_inference_steps * strength:g}: raise num_inference_steps to "
                f"{enough} or strength to at least 1/{num_inference_steps}"
            )
        self.skip_steps(num_inference_steps - kept)

    def skip_steps(self, steps: int) -> None:
        """Begin the run `steps` steps into the schedule, at call ``steps · order``
        (diffusers' ``set_begin_index``); a sampler that keeps a history starts it afresh
        there, as diffusers' multistep schedulers do."""
        if not 0 <= steps < self.num_inference_steps:
            raise ValueError(
                f"steps must be between 0 and {self.num_inference_steps - 1}, got {steps}"
            )
        self.begin_index = steps * self.order
        self._next_step = self.begin_index

    def add_noise(self, original: Array, noise: Array, step_index: int) -> Array:
        """Clean latents `original` noised to the level of call `step_index` (diffusers'
        ``add_noise`` at ``timesteps[step_index]``): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""
        self._check_step_index(step_index)
        alpha_prod = float(self.alphas_cumprod[int(self.timesteps[step_index])])
        return math.sqrt(alpha_prod) * original + math.sqrt(1.0 - alpha_prod) * noise

    def scale_model_input(self, sample: Array, step_index: int) -> Array:
        self._check_step_index(step_index)
        return sample

    def step(
        self, model_output: Array, step_index: int, sample: Array, noise: Array | None = None
    ) -> SamplerOutput:
        raise NotImplementedError

    def _check_num_inference_steps(self, num_inference_steps: int, maximum: int) -> None:
        if not 1 <= num_inference_steps <= maximum:
            raise ValueError(
                f"num_inference_steps must be between 1 and {maximum} for "
                f"{self.label}, got {num_inference_steps}"
            )

    def _check_step_index(self, step_index: int) -> None:
        if self.num_inference_steps == 0:
            raise RuntimeError("call set_timesteps(num_inference_steps) before stepping")
        if not 0 <= step_index < len(self.timesteps):
            raise ValueError(
                f"step_index must be between 0 and {len(self.timesteps) - 1}, got {step_index}"
            )

    def _check_next_step(self, step_index: int) -> None:
        """For samplers that keep a history of their steps: each step once, in order."""
        self._check_step_index(step_index)
        if step_index != self._next_step:
            raise ValueError(
                f"{self.label} steps in order from 0 (it keeps a history): step_index must be "
                f"{self._next_step} next, got {step_index}"
            )

    def _check_noise(self, noise: Array | None, model_output: Array) -> Array:
        if noise is None:
            raise ValueError(
                f"noise is required at this {self.label} step (needs_noise is True): pass an "
                "array shaped like model_output"
            )
        if tuple(noise.shape) != tuple(model_output.shape) or noise.dtype != model_output.dtype:
            raise ValueError(
                f"noise must match model_output's shape {tuple(model_output.shape)} and dtype "
                f"{model_output.dtype}, got {tuple(noise.shape)} {noise.dtype}"
            )
        return noise

    def _x0_from_model_output(
        self, model_output: Array, sample: Array, alpha_prod_t: float
    ) -> tuple[Array, float, float]:
        """Predicted x0 from the model output, for x_t = √ᾱ·x0 + √(1−ᾱ)·ε.

        Returns (x0, √ᾱ, √(1−ᾱ)). epsilon: x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ (DDIM eq. 12's
        "predicted x0"); v (Salimans & Ho 2022, §4): x0 = √ᾱ·x_t − √(1−ᾱ)·v;
        sample: the output is x0.
        """
        sqrt_alpha = math.sqrt(alpha_prod_t)
        sqrt_beta = math.sqrt(1.0 - alpha_prod_t)
        kind = self.config.prediction_type
        if kind == "epsilon":
            if alpha_prod_t == 0.0:
                raise ValueError(
                    "prediction_type='epsilon' cannot predict x0 where ᾱ_t = 0 (the last train "
                    "step under rescale_betas_zero_snr); such models use 'v_prediction'"
                )
            x0 = (sample - sqrt_beta * model_output) / sqrt_alpha
        elif kind == "v_prediction":
            x0 = sqrt_alpha * sample - sqrt_beta * model_output
        else:
            x0 = model_output
        return x0, sqrt_alpha, sqrt_beta
