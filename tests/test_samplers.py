"""fewstep's DDIM, LCM, Euler and Euler-ancestral samplers against the diffusers schedulers
of the same name (the others: test_samplers_diffusers.py; names and configs:
test_samplers_names.py).

Each sampler is compared with ``<DiffusersScheduler>.from_config(same dict)``:

- timesteps: exactly equal, for 1, 2, 4, 8 and 50 steps, every spacing and
  prediction type, on realistic configs;
- the schedule (ᾱ bit for bit; Euler's σ within torch's float32 sqrt error);
- the arithmetic: a float64 trajectory on random inputs with the same noise,
  every step's outputs within 1e-6. diffusers keeps its schedule in float32
  and evaluates its coefficients in float32 (torch's float32 sqrt is 1 ulp
  off on AVX-512 CPUs), which alone moves a 50-step trajectory by ~1e-5; so
  for this comparison diffusers is given fewstep's float64 tables (checked
  against diffusers' own by the schedule tests);
- the float32 path on torch tensors, against our float64 numpy path, with the
  tolerance set by the error that diffusers' own float32 run makes.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import (  # noqa: E402
    scheduling_euler_ancestral_discrete,
    scheduling_lcm,
)

from fewstep.samplers import (  # noqa: E402
    DDIMSampler,
    DPMSolverMultistepSampler,
    EulerAncestralSampler,
    EulerSampler,
    HeunSampler,
    LCMSampler,
    PNDMSampler,
    SchedulerConfig,
    UniPCSampler,
    create_sampler,
    guidance_scale_embedding,
    sampler_name_for,
)

# diffusers' Euler schedulers call np.array() on torch tensors (numpy 2 complains).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SAMPLERS = ("ddim", "lcm", "euler", "euler_ancestral")  # the ones this file compares
SHAPE = (1, 4, 8, 8)  # [B, C, H/8, W/8]: a 64×64 image's latents
STEP_COUNTS = (1, 2, 4, 8, 50)
SPACINGS = ("leading", "trailing", "linspace")

SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
}
# Realistic configs, as the models ship them.
CONFIGS = {
    # SD 1.x, with DDIM swapped in for its PNDM
    "ddim": {**SD_SCHEDULE, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False},
    # LCM-distilled SD 1.5
    "lcm": {**SD_SCHEDULE, "original_inference_steps": 50, "steps_offset": 0},
    # SD-Turbo
    "euler": {**SD_SCHEDULE, "timestep_spacing": "trailing", "steps_offset": 1},
    # SDXL-Turbo
    "euler_ancestral": {**SD_SCHEDULE, "timestep_spacing": "trailing", "steps_offset": 1},
}
DIFFUSERS_CLASSES = {
    "ddim": DDIMScheduler,
    "lcm": LCMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
}
PREDICTION_TYPES = {  # what diffusers supports for each
    "ddim": ("epsilon", "v_prediction", "sample"),
    "lcm": ("epsilon", "v_prediction", "sample"),
    "euler": ("epsilon", "v_prediction", "sample"),
    "euler_ancestral": ("epsilon", "v_prediction"),
}


def _grid(step_counts=STEP_COUNTS):
    """(sampler, spacing, prediction, steps) over everything diffusers supports."""
    return [
        pytest.param(name, spacing, kind, n, id=f"{name}-{spacing}-{kind}-{n}steps")
        for name in SAMPLERS
        for spacing in SPACINGS
        for kind in PREDICTION_TYPES[name]
        for n in step_counts
    ]


def _config(name, spacing=None, kind=None, **extra):
    config = dict(CONFIGS[name], **extra)
    if spacing is not None:
        config["timestep_spacing"] = spacing
    if kind is not None:
        config["prediction_type"] = kind
    return config


def _pair(name, config, n, **options):
    ours = create_sampler(name, config, **options)
    ours.set_timesteps(n)
    ref = DIFFUSERS_CLASSES[name].from_config(config)
    ref.set_timesteps(n)
    return ours, ref


def _assert_close(actual, expected, atol, what):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    err = np.abs(actual - expected)
    if not err.max() <= atol:
        bad = np.argwhere(err > atol)[:5]
        rows = [f"  at {tuple(i)}: {actual[tuple(i)]!r} vs {expected[tuple(i)]!r}" for i in bad]
        pytest.fail(
            f"{what}: max abs error {err.max():.3e} > {atol:.1e}; first mismatches:\n"
            + "\n".join(rows)
        )


class _NoiseFeed:
    """Stands in for diffusers' ``randn_tensor`` in the LCM and Euler-ancestral
    modules, handing out the noise the test also gives fewstep."""

    def __init__(self, monkeypatch):
        self.next = None
        for module in (scheduling_lcm, scheduling_euler_ancestral_discrete):
            monkeypatch.setattr(module, "randn_tensor", self)

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert self.next is not None and tuple(shape) == tuple(self.next.shape)
        noise, self.next = self.next, None
        return noise.to(dtype)


def _draws(seed, n):
    """x_T (unit variance), then per step a model output and a noise: float64."""
    rng = np.random.default_rng(seed)
    x_T = rng.standard_normal(SHAPE)
    model_outputs = rng.standard_normal((n, *SHAPE))
    noises = rng.standard_normal((n, *SHAPE))
    return x_T, model_outputs, noises


def _diffusers_step(name, ref, feed, model_output, t, sample, noise, eta, exact):
    """One diffusers step → (prev_sample, denoised). ``exact``: pass LCM a python
    int timestep, so that c_skip/c_out are computed in float64, not float32."""
    if name == "ddim":
        out = ref.step(model_output, t, sample, eta=eta, variance_noise=noise)
        return out.prev_sample, out.pred_original_sample
    feed.next = noise
    if name == "lcm":
        out = ref.step(model_output, int(t) if exact else t, sample)
        return out.prev_sample, out.denoised
    out = ref.step(model_output, t, sample)
    return out.prev_sample, out.pred_original_sample


# --- timesteps and schedule ------------------------------------------------------------


@pytest.mark.parametrize(("name", "spacing", "kind", "n"), _grid())
def test_timesteps_equal_diffusers(name, spacing, kind, n):
    ours, ref = _pair(name, _config(name, spacing, kind), n)
    expected = ref.timesteps.numpy()
    assert ours.timesteps.dtype == expected.dtype  # int64 (DDIM, LCM) or float32 (Euler)
    np.testing.assert_array_equal(ours.timesteps, expected)


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_ancestral"])
def test_trailing_drops_diffusers_spurious_last_timestep(name):
    # diffusers' np.arange(1000, 0, -1000/61) yields 62 values; rounded minus one,
    # the 62nd is -1 (DDIM then reads ᾱ[-1], the noisiest). fewstep takes the first 61.
    ours, ref = _pair(name, _config(name, "trailing"), 61)
    expected = ref.timesteps.numpy()
    assert len(ours.timesteps) == 61 and len(expected) == 62 and expected[-1] == -1
    np.testing.assert_array_equal(ours.timesteps, expected[:61])


SCHEDULES = {
    "linear-default": {},
    "scaled_linear-sd": SD_SCHEDULE,
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {"trained_betas": list(np.linspace(1e-4, 2e-2, 1000) ** 1.5)},
    "scaled_linear-500": {**SD_SCHEDULE, "num_train_timesteps": 500},
}


ALL_CLASSES = {
    **DIFFUSERS_CLASSES,
    "pndm": PNDMScheduler,
    "heun": HeunDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}


@pytest.mark.parametrize("name", list(ALL_CLASSES))
@pytest.mark.parametrize("schedule", list(SCHEDULES), ids=list(SCHEDULES))
def test_alphas_cumprod_bit_exact(name, schedule):
    config = SCHEDULES[schedule]  # class defaults fill the rest, for both
    ours = create_sampler(name, config)
    ref = ALL_CLASSES[name].from_config(config)
    assert ours.alphas_cumprod.dtype == np.float64
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy())


def test_zero_terminal_snr_schedule():
    # Rescaling subtracts nearly equal square roots, and torch's float32 sqrt is not
    # correctly rounded, so compare in √ᾱ: a few float32 roundings of values ≤ 1.
    config = {**SD_SCHEDULE, "rescale_betas_zero_snr": True}
    ours = create_sampler("ddim", config)
    ref = DDIMScheduler.from_config(config)
    assert ours.alphas_cumprod[-1] == 0.0
    _assert_close(
        np.sqrt(ours.alphas_cumprod),
        np.sqrt(ref.alphas_cumprod.double().numpy()),
        8 * 2.0**-24,
        "√ᾱ with rescale_betas_zero_snr",
    )
    euler = create_sampler("euler", config)  # ᾱ_T := 2^-24, σ_T ≈ 4096, as in diffusers
    assert euler.init_noise_sigma == pytest.approx(
        float(
            EulerDiscreteScheduler.from_config(
                {**config, "timestep_spacing": "linspace"}
            ).init_noise_sigma
        ),
        rel=2.0**-22,
    )


@pytest.mark.parametrize("name", ["euler", "euler_ancestral"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", STEP_COUNTS, ids=[f"{n}steps" for n in STEP_COUNTS])
def test_euler_sigmas(name, spacing, n):
    # diffusers computes σ in float32 (torch's sqrt: within 1 ulp) and rounds the
    # interpolated σ to float32: 2 float32 ulps of relative error at most.
    ours, ref = _pair(name, _config(name, spacing), n)
    expected = ref.sigmas.double().numpy()
    assert ours.sigmas[-1] == expected[-1] == 0.0
    np.testing.assert_allclose(ours.sigmas, expected, rtol=2.0**-22, atol=0)
    assert isinstance(ours.init_noise_sigma, float)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=2.0**-22)


@pytest.mark.parametrize("name", ["ddim", "lcm"])
def test_init_noise_sigma_is_one(name):
    assert create_sampler(name, CONFIGS[name]).init_noise_sigma == 1.0


# --- float64 trajectories --------------------------------------------------------------

# Beyond the grid: other realistic configs and code paths.
EXTRA_TRAJECTORIES = [
    pytest.param("ddim", {}, 50, 0.0, id="ddim-diffusers-defaults-clip_sample-50steps"),
    pytest.param("ddim", {}, 4, 1.0, id="ddim-diffusers-defaults-clip_sample-eta1-4steps"),
    pytest.param(
        "ddim",
        {"beta_schedule": "squaredcos_cap_v2", "set_alpha_to_one": False, "clip_sample": False},
        8,
        0.5,
        id="ddim-squaredcos-eta0.5-8steps",
    ),
    pytest.param(
        "ddim",
        {
            **SD_SCHEDULE,
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
            "clip_sample": False,
        },
        4,
        0.0,
        id="ddim-zero_snr-v-trailing-4steps",
    ),
    pytest.param(
        "euler",
        {
            **SD_SCHEDULE,
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
        },
        4,
        0.0,
        id="euler-zero_snr-v-trailing-4steps",
    ),
    pytest.param(
        "lcm",
        {
            **SD_SCHEDULE,
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
            "clip_sample": False,
            "original_inference_steps": 50,
        },
        4,
        0.0,
        id="lcm-zero_snr-v-4steps",  # the default model's student
    ),
    pytest.param(
        "lcm",
        {
            **SD_SCHEDULE,
            "original_inference_steps": 50,
            "steps_offset": 1,
            "clip_sample": True,
            "clip_sample_range": 1.5,
        },
        4,
        0.0,
        id="lcm-clip_sample-4steps",
    ),
    pytest.param(
        "lcm",
        {**SD_SCHEDULE, "original_inference_steps": 100, "num_train_timesteps": 1000},
        7,
        0.0,
        id="lcm-original100-7steps",
    ),
]


def _trajectory_cases():
    cases = []
    for p in _grid():
        name, spacing, kind, n = p.values
        etas = (0.0, 1.0) if name == "ddim" else (0.0,)
        for eta in etas:
            suffix = "-eta1" if eta else ""
            cases.append(pytest.param(name, _config(name, spacing, kind), n, eta, id=p.id + suffix))
    return cases + EXTRA_TRAJECTORIES


@pytest.mark.parametrize(("name", "config", "n", "eta"), _trajectory_cases())
def test_float64_trajectory_matches_diffusers(name, config, n, eta, monkeypatch):
    options = {"eta": eta} if name == "ddim" else {}
    ours, ref = _pair(name, config, n, **options)
    # diffusers gets fewstep's float64 tables (see the module docstring).
    ref.alphas_cumprod = torch.from_numpy(ours.alphas_cumprod.copy())
    if name == "ddim":
        ref.final_alpha_cumprod = torch.tensor(ours.final_alpha_cumprod, dtype=torch.float64)
    euler = name.startswith("euler")
    if euler:
        ref.sigmas = torch.from_numpy(ours.sigmas.copy())
    feed = _NoiseFeed(monkeypatch)
    x_T, model_outputs, noises = _draws(seed=n, n=len(ours.timesteps))

    x = x_T * ours.init_noise_sigma
    x_ref = torch.from_numpy(x.copy())
    for i, t in enumerate(ref.timesteps):
        if euler:
            # diffusers' Euler steps cast `sample` to float32 ("upcast", a downcast
            # here): give both the same float32-representable sample each step.
            x = x.astype(np.float32).astype(np.float64)
            x_ref = torch.from_numpy(x.copy())
        model_output, noise = model_outputs[i], noises[i]
        _assert_close(
            ours.scale_model_input(x, i),
            ref.scale_model_input(x_ref, t),
            1e-6,
            f"step {i} model input",
        )
        out = ours.step(model_output, i, x, noise=noise if ours.needs_noise else None)
        prev_ref, denoised_ref = _diffusers_step(
            name,
            ref,
            feed,
            torch.from_numpy(model_output),
            t,
            x_ref,
            torch.from_numpy(noise),
            eta,
            exact=True,
        )
        assert out.prev_sample.dtype == out.denoised.dtype == np.float64
        _assert_close(out.prev_sample, prev_ref, 1e-6, f"step {i} (t={t}) prev_sample")
        _assert_close(out.denoised, denoised_ref, 1e-6, f"step {i} (t={t}) denoised")
        x, x_ref = out.prev_sample, prev_ref


# --- the float32 path on torch tensors -------------------------------------------------


FLOAT32_CASES = [
    pytest.param(name, kind, n, id=f"{name}-{kind}-{n}steps")
    for name in SAMPLERS
    for kind in PREDICTION_TYPES[name][:2]
    for n in (4, 50)
]


@pytest.mark.parametrize(("name", "kind", "n"), FLOAT32_CASES)
def test_float32_torch_path(name, kind, n, monkeypatch):
    """Our sampler on torch float32 tensors against our float64 numpy run: every step
    of the float64 trajectory, taken from the same state in both precisions, must
    land within twice the error that diffusers' float32 step makes against its own
    float64 step, plus one float32 ulp of the largest value.

    Steps start from the same state because free-running float32 trajectories drift
    by accumulated rounding whose size is the luck of the draw (after 50 random LCM
    steps both diffusers' and ours are ~1e-6 relative away from float64)."""
    config = _config(name, kind=kind)
    eta = 1.0 if name == "ddim" else 0.0  # exercise DDIM's noise path too
    options = {"eta": eta} if name == "ddim" else {}
    ours64, ref64 = _pair(name, config, n, **options)
    ours32, ref32 = _pair(name, config, n, **options)
    ref64.alphas_cumprod = ref64.alphas_cumprod.double()  # diffusers' own float64 step
    if name == "ddim":
        ref64.final_alpha_cumprod = ref64.final_alpha_cumprod.double()
    if name.startswith("euler"):
        ref64.sigmas = ref64.sigmas.double()
    feed = _NoiseFeed(monkeypatch)
    x_T, model_outputs, noises = _draws(seed=100 + n, n=n)

    def f32(a):
        return torch.from_numpy(np.asarray(a, dtype=np.float32))

    err_ours = err_torch = largest = 0.0
    x = x_T * ours64.init_noise_sigma
    for i, t in enumerate(ref64.timesteps):
        model_output, noise = model_outputs[i], noises[i]
        expected = ours64.step(model_output, i, x, noise=noise)
        model_input = ours32.scale_model_input(f32(x), i)
        got = ours32.step(f32(model_output), i, f32(x), noise=f32(noise))
        assert model_input.dtype == got.prev_sample.dtype == got.denoised.dtype == torch.float32
        for a, b in zip(got, expected, strict=True):
            err_ours = max(err_ours, float(np.abs(a.numpy() - b).max()))
            largest = max(largest, float(np.abs(b).max()))

        x64 = torch.from_numpy(x)
        ref64.scale_model_input(x64, t)
        ref32.scale_model_input(f32(x), ref32.timesteps[i])
        step64 = _diffusers_step(
            name,
            ref64,
            feed,
            torch.from_numpy(model_output),
            t,
            x64,
            torch.from_numpy(noise),
            eta,
            exact=True,
        )
        step32 = _diffusers_step(
            name,
            ref32,
            feed,
            f32(model_output),
            ref32.timesteps[i],
            f32(x),
            f32(noise),
            eta,
            exact=False,
        )
        for a, b in zip(step32, step64, strict=True):
            err_torch = max(err_torch, float((a.double() - b.double()).abs().max()))
        x = expected.prev_sample

    floor = 2.0**-23 * largest
    assert err_ours <= 2 * err_torch + floor, (err_ours, err_torch, floor)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda a: a.astype(np.float32), id="numpy-float32"),
        pytest.param(lambda a: a, id="numpy-float64"),
        pytest.param(lambda a: torch.from_numpy(a.astype(np.float32)), id="torch-float32"),
        pytest.param(lambda a: torch.from_numpy(a), id="torch-float64"),
    ],
)
def test_dtype_preserved(name, make):
    sampler = create_sampler(name, CONFIGS[name], **({"eta": 0.5} if name == "ddim" else {}))
    sampler.set_timesteps(2)
    x_T, model_outputs, noises = (make(d) for d in _draws(seed=7, n=2))
    x = x_T * sampler.init_noise_sigma
    assert x.dtype == x_T.dtype
    assert sampler.scale_model_input(x, 0).dtype == x_T.dtype
    out = sampler.step(model_outputs[0], 0, x, noise=noises[0])
    assert type(out.prev_sample) is type(x_T)
    assert out.prev_sample.dtype == out.denoised.dtype == x_T.dtype


