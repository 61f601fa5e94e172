"""fewstep's PNDM/PLMS, Heun, DPM-Solver++ (2M, 2M SDE) and UniPC samplers, and the Karras
schedules of Euler and Euler-ancestral, against diffusers' schedulers of the same names.

For each of our names (`CASES`: the diffusers class and the config keys the name fixes),
every timestep spacing and both prediction types, over whole trajectories of random model
outputs for the step counts `STEP_COUNTS` (1–50, including DPM-Solver's lower-order-final
threshold 15):

- timesteps: integer ones exactly equal; the fractional ones of Karras schedules (Euler,
  Heun) within 1e-4 of a train step, since diffusers finds them from float32 log σ;
- σ tables: within 2 float32 ulps relative (diffusers builds them in float32);
- float64, exact: diffusers is given fewstep's float64 tables (ᾱ, σ) and computes in float64.
  Its Euler-type and DPM-Solver steps cast the sample with `sample.to(torch.float32)` (an
  upcast meant for fp16); `_float64_module` hands the scheduler's module a `torch` whose
  `float32` is float64, so nothing is rounded to float32. Every step's model input, output
  and x0 estimate then agree within `EXACT` (1e-10) times max(1, the largest value so far),
  measured <= 2e-13 (values up to ~60) over the grid;
- float32 bound: diffusers as it ships (float32 tables and coefficients) against fewstep's
  float64 run, each step from the same float32-representable state: within `FLOAT32_BOUND`
  (3e-5) relative to the step's largest value (measured: see there);
- fewstep on float32 torch tensors against its float64 run, held to twice the error of
  diffusers' float32 run against its float64 run (as test_samplers.py does);
- noise: DPM++ 2M SDE gets the test's noise through diffusers' own `variance_noise=`;
  Euler-ancestral through its module's `randn_tensor`, replaced by one that hands it out.

Euler-ancestral has no Karras option in diffusers: its reference is diffusers' ancestral step
on the Karras schedule diffusers' EulerDiscreteScheduler builds for the same config.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.schedulers import scheduling_euler_ancestral_discrete  # noqa: E402

from fewstep.samplers import create_sampler  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
}
SHAPE = (1, 4, 4, 4)
SPACINGS = ("leading", "linspace", "trailing")
PREDICTIONS = ("epsilon", "v_prediction")
STEP_COUNTS = (1, 2, 3, 4, 5, 7, 10, 14, 15, 16, 21, 33, 50)
EXACT = 1e-10
KARRAS = {"use_karras_sigmas": True}
DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2}
SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
# Our name → (diffusers class, what the name fixes in the config).
CASES = {
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": False}),
    "heun": ("HeunDiscreteScheduler", {}),
    "heun_karras": ("HeunDiscreteScheduler", KARRAS),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", DPM),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {**DPM, **KARRAS}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", SDE),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {**SDE, **KARRAS}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
    "unipc_karras": ("UniPCMultistepScheduler", {"solver_order": 2, **KARRAS}),
    "euler_karras": ("EulerDiscreteScheduler", KARRAS),
    "euler_ancestral_karras": ("EulerAncestralDiscreteScheduler", {}),
}
FRACTIONAL_TIMESTEPS = ("heun_karras", "euler_karras", "euler_ancestral_karras")
OTHER_NAMES = {"euler": ("EulerDiscreteScheduler", {})}  # in the extra cases only


def step_counts(name):
    return [n for n in STEP_COUNTS if n >= 4] if name == "pndm" else list(STEP_COUNTS)


def config(spacing, kind, **extra):
    return {**SD_SCHEDULE, "timestep_spacing": spacing, "prediction_type": kind, **extra}


def diffusers_scheduler(name, cfg, n):
    """diffusers' scheduler for our `name`, with its timesteps set for n steps."""
    class_name, fixed = {**CASES, **OTHER_NAMES}[name]
    ref = getattr(diffusers, class_name).from_config({**cfg, **fixed})
    ref.set_timesteps(n)
    if name == "euler_ancestral_karras":
        karras = diffusers.EulerDiscreteScheduler.from_config({**cfg, **KARRAS})
        karras.set_timesteps(n)
        ref.sigmas, ref.timesteps = karras.sigmas, karras.timesteps
    return ref


def pair(name, cfg, n):
    ours = create_sampler(name, cfg)
    ours.set_timesteps(n)
    return ours, diffusers_scheduler(name, cfg, n)


