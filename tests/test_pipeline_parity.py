"""The whole pipeline against diffusers' pipelines on the same weights, latents and noise.

Reference: diffusers' StableDiffusionPipeline (DDIM, Euler, Euler-ancestral schedulers) and
LatentConsistencyModelPipeline, run in torch fp32 on the tiny random-weight models; fewstep
runs the exported ONNX package on onnxruntime. The cases and the comparison are conftest's
(`parity_case`, `parity`), shared with the torch backend's parity tests.

The samplers beyond those (`NEW_SAMPLER_CASES`: PLMS and PNDM, Heun, DPM++ 2M and 2M SDE,
UniPC, the Karras schedules) run on every family's tiny model against StableDiffusionPipeline
with the diffusers scheduler each name stands for (`SCHEDULERS`), built from the model folder's
scheduler config as `Pipeline(…, scheduler=…)` builds ours; for the LCM model too, whose
guidance embedding StableDiffusionPipeline computes as fewstep does (w = guidance_scale − 1,
no CFG batch). diffusers has no Karras Euler-ancestral: its reference is diffusers' ancestral
step on the Karras schedule of its EulerDiscreteScheduler (`EulerAncestralKarras`). Per-step
noise (DPM++ 2M SDE, Euler-ancestral) comes from one torch generator on both sides, drawn at
the same steps.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import DiffusersParity, ParityCase  # noqa: E402

from fewstep.pipeline import Pipeline  # noqa: E402


def test_pipeline_matches_diffusers(tiny_package, parity, parity_case):
    ours = Pipeline.from_pretrained(tiny_package(parity_case.family))
    got, expected = parity.run_case(ours, parity_case)
    err = parity.max_error(got, expected)
    print(f"{parity_case.id}: onnxruntime vs diffusers max abs error {err:.2e}")
    assert err <= parity.tolerance


def test_guidance_rescale_matches_diffusers(tiny_model, tiny_package, parity):
    folder, package = tiny_model("sd1"), tiny_package("sd1")
    ours = Pipeline.from_pretrained(package)
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)
    reference = parity.load_diffusers(folder, "sd1", "ddim")
    common = dict(
        num_inference_steps=3,
        guidance_scale=7.5,
        guidance_rescale=0.7,
        height=64,
        width=64,
        output_type="np",
    )
    expected = reference("a red cat", latents=torch.from_numpy(latents.copy()), **common).images
    got = ours("a red cat", latents=latents, scheduler="ddim", **common).images
    assert parity.max_error(got, expected) <= parity.tolerance


# --- the samplers beyond DDIM, LCM and Euler ---------------------------------------------


class EulerAncestralKarras(diffusers.EulerAncestralDiscreteScheduler):
    """diffusers' ancestral step on the Karras schedule diffusers' Euler builds."""

    def set_timesteps(self, num_inference_steps, device=None):
        super().set_timesteps(num_inference_steps, device=device)
        euler = diffusers.EulerDiscreteScheduler.from_config(self.config, use_karras_sigmas=True)
        euler.set_timesteps(num_inference_steps, device=device)
        self.sigmas, self.timesteps = euler.sigmas, euler.timesteps


KARRAS = {"use_karras_sigmas": True}
DPM, SDE = {"algorithm_type": "dpmsolver++"}, {"algorithm_type": "sde-dpmsolver++"}
# Our name → (diffusers scheduler class, the config keys the name fixes).
SCHEDULERS = {
    "plms": (diffusers.PNDMScheduler, {"skip_prk_steps": True}),
    "pndm": (diffusers.PNDMScheduler, {}),
    "heun": (diffusers.HeunDiscreteScheduler, {"use_karras_sigmas": False}),
    "heun_karras": (diffusers.HeunDiscreteScheduler, KARRAS),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {**DPM, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler, {**DPM, **KARRAS}),
    "dpmpp_2m_sde": (diffusers.DPMSolverMultistepScheduler, {**SDE, "use_karras_sigmas": False}),
    "dpmpp_2m_sde_karras": (diffusers.DPMSolverMultistepScheduler, {**SDE, **KARRAS}),
    "unipc": (diffusers.UniPCMultistepScheduler, {"use_karras_sigmas": False}),
    "unipc_karras": (diffusers.UniPCMultistepScheduler, KARRAS),
    "euler_karras": (diffusers.EulerDiscreteScheduler, KARRAS),
    "euler_ancestral_karras": (EulerAncestralKarras, {}),
}


class SchedulerParity(DiffusersParity):
    """conftest's parity runs, with StableDiffusionPipeline and `SCHEDULERS[sampler]`."""

    def load_diffusers(self, folder, family, sampler):
        if sampler not in SCHEDULERS:
            return super().load_diffusers(folder, family, sampler)
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        cls, fixed = SCHEDULERS[sampler]
        # The folder's own config: StableDiffusionPipeline's constructor rewrites a
        # steps_offset of 0 (the LCM model's) to 1, which the package does not say.
        config = cls.load_config(folder, subfolder="scheduler")
        pipe.scheduler = cls.from_config(config, **fixed)
        pipe.set_progress_bar_config(disable=True)
        return pipe


@pytest.fixture(scope="module")
def scheduler_parity(tiny_model, parity):
    return SchedulerParity(tiny_model)


def _case(family, sampler, guidance, prompts, per_prompt, height, width, steps):
    return ParityCase(
        f"{family}-{sampler}-g{guidance:g}-b{len(prompts) * per_prompt}-{height}x{width}-{steps}",
        family,
        sampler,
        guidance,
        prompts,
        per_prompt,
        height,
        width,
        0.0,
        steps,
    )