# --- guidance-scale embedding ----------------------------------------------------------


@pytest.mark.parametrize("dim", [256, 512, 7], ids=["dim256", "dim512", "dim7-odd"])
def test_guidance_scale_embedding_matches_diffusers(dim):
    from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (  # noqa: E501
        LatentConsistencyModelPipeline,
    )

    w = np.array([0.0, 0.5, 3.5, 7.0, 14.0])  # guidance_scale − 1
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.from_numpy(w), embedding_dim=dim
    ).numpy()
    ours = guidance_scale_embedding(w, dim)
    assert ours.shape == expected.shape == (len(w), dim)
    assert ours.dtype == np.float32
    # diffusers works in float32. Its frequency exp(−k·ln(10⁴)/(d/2 − 1)) has an
    # exponent of up to ln(10⁴) ≈ 9.2 built with ~3 float32 roundings, plus exp's own
    # ulp: relative error ≤ (3·ln 10⁴ + 2)·2⁻²⁴; w·1000 and the product add 2·2⁻²⁴.
    # sin and cos are 1-Lipschitz and themselves within an ulp.
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    args = np.abs(w[:, None] * 1000.0 * freqs[None, :])
    rel = (3 * np.log(10000.0) + 4) * 2.0**-24
    bound = rel * np.concatenate([args, args], axis=1) + 2 * 2.0**-23
    if dim % 2:
        bound = np.pad(bound, ((0, 0), (0, 1)), constant_values=2.0**-23)
    err = np.abs(ours.astype(np.float64) - expected)
    assert (err <= bound).all(), np.argwhere(err > bound)[:5]
    assert guidance_scale_embedding(w, dim, dtype=np.float64).dtype == np.float64