def give_fewstep_tables(ours, ref):
    """diffusers computes from fewstep's float64 ᾱ and σ (checked against its own below)."""
    ref.alphas_cumprod = torch.from_numpy(ours.alphas_cumprod.copy())
    if hasattr(ours, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = torch.tensor(ours.final_alpha_cumprod, dtype=torch.float64)
    if hasattr(ours, "sigmas"):
        ref.sigmas = torch.from_numpy(ours.sigmas.copy())


class _Float64Torch:
    """`torch`, except that `float32` is float64: what a diffusers scheduler module sees in the
    exact comparison, so that its steps' casts to float32 keep float64."""

    float32 = torch.float64

    def __getattr__(self, attribute):
        return getattr(torch, attribute)


def _float64_module(monkeypatch, ref):
    monkeypatch.setattr(sys.modules[type(ref).__module__], "torch", _Float64Torch())


class _NoiseFeed:
    """Stands in for Euler-ancestral's `randn_tensor`, handing out the test's noise."""

    def __init__(self, monkeypatch):
        self.next = None
        monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", self)

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert self.next is not None and tuple(shape) == tuple(self.next.shape)
        noise, self.next = self.next, None
        return noise.to(dtype)


def diffusers_step(name, ref, feed, model_output, t, sample, noise):
    """One diffusers step on the same noise → (prev_sample, x0 estimate or None)."""
    kwargs = {}
    if name.startswith("dpmpp_2m_sde"):
        kwargs["variance_noise"] = noise
    if name.startswith("euler_ancestral"):
        feed.next = noise
    out = ref.step(model_output, t, sample, **kwargs)
    if hasattr(out, "pred_original_sample"):
        return out.prev_sample, out.pred_original_sample
    if hasattr(ref, "model_outputs"):  # DPM-Solver and UniPC keep the x0 they step with
        return out.prev_sample, ref.model_outputs[-1]
    return out.prev_sample, None


def pndm_x0(ref, model_output, t, sample, kind):
    """DDIM's predicted x0 at t from the U-Net output (what PNDM's `denoised` is)."""
    alpha = float(ref.alphas_cumprod[int(t)])
    if kind == "epsilon":
        return (sample - math.sqrt(1 - alpha) * model_output) / math.sqrt(alpha)
    return math.sqrt(alpha) * sample - math.sqrt(1 - alpha) * model_output


def draws(seed, calls):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal(SHAPE),
        rng.standard_normal((calls, *SHAPE)),
        rng.standard_normal((calls, *SHAPE)),
    )


def max_abs(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


GRID = [
    pytest.param(name, spacing, kind, id=f"{name}-{spacing}-{kind}")
    for name in CASES
    for spacing in SPACINGS
    for kind in PREDICTIONS
]


# --- schedules -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "spacing", "kind"), GRID)
def test_timesteps_and_sigmas_equal_diffusers(name, spacing, kind):
    for n in step_counts(name):
        ours, ref = pair(name, config(spacing, kind), n)
        expected = ref.timesteps.numpy()
        assert ours.timesteps.dtype == expected.dtype, n
        assert ours.timesteps.shape == expected.shape, n
        if name in FRACTIONAL_TIMESTEPS:
            # 1e-4 of a train step (measured: 6.1e-5, one float32 ulp near t = 1000).
            np.testing.assert_allclose(ours.timesteps, expected, rtol=0, atol=1e-4)
        else:
            np.testing.assert_array_equal(ours.timesteps, expected, err_msg=f"{n} steps")
        if hasattr(ref, "sigmas"):
            sigmas = ref.sigmas.double().numpy()
            np.testing.assert_allclose(ours.sigmas, sigmas, rtol=2.0**-22, atol=0, err_msg=str(n))
        assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=2.0**-22)


@pytest.mark.parametrize("name", ["plms", "pndm", "dpmpp_2m", "unipc"])
def test_trailing_drops_diffusers_spurious_last_timestep(name):
    # np.arange(1000, 0, -1000/61) has a 62nd value ≈ 0 that rounds to timestep −1.
    ours, ref = pair(name, config("trailing", "epsilon"), 61)
    expected = ref.timesteps.numpy()
    assert -1 in expected and -1 not in ours.timesteps
    np.testing.assert_array_equal(ours.timesteps, expected[expected >= 0])


# --- float64 trajectories, exact ---------------------------------------------------------


