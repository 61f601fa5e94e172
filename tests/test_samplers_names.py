"""Which sampler a name or a package's scheduler config gets, what each diffusers class reads
of a config, A1111's sampler names, and the samplers' errors.

References: diffusers' scheduler classes themselves (their `__init__` keys and defaults,
their timesteps for the config a name stands for).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from fewstep.image_files import SAMPLER_LABELS, a1111_parameters  # noqa: E402
from fewstep.samplers import (  # noqa: E402
    SAMPLERS,
    SCHEDULER_CLASS_NAMES,
    SchedulerConfig,
    create_sampler,
    sampler_name_for,
)
from fewstep.samplers.a1111 import A1111_SAMPLERS, scheduler_for_a1111  # noqa: E402
from fewstep.samplers.base import CLASS_KEYS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SD = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
}
FAMILY_CLASSES = {family: class_name for class_name, family in SCHEDULER_CLASS_NAMES.items()}
# diffusers __init__ keys fewstep does not read, and why that is safe.
IGNORED_KEYS = {
    "dynamic_thresholding_ratio",  # only with thresholding, which raises
    "sample_max_value",  # only with thresholding
    "flow_shift",  # only with use_flow_sigmas, which raises
    "time_shift_type",  # only with use_dynamic_shifting, which raises
    "shift_terminal",  # only with use_flow_sigmas (diffusers raises otherwise)
    "solver_p",  # an object, not a config value
}
SD1_PNDM = {  # runwayml/stable-diffusion-v1-5 scheduler_config.json
    "_class_name": "PNDMScheduler",
    **SD,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "trained_betas": None,
    "clip_sample": False,
}


# --- names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_name_makes_a_sampler_of_that_name(name):
    sampler = create_sampler(name, SD)
    assert sampler.name == name
    assert sampler_name_for(name) == name


@pytest.mark.parametrize(
    ("class_name", "config", "name"),
    [
        ("PNDMScheduler", SD1_PNDM, "plms"),
        ("PNDMScheduler", {**SD1_PNDM, "skip_prk_steps": False}, "pndm"),
        ("PNDMScheduler", SD, "pndm"),  # PNDM's default: the PRK warm-up
        ("DPMSolverMultistepScheduler", SD, "dpmpp_2m"),
        ("DPMSolverMultistepScheduler", {**SD, "use_karras_sigmas": True}, "dpmpp_2m_karras"),
        (
            "DPMSolverMultistepScheduler",
            {**SD, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
            "dpmpp_2m_sde_karras",
        ),
        ("EulerDiscreteScheduler", {**SD, "use_karras_sigmas": True}, "euler_karras"),
        # diffusers' Euler-ancestral takes no use_karras_sigmas, so a config's means nothing
        ("EulerAncestralDiscreteScheduler", {**SD, "use_karras_sigmas": True}, "euler_ancestral"),
        ("DDIMScheduler", {**SD, "use_karras_sigmas": True}, "ddim"),
        ("HeunDiscreteScheduler", SD, "heun"),
        ("UniPCMultistepScheduler", {**SD, "use_karras_sigmas": True}, "unipc_karras"),
    ],
)
def test_a_package_config_gets_the_sampler_it_names(class_name, config, name):
    assert sampler_name_for(class_name, config) == name
    assert create_sampler(class_name, config).name == name


@pytest.mark.parametrize(
    ("name", "class_name", "package_config", "diffusers_keys"),
    [
        # The plain name turns Karras off, "_karras" on, whatever the package says.
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, {}),
        ("dpmpp_2m_karras", "DPMSolverMultistepScheduler", {}, {"use_karras_sigmas": True}),
        ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, {}),
        ("heun_karras", "HeunDiscreteScheduler", {}, {"use_karras_sigmas": True}),
        ("unipc", "UniPCMultistepScheduler", {"use_karras_sigmas": True}, {}),
        # The DPM names fix the algorithm and the order.
        (
            "dpmpp_2m",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
            {"algorithm_type": "dpmsolver++", "solver_order": 2},
        ),
        ("plms", "PNDMScheduler", {"skip_prk_steps": False}, {"skip_prk_steps": True}),
        ("pndm", "PNDMScheduler", {"skip_prk_steps": True}, {"skip_prk_steps": True}),
    ],
)
def test_a_name_fixes_what_it_says(name, class_name, package_config, diffusers_keys):
    config = {**SD, "timestep_spacing": "trailing", **package_config}
    ours = create_sampler(name, config)
    ours.set_timesteps(10)
    cls = getattr(diffusers, class_name)
    ref = cls.from_config({**config, "use_karras_sigmas": False, **diffusers_keys})
    ref.set_timesteps(10)
    # (Karras timesteps are fractional: within 1e-4, test_samplers_diffusers.py says why.)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=0, atol=1e-4)
    if hasattr(ref, "sigmas"):
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.double().numpy(), rtol=2.0**-22)
    for key, value in diffusers_keys.items():
        assert getattr(ours.config, key) == value


def test_sd1_package_runs_its_own_plms_without_a_warning(caplog):
    with caplog.at_level("WARNING"):
        sampler = create_sampler("PNDMScheduler", SD1_PNDM)
    assert sampler.name == "plms" and not caplog.records
    sampler.set_timesteps(50)
    ref = diffusers.PNDMScheduler.from_config(SD1_PNDM)
    ref.set_timesteps(50)
    np.testing.assert_array_equal(sampler.timesteps, ref.timesteps.numpy())
    assert len(sampler.timesteps) == 51  # PLMS evaluates its second timestep twice


# --- what each diffusers class reads ----------------------------------------------------


@pytest.mark.parametrize("family", list(CLASS_KEYS))
def test_keys_are_the_diffusers_class_keys(family):
    cls = getattr(diffusers, FAMILY_CLASSES[family])
    theirs = set(inspect.signature(cls.__init__).parameters) - {"self"}
    ours = CLASS_KEYS[family]
    assert ours <= theirs, ours - theirs
    assert theirs - ours <= IGNORED_KEYS, theirs - ours - IGNORED_KEYS


@pytest.mark.parametrize("family", list(CLASS_KEYS))
def test_defaults_are_the_diffusers_class_defaults(family):
    ours = SchedulerConfig.from_dict({}, sampler=family)
    theirs = getattr(diffusers, FAMILY_CLASSES[family])().config
    for key in CLASS_KEYS[family]:
        mine, expected = getattr(ours, key), theirs[key]
        if key == "disable_corrector":
            mine, expected = list(mine), list(expected)
        if key == "solver_type" and family == "dpmpp_2m":
            assert create_sampler(family, {}).config.solver_type == expected
            continue
        assert mine == expected, (key, mine, expected)


def test_other_classes_keys_are_ignored_as_diffusers_ignores_them():
    # PNDMScheduler takes neither rescale_betas_zero_snr nor clip_sample.
    config = {**SD, "rescale_betas_zero_snr": True, "clip_sample": True}
    ours = create_sampler("pndm", config)
    ref = diffusers.PNDMScheduler.from_config(config)
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy())
    assert ours.alphas_cumprod[-1] > 0
    # HeunDiscreteScheduler takes no final_sigmas_type.
    heun = create_sampler("heun", {**SD, "final_sigmas_type": "sigma_min"})
    heun.set_timesteps(4)
    assert heun.sigmas[-1] == 0.0


def test_final_sigmas_type_sigma_min():
    for name, class_name in [
        ("euler", "EulerDiscreteScheduler"),
        ("dpmpp_2m_karras", "DPMSolverMultistepScheduler"),
        ("unipc", "UniPCMultistepScheduler"),
        ("unipc_karras", "UniPCMultistepScheduler"),
    ]:
        config = {**SD, "final_sigmas_type": "sigma_min"}
        ours = create_sampler(name, config)
        ours.set_timesteps(20)
        karras = {"use_karras_sigmas": name.endswith("karras")}
        ref = getattr(diffusers, class_name).from_config({**config, **karras})
        ref.set_timesteps(20)
        assert ours.sigmas[-1] > 0
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.double().numpy(), rtol=2.0**-22)


def test_lambda_min_clipped_cuts_the_noisiest_timesteps():
    config = {**SD, "lambda_min_clipped": -2.0, "timestep_spacing": "trailing"}
    ours = create_sampler("DPMSolverMultistepScheduler", config)
    ours.set_timesteps(10)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(config)
    ref.set_timesteps(10)
    assert ours.timesteps[0] < 999
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


# --- A1111's names ---------------------------------------------------------------------

A1111_NAMES = (
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Karras",
    "Euler",
    "Euler a",
    "Heun",
    "PLMS",
    "UniPC",
    "DDIM",
    "LCM",
)


@pytest.mark.parametrize("a1111", A1111_NAMES)
def test_a1111_names_map_to_samplers_of_that_kind(a1111):
    scheduler = scheduler_for_a1111(a1111)
    assert scheduler in SAMPLERS
    sampler = create_sampler(scheduler, SD)
    assert ("Karras" in a1111) == sampler.config.use_karras_sigmas
    assert ("SDE" in a1111) == sampler.needs_noise or a1111 in ("Euler a", "LCM")
    # The image metadata names it as A1111 does.
    settings = {
        "num_inference_steps": 20,
        "sampler": sampler.name,
        "guidance_scale": 7.0,
        "seed": 1,
        "width": 512,
        "height": 512,
    }
    assert f"Sampler: {a1111}," in a1111_parameters("a cat", "", settings, "model")


def test_a1111_table_is_one_to_one_and_labels_come_from_it():
    assert set(A1111_SAMPLERS) == set(A1111_NAMES)
    assert len(set(A1111_SAMPLERS.values())) == len(A1111_SAMPLERS)
    assert {v: k for k, v in A1111_SAMPLERS.items()} == SAMPLER_LABELS
    with pytest.raises(ValueError, match=r"sampler_index must be one of \[.*'DPM\+\+ 2M'.*'x'"):
        scheduler_for_a1111("x", "sampler_index")


# --- calls per step, noise, order ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "calls"),
    [("heun", lambda n: 2 * n - 1), ("plms", lambda n: n + 1), ("pndm", lambda n: n + 9)],
)
def test_unet_calls_per_step(name, calls):
    for n in (4, 7):
        sampler = create_sampler(name, SD)
        sampler.set_timesteps(n)
        assert len(sampler.timesteps) == calls(n)


def test_pndm_prk_warm_up_needs_four_steps():
    sampler = create_sampler("pndm", SD)
    with pytest.raises(ValueError, match="num_inference_steps must be between 4 and 1000"):
        sampler.set_timesteps(3)
    plms = create_sampler("plms", SD)
    plms.set_timesteps(1)
    assert len(plms.timesteps) == 1


def test_sde_needs_noise_except_on_the_last_step():
    sampler = create_sampler("dpmpp_2m_sde", SD)
    sampler.set_timesteps(2)
    assert sampler.needs_noise
    x = np.ones((1, 4, 2, 2))
    with pytest.raises(ValueError, match="noise is required"):
        sampler.step(x, 0, x)
    sampler.step(x, 0, x, noise=x)
    last = sampler.step(x, 1, x)  # lands on x̂0: no noise
    np.testing.assert_array_equal(last.prev_sample, last.denoised)
    assert not create_sampler("dpmpp_2m", SD).needs_noise


@pytest.mark.parametrize("name", ["plms", "heun", "dpmpp_2m", "unipc"])
def test_multistep_samplers_step_in_order(name):
    sampler = create_sampler(name, SD)
    sampler.set_timesteps(5)
    x = np.ones((1, 4, 2, 2))
    sampler.step(x, 0, x)
    for wrong in (0, 2):
        with pytest.raises(ValueError, match="step_index must be 1 next"):
            sampler.step(x, wrong, x)
    sampler.step(x, 1, x)
    sampler.set_timesteps(5)  # starts over
    sampler.step(x, 0, x)


@pytest.mark.parametrize(
    ("name", "config", "error", "match"),
    [
        ("DPMSolverMultistepScheduler", {"solver_order": 3}, NotImplementedError, "solver_order"),
        (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver"},
            NotImplementedError,
            "algo",
        ),
        ("unipc", {"solver_type": "bh1"}, NotImplementedError, "solver_type"),
        ("UniPCMultistepScheduler", {"solver_order": 3}, NotImplementedError, "solver_order"),
        ("unipc", {"lower_order_final": False}, ValueError, "lower_order_final"),
        ("pndm", {"prediction_type": "sample"}, NotImplementedError, "prediction_type"),
        ("unipc_karras", {"sigma_min": 2.0, "sigma_max": 1.0}, ValueError, "sigma_min"),
    ],
)
def test_unsupported_solver_settings(name, config, error, match):
    with pytest.raises(error, match=match):
        create_sampler(name, {**SD, **config})


def test_solver_settings_read_as_diffusers_reads_them():
    # The names fix order 2; each class reads the other's solver types as its own default.
    dpm = create_sampler("dpmpp_2m", {**SD, "solver_order": 3, "solver_type": "bh2"})
    assert (dpm.config.solver_order, dpm.config.solver_type) == (2, "midpoint")
    unipc = create_sampler("unipc", {**SD, "solver_order": 3, "solver_type": "midpoint"})
    assert (unipc.config.solver_order, unipc.config.solver_type) == (2, "bh2")
    for cls, ours in [
        (diffusers.DPMSolverMultistepScheduler, dpm),
        (diffusers.UniPCMultistepScheduler, unipc),
    ]:
        ref = cls.from_config({**SD, "solver_type": "bh2" if ours is dpm else "midpoint"})
        assert ref.config.solver_type == ours.config.solver_type


def test_repeated_timesteps_are_refused():
    # 1000 linspace steps over T = 1000 repeat train steps: diffusers divides by zero.
    sampler = create_sampler("dpmpp_2m", {**SD, "timestep_spacing": "linspace"})
    with pytest.raises(ValueError, match="num_inference_steps=1000 repeats timesteps"):
        sampler.set_timesteps(1000)
    sampler.set_timesteps(500)
    assert len(np.unique(sampler.timesteps)) == 500


@pytest.mark.parametrize("name", ["plms", "pndm", "heun_karras", "dpmpp_2m_sde_karras", "unipc"])
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda a: a.astype(np.float32), id="numpy-float32"),
        pytest.param(lambda a: torch.from_numpy(a.astype(np.float32)), id="torch-float32"),
        pytest.param(lambda a: torch.from_numpy(a), id="torch-float64"),
    ],
)
def test_dtype_and_array_kind_preserved(name, make):
    sampler = create_sampler(name, SD)
    sampler.set_timesteps(4)
    rng = np.random.default_rng(0)
    x = make(rng.standard_normal((1, 4, 2, 2)) * sampler.init_noise_sigma)
    for i in range(len(sampler.timesteps)):
        model_input = sampler.scale_model_input(x, i)
        out = sampler.step(make(rng.standard_normal((1, 4, 2, 2))), i, x, noise=x * 0 + 1)
        assert type(out.prev_sample) is type(x) and type(model_input) is type(x)
        assert out.prev_sample.dtype == out.denoised.dtype == x.dtype
        x = out.prev_sample
    assert math.isfinite(float(x.sum()))