# --- factory and config ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("class_name", "cls"),
    [
        ("DDIMScheduler", DDIMSampler),
        ("PNDMScheduler", PNDMSampler),
        ("LCMScheduler", LCMSampler),
        ("EulerDiscreteScheduler", EulerSampler),
        ("EulerAncestralDiscreteScheduler", EulerAncestralSampler),
        ("HeunDiscreteScheduler", HeunSampler),
        ("DPMSolverMultistepScheduler", DPMSolverMultistepSampler),
        ("UniPCMultistepScheduler", UniPCSampler),
        ("ddim", DDIMSampler),
        ("lcm", LCMSampler),
        ("euler", EulerSampler),
        ("euler_ancestral", EulerAncestralSampler),
        ("pndm", PNDMSampler),
        ("heun", HeunSampler),
        ("dpmpp_2m", DPMSolverMultistepSampler),
        ("unipc", UniPCSampler),
    ],
)
def test_create_sampler_by_name(class_name, cls):
    assert type(create_sampler(class_name, SD_SCHEDULE)) is cls
    assert sampler_name_for(class_name) == cls.family


def test_unknown_sampler_names_the_allowed_values():
    with pytest.raises(ValueError, match="sampler must be one of") as info:
        create_sampler("LMSDiscreteScheduler", SD_SCHEDULE)
    for allowed in ("dpmpp_2m_karras", "plms", "PNDMScheduler", "DPMSolverMultistepScheduler"):
        assert allowed in str(info.value)
    assert "LMSDiscreteScheduler" in str(info.value)