def assert_exact_trajectory(name, cfg, n, feed, monkeypatch):
    """fewstep's float64 trajectory against diffusers' on fewstep's tables, in float64."""
    with monkeypatch.context() as patch:
        ours, ref = pair(name, cfg, n)
        give_fewstep_tables(ours, ref)
        _float64_module(patch, ref)
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(0)  # see the squaredcos_cap_v2 case below
        calls = len(ours.timesteps)
        x_T, model_outputs, noises = draws(seed=n, calls=calls)
        x = x_T * ours.init_noise_sigma
        x_ref = torch.from_numpy(x.copy())
        assert len(ref.timesteps) == calls
        scale = 1.0
        for i, t in enumerate(ref.timesteps):
            what = f"{n} steps, call {i} (t={float(t)})"
            model_input = ours.scale_model_input(x, i)
            assert max_abs(model_input, ref.scale_model_input(x_ref, t)) <= EXACT * scale, what
            out = ours.step(model_outputs[i], i, x, noise=noises[i])
            prev, x0 = diffusers_step(
                name,
                ref,
                feed,
                torch.from_numpy(model_outputs[i]),
                t,
                x_ref,
                torch.from_numpy(noises[i]),
            )
            if x0 is None:
                x0 = pndm_x0(ref, model_outputs[i], t, x, cfg["prediction_type"])
            assert out.prev_sample.dtype == np.float64
            # Rounding scales with the largest value so far (a multistep history holds it).
            scale = max(scale, float(prev.abs().max()), float(abs(x0).max()))
            assert max_abs(out.prev_sample, prev) <= EXACT * scale, what
            assert max_abs(out.denoised, x0) <= EXACT * scale, what
            x, x_ref = out.prev_sample, prev


@pytest.mark.parametrize(("name", "spacing", "kind"), GRID)
def test_float64_trajectory_matches_diffusers(name, spacing, kind, monkeypatch):
    feed = _NoiseFeed(monkeypatch)
    for n in step_counts(name):
        assert_exact_trajectory(name, config(spacing, kind), n, feed, monkeypatch)


ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
# Config paths beyond the grid: (name, config keys, steps).
EXTRA = [
    ("dpmpp_2m", ZERO_SNR, 8),  # σ_T ≈ 4096, as on the default model's schedule
    ("unipc", ZERO_SNR, 8),
    ("euler_karras", ZERO_SNR, 8),
    ("dpmpp_2m_sde_karras", ZERO_SNR, 8),
    ("euler", {"final_sigmas_type": "sigma_min"}, 6),
    ("dpmpp_2m_karras", {"final_sigmas_type": "sigma_min"}, 20),  # 2nd-order last step
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}, 14),  # 1st: lower_order_final below 15
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "euler_at_final": True}, 20),
    ("unipc_karras", {"final_sigmas_type": "sigma_min"}, 6),  # last step σ_min → σ_min
    ("dpmpp_2m", {"solver_type": "heun"}, 12),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, 12),
    ("dpmpp_2m", {"lambda_min_clipped": -2.5}, 10),
    # Truncated timesteps. diffusers' top one is 998 here, not 999 (found from float32 logs),
    # and it would start at the second of three 998s (dpm_solver.py: deviations).
    ("dpmpp_2m_karras", {"beta_schedule": "squaredcos_cap_v2"}, 10),
    ("unipc", {"disable_corrector": [0, 3]}, 8),
    ("unipc", {"solver_type": "midpoint", "final_sigmas_type": "sigma_min"}, 7),
    ("heun", {"clip_sample": True, "clip_sample_range": 1.5}, 5),
    ("heun_karras", {"prediction_type": "sample"}, 5),
    ("plms", {"set_alpha_to_one": True, "beta_schedule": "linear"}, 7),
    ("pndm", {"steps_offset": 0, "timestep_spacing": "linspace"}, 6),
]


@pytest.mark.parametrize(
    ("name", "extra", "n"),
    [pytest.param(*case, id=f"{case[0]}-{'-'.join(case[1])}-{case[2]}") for case in EXTRA],
)
def test_float64_trajectory_other_configs(name, extra, n, monkeypatch):
    cfg = {**config("leading", "epsilon"), **extra}
    assert_exact_trajectory(name, cfg, n, _NoiseFeed(monkeypatch), monkeypatch)


def test_dpmpp_order_one_matches_diffusers(monkeypatch):
    # A package's DPMSolverMultistepScheduler config may ask for first order throughout.
    cfg = {**config("trailing", "v_prediction"), "solver_order": 1}
    ours = create_sampler("DPMSolverMultistepScheduler", cfg)
    ours.set_timesteps(6)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    ref.set_timesteps(6)
    give_fewstep_tables(ours, ref)
    _float64_module(monkeypatch, ref)
    x = np.random.default_rng(1).standard_normal(SHAPE)
    x_ref = torch.from_numpy(x.copy())
    for i, t in enumerate(ref.timesteps):
        model_output = np.full(SHAPE, 0.1 * i)
        x = ours.step(model_output, i, x).prev_sample
        x_ref = ref.step(torch.from_numpy(model_output), t, x_ref).prev_sample
        assert max_abs(x, x_ref) <= EXACT