CAT, TWO = ("a red cat",), ("a cat", "a dog")
# Every sampler on every family: guided and not, one image and two, square and not, and step
# counts past each solver's warm-up (PNDM's PRK warm-up needs 4).
NEW_SAMPLER_CASES = [
    _case("sd1", "plms", 7.5, CAT, 1, 64, 64, 4),
    _case("sd1", "pndm", 1.0, TWO, 1, 64, 64, 4),
    _case("sd1", "heun", 7.5, CAT, 1, 64, 96, 3),
    _case("sd1", "dpmpp_2m_karras", 7.5, CAT, 1, 64, 64, 5),
    _case("sd1", "dpmpp_2m_sde", 5.0, CAT, 2, 64, 64, 4),
    _case("sd1", "unipc_karras", 7.5, CAT, 1, 96, 64, 5),
    _case("sd1", "euler_karras", 7.5, TWO, 1, 64, 64, 4),
    _case("sd1", "euler_ancestral_karras", 7.5, CAT, 1, 64, 64, 3),
    _case("sd2", "plms", 7.5, CAT, 1, 64, 64, 3),
    _case("sd2", "pndm", 7.5, CAT, 1, 64, 64, 5),
    _case("sd2", "heun_karras", 7.5, CAT, 1, 64, 64, 3),
    _case("sd2", "dpmpp_2m", 7.5, TWO, 1, 64, 96, 5),
    _case("sd2", "dpmpp_2m_sde_karras", 1.0, CAT, 2, 64, 64, 4),
    _case("sd2", "unipc", 7.5, CAT, 1, 64, 64, 5),
    _case("sd2", "euler_karras", 1.0, CAT, 1, 64, 64, 3),
    _case("sd2", "euler_ancestral_karras", 7.5, TWO, 1, 64, 64, 4),
    _case("turbo", "plms", 0.0, CAT, 1, 64, 64, 2),
    _case("turbo", "pndm", 2.0, CAT, 1, 64, 64, 4),
    _case("turbo", "heun", 0.0, TWO, 1, 64, 64, 2),
    _case("turbo", "dpmpp_2m", 2.0, CAT, 1, 64, 64, 4),
    _case("turbo", "dpmpp_2m_sde_karras", 0.0, CAT, 1, 96, 64, 3),
    _case("turbo", "unipc_karras", 0.0, CAT, 2, 64, 64, 3),
    _case("turbo", "euler_karras", 2.0, CAT, 1, 64, 64, 2),
    _case("turbo", "euler_ancestral_karras", 0.0, CAT, 1, 64, 64, 4),
    _case("lcm", "plms", 8.5, CAT, 1, 64, 64, 3),
    _case("lcm", "pndm", 3.0, CAT, 1, 64, 64, 4),
    _case("lcm", "heun_karras", 8.5, CAT, 1, 64, 64, 2),
    _case("lcm", "dpmpp_2m_karras", 8.5, TWO, 1, 64, 64, 4),
    _case("lcm", "dpmpp_2m_sde", 1.0, CAT, 1, 64, 96, 3),
    _case("lcm", "unipc", 8.5, CAT, 1, 64, 64, 4),
    _case("lcm", "euler_karras", 8.5, CAT, 2, 64, 64, 3),
    _case("lcm", "euler_ancestral_karras", 8.5, CAT, 1, 64, 64, 2),
]


@pytest.mark.parametrize("case", NEW_SAMPLER_CASES, ids=lambda c: c.id)
def test_new_samplers_match_diffusers(tiny_package, scheduler_parity, case):
    ours = Pipeline.from_pretrained(tiny_package(case.family))
    got, expected = scheduler_parity.run_case(ours, case)
    err = scheduler_parity.max_error(got, expected)
    print(f"{case.id}: onnxruntime vs diffusers max abs error {err:.2e}")
    assert err <= scheduler_parity.tolerance


def test_sd1_default_is_its_own_plms(tiny_model, tiny_package, parity):
    # The SD 1.x package's PNDMScheduler config (skip_prk_steps), with no scheduler= at all,
    # against diffusers' pipeline with the scheduler it loads from the same folder.
    ours = Pipeline.from_pretrained(tiny_package("sd1"))
    reference = diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_model("sd1"), safety_checker=None
    )
    reference.set_progress_bar_config(disable=True)
    assert type(reference.scheduler).__name__ == "PNDMScheduler"
    latents = np.random.default_rng(5).standard_normal((1, 4, 8, 8), dtype=np.float32)
    common = dict(num_inference_steps=5, guidance_scale=7.5, output_type="np")
    expected = reference("a blue cat", latents=torch.from_numpy(latents.copy()), **common)
    got = ours("a blue cat", latents=latents, timings=True, **common)
    assert got.settings["sampler"] == "plms" and got.settings["unet_calls"] == 6
    assert len(got.timings_ms["unet_call"]) == len(got.timings_ms["sampler_step"]) == 6
    assert parity.max_error(got.images, expected.images) <= parity.tolerance


def test_heun_reports_two_unet_calls_per_step(tiny_package):
    ours = Pipeline.from_pretrained(tiny_package("turbo"))
    out = ours("a cat", num_inference_steps=3, scheduler="heun_karras", timings=True)
    assert out.settings["sampler"] == "heun_karras" and out.settings["num_inference_steps"] == 3
    assert out.settings["unet_calls"] == 5  # 2n − 1: the last step has no correction
    assert len(out.timings_ms["unet_call"]) == len(out.timings_ms["sampler_step"]) == 5