def test_config_from_dict_defaults_and_unknown_keys():
    config = SchedulerConfig.from_dict({"beta_end": 0.03, "made_up_key": 1, "sample_max_value": 2})
    assert config.beta_end == 0.03 and config.beta_start == 0.0001
    assert config.timestep_spacing == "leading" and config.clip_sample
    lcm = SchedulerConfig.from_dict({}, sampler="lcm")
    ref = LCMScheduler().config
    assert (lcm.beta_schedule, lcm.beta_start, lcm.clip_sample) == (
        ref.beta_schedule,
        ref.beta_start,
        ref.clip_sample,
    )
    nulls = SchedulerConfig.from_dict({"trained_betas": None, "clip_sample": None})
    assert nulls.trained_betas is None and nulls.clip_sample is False  # falsy, as in diffusers
    with pytest.raises(ValueError, match="steps_offset must not be null"):
        SchedulerConfig.from_dict({"steps_offset": None})
    euler = SchedulerConfig.from_dict({}, sampler="euler")
    assert euler.timestep_spacing == EulerDiscreteScheduler().config.timestep_spacing
    with pytest.raises(Exception, match="frozen|cannot assign"):
        config.beta_end = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("sampler", "key", "value"),
    [
        ("ddim", "thresholding", True),
        ("euler", "interpolation_type", "log_linear"),
        ("euler", "use_exponential_sigmas", True),
        ("heun", "use_beta_sigmas", True),
        ("dpmpp_2m", "use_lu_lambdas", True),
        ("dpmpp_2m", "variance_type", "learned_range"),
        ("unipc", "predict_x0", False),
        ("unipc", "final_sigmas_type", "sigma_max"),
        ("ddim", "beta_schedule", "sigmoid"),
        ("ddim", "prediction_type", "flow"),
        ("ddim", "timestep_spacing", "karras"),
    ],
)
def test_unsupported_config_raises_naming_the_field(sampler, key, value):
    with pytest.raises(NotImplementedError, match=key):
        SchedulerConfig.from_dict({key: value}, sampler=sampler)