# --- against diffusers as it ships: float32 tables and coefficients ---------------------

# Measured over this file's grid and STEP_COUNTS: max |fewstep float64 − diffusers float32
# step| / max(1, largest value of the step) = 1.0e-5 for Heun, <= 3.2e-6 for the others
# (UniPC), <= 1e-6 for most. Heun's worst: diffusers forms x − (x − σ·ε) in float32 and divides
# by σ = 0.03 at the lowest level, where the random model outputs leave |x| ≈ 44. Elsewhere it
# is diffusers' float32 σ table (2 ulps) and its λ = log α − log σ in float32, whose
# difference h carries an absolute error of ~1e-7·|λ|.
FLOAT32_BOUND = 3e-5


@pytest.mark.parametrize(("name", "spacing", "kind"), GRID)
def test_float64_steps_within_float32_bound_of_stock_diffusers(name, spacing, kind, monkeypatch):
    feed = _NoiseFeed(monkeypatch)
    for n in (1, 4, 15, 50) if name != "pndm" else (4, 15, 50):
        ours, ref = pair(name, config(spacing, kind), n)
        x_T, model_outputs, noises = draws(seed=50 + n, calls=len(ours.timesteps))
        x = x_T * ours.init_noise_sigma
        for i, t in enumerate(ref.timesteps):
            f32 = [torch.from_numpy(a.astype(np.float32)) for a in (model_outputs[i], x, noises[i])]
            # The float32-representable state both start from, so only the step differs.
            x = f32[1].double().numpy()
            out = ours.step(f32[0].double().numpy(), i, x, noise=f32[2].double().numpy())
            prev, _ = diffusers_step(name, ref, feed, f32[0], t, f32[1], f32[2])
            scale = max(1.0, float(np.abs(out.prev_sample).max()), float(np.abs(x).max()))
            assert max_abs(out.prev_sample, prev) <= FLOAT32_BOUND * scale, (n, i)
            x = out.prev_sample


# --- fewstep on float32 torch tensors ----------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_float32_torch_path(name, monkeypatch):
    """Each step from the float64 trajectory's state (histories as each run built them):
    fewstep's float32 step against its float64 step, held to twice diffusers' float32 step
    against its own float64 step, plus one float32 ulp of the largest value."""
    feed = _NoiseFeed(monkeypatch)
    kind = "v_prediction" if name.endswith("karras") else "epsilon"
    cfg = config("leading" if name.startswith("pndm") else "trailing", kind)
    n = 20
    ours64, ref64 = pair(name, cfg, n)
    ours32, ref32 = pair(name, cfg, n)
    ref64.alphas_cumprod = ref64.alphas_cumprod.double()  # diffusers' own tables, in float64
    if hasattr(ref64, "final_alpha_cumprod"):
        ref64.final_alpha_cumprod = ref64.final_alpha_cumprod.double()
    if hasattr(ref64, "sigmas"):
        ref64.sigmas = ref64.sigmas.double()
    _float64_module(monkeypatch, ref64)
    x_T, model_outputs, noises = draws(seed=5, calls=len(ours64.timesteps))

    def f32(a):
        return torch.from_numpy(np.asarray(a, dtype=np.float32))

    err_ours = err_torch = largest = 0.0
    x = x_T * ours64.init_noise_sigma
    for i, t in enumerate(ref64.timesteps):
        expected = ours64.step(model_outputs[i], i, x, noise=noises[i])
        got = ours32.step(f32(model_outputs[i]), i, f32(x), noise=f32(noises[i]))
        assert got.prev_sample.dtype == got.denoised.dtype == torch.float32
        err_ours = max(err_ours, max_abs(got.prev_sample, expected.prev_sample))
        largest = max(largest, float(np.abs(expected.prev_sample).max()))
        args64 = (torch.from_numpy(model_outputs[i]), t, torch.from_numpy(x))
        step64, _ = diffusers_step(name, ref64, feed, *args64, torch.from_numpy(noises[i]))
        t32 = ref32.timesteps[i]
        step32, _ = diffusers_step(
            name, ref32, feed, f32(model_outputs[i]), t32, f32(x), f32(noises[i])
        )
        err_torch = max(err_torch, max_abs(step32, step64))
        x = expected.prev_sample
    floor = 2.0**-23 * largest
    assert err_ours <= 2 * err_torch + floor, (err_ours, err_torch, floor)