def test_euler_ancestral_rejects_sample_prediction():
    with pytest.raises(NotImplementedError, match="prediction_type"):
        create_sampler("euler_ancestral", {"prediction_type": "sample"})


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "too_many", "maximum"),
    [("ddim", 1001, 1000), ("lcm", 51, 50), ("euler", 1001, 1000), ("euler_ancestral", 1001, 1000)],
)
def test_num_inference_steps_range(name, too_many, maximum):
    # steps_offset 0: SD 1.x's offset 1 pushes 1000 leading DDIM steps past t = 999.
    sampler = create_sampler(name, {**CONFIGS[name], "steps_offset": 0})
    for bad in (0, -1, too_many):
        with pytest.raises(
            ValueError, match=f"num_inference_steps must be between 1 and {maximum}"
        ):
            sampler.set_timesteps(bad)
    sampler.set_timesteps(maximum)
    assert len(sampler.timesteps) == maximum


def test_lcm_steps_message_and_original_steps():
    sampler = create_sampler("lcm", CONFIGS["lcm"])
    with pytest.raises(
        ValueError, match=r"^num_inference_steps must be between 1 and 50 for LCM, got 60$"
    ):
        sampler.set_timesteps(60)
    with pytest.raises(ValueError, match="original_inference_steps"):
        create_sampler("lcm", {**CONFIGS["lcm"], "original_inference_steps": 2000})
    with pytest.raises(ValueError, match="strength"):  # 4 steps from int(50 × 0.06) = 3
        sampler.set_timesteps(4, strength=0.06)
    with pytest.raises(ValueError, match="strength"):
        sampler.set_timesteps(4, strength=1.5)


def test_ddim_leading_offset_past_last_train_step():
    # diffusers accepts this and then fails with an IndexError at alphas_cumprod[1000].
    sampler = create_sampler("ddim", CONFIGS["ddim"])
    with pytest.raises(ValueError, match="steps_offset=1"):
        sampler.set_timesteps(1000)


def test_step_before_set_timesteps():
    sampler = create_sampler("ddim", CONFIGS["ddim"])
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sampler.step(np.zeros(SHAPE), 0, np.zeros(SHAPE))


def test_step_index_out_of_range():
    sampler = create_sampler("euler", CONFIGS["euler"])
    sampler.set_timesteps(4)
    with pytest.raises(ValueError, match="step_index must be between 0 and 3, got 4"):
        sampler.step(np.ones(SHAPE), 4, np.ones(SHAPE))


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_ddim_eta_range(eta):
    with pytest.raises(ValueError, match="eta must be between 0 and 1"):
        create_sampler("ddim", CONFIGS["ddim"], eta=eta)


def test_missing_noise():
    _, model_outputs, noises = _draws(seed=3, n=4)
    x = noises[0]
    ddim = create_sampler("ddim", CONFIGS["ddim"], eta=0.5)
    ddim.set_timesteps(4)
    assert ddim.needs_noise
    with pytest.raises(ValueError, match="noise is required"):
        ddim.step(model_outputs[0], 0, x)
    plain = create_sampler("ddim", CONFIGS["ddim"])
    plain.set_timesteps(4)
    assert not plain.needs_noise
    plain.step(model_outputs[0], 0, x)
    with pytest.raises(ValueError, match="noise is required"):
        plain.step(model_outputs[0], 0, x, eta=0.5)

    lcm = create_sampler("lcm", CONFIGS["lcm"])
    lcm.set_timesteps(4)
    assert lcm.needs_noise
    with pytest.raises(ValueError, match="noise is required"):
        lcm.step(model_outputs[0], 0, x)
    last = lcm.step(model_outputs[3], 3, x)  # the last step adds no noise
    assert last.prev_sample is last.denoised

    ancestral = create_sampler("euler_ancestral", CONFIGS["euler_ancestral"])
    ancestral.set_timesteps(4)
    assert ancestral.needs_noise
    with pytest.raises(ValueError, match="noise is required"):
        ancestral.step(model_outputs[0], 0, x)
    ancestral.step(model_outputs[3], 3, x)  # σ_up = 0 on the last step

    euler = create_sampler("euler", CONFIGS["euler"])
    euler.set_timesteps(4)
    assert not euler.needs_noise
    euler.step(model_outputs[0], 0, x)


def test_noise_shape_and_dtype_checked():
    sampler = create_sampler("euler_ancestral", CONFIGS["euler_ancestral"])
    sampler.set_timesteps(4)
    _, model_outputs, noises = _draws(seed=4, n=1)
    with pytest.raises(ValueError, match="noise must match"):
        sampler.step(model_outputs[0], 0, noises[0], noise=noises[0][:, :2])
    with pytest.raises(ValueError, match="noise must match"):
        sampler.step(model_outputs[0], 0, noises[0], noise=noises[0].astype(np.float32))
