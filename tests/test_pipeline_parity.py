"""The whole pipeline against diffusers' pipelines on the same weights, latents and noise.

Reference: diffusers' StableDiffusionPipeline (DDIM, Euler, Euler-ancestral
schedulers) and LatentConsistencyModelPipeline, run in torch fp32 on the tiny
random-weight models; fewstep runs the exported ONNX package on onnxruntime.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from parity import IMAGE_TOLERANCE, TorchNoise, load_diffusers  # noqa: E402

from fewstep.pipeline import Pipeline  # noqa: E402

# (family, sampler, guidance_scale, prompts, num_images_per_prompt, height, width, eta, steps)
CASES = [
    pytest.param("sd1", "ddim", 7.5, ["a red cat"], 1, 64, 64, 0.0, 4, id="sd1-ddim-cfg-b1-square"),
    pytest.param(
        "sd1", "ddim", 1.0, ["a red cat", "a dog"], 1, 64, 96, 0.0, 3, id="sd1-ddim-nocfg-b2-wide"
    ),
    pytest.param(
        "sd1", "ddim", 5.0, ["a blue circle"], 2, 96, 64, 0.7, 3, id="sd1-ddim-eta-cfg-n2-tall"
    ),
    pytest.param(
        "sd1", "euler", 7.5, ["a green square"], 1, 64, 96, 0.0, 4, id="sd1-euler-cfg-b1-wide"
    ),
    pytest.param(
        "sd1", "euler_ancestral", 7.5, ["a cat", "a dog"], 1, 64, 64, 0.0, 4, id="sd1-eulera-cfg-b2"
    ),
    pytest.param(
        "sd2", "ddim", 7.5, ["a photo of a cat"], 1, 64, 64, 0.0, 4, id="sd2-vpred-ddim-cfg-b1"
    ),
    pytest.param(
        "sd2",
        "euler",
        1.0,
        ["a photo of a dog"],
        2,
        64,
        96,
        0.0,
        2,
        id="sd2-vpred-euler-nocfg-n2-wide",
    ),
    pytest.param(
        "turbo",
        "euler_ancestral",
        0.0,
        ["a red circle"],
        1,
        64,
        64,
        0.0,
        1,
        id="turbo-eulera-1step",
    ),
    pytest.param(
        "turbo",
        "euler_ancestral",
        2.0,
        ["a cat", "a dog"],
        1,
        96,
        64,
        0.0,
        4,
        id="turbo-eulera-cfg-b2-tall",
    ),
    pytest.param("turbo", "euler", 0.0, ["a blue square"], 2, 64, 64, 0.0, 2, id="turbo-euler-n2"),
    pytest.param("lcm", "lcm", 8.5, ["a red cat"], 1, 64, 64, 0.0, 4, id="lcm-w8.5-b1"),
    pytest.param("lcm", "lcm", 1.0, ["a cat", "a dog"], 1, 64, 96, 0.0, 2, id="lcm-w1-b2-wide"),
    pytest.param("lcm", "lcm", 3.0, ["a green circle"], 2, 64, 64, 0.0, 1, id="lcm-1step-n2"),
]


@pytest.mark.parametrize("family,sampler,guidance,prompts,per_prompt,height,width,eta,steps", CASES)
def test_pipeline_matches_diffusers(
    tiny_model,
    tiny_package,
    family,
    sampler,
    guidance,
    prompts,
    per_prompt,
    height,
    width,
    eta,
    steps,
):
    folder, package = tiny_model(family), tiny_package(family)
    ours = Pipeline.from_pretrained(package)
    batch = len(prompts) * per_prompt
    shape = (batch, 4, height // ours.info.vae_scale_factor, width // ours.info.vae_scale_factor)
    latents = np.random.default_rng(7).standard_normal(shape, dtype=np.float32)
    negative = None if family == "lcm" else ["ugly"] * len(prompts)

    reference = load_diffusers(folder, family, sampler)
    ref_kwargs = dict(
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        num_images_per_prompt=per_prompt,
        latents=torch.from_numpy(latents.copy()),
        generator=torch.Generator().manual_seed(11),
        output_type="np",
    )
    if family != "lcm":
        ref_kwargs.update(negative_prompt=negative, eta=eta)
    expected = reference(prompts, **ref_kwargs).images

    got = ours(
        prompts,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        num_images_per_prompt=per_prompt,
        latents=latents,
        generator=TorchNoise(11),
        eta=eta,
        output_type="np",
        scheduler=sampler,
    ).images

    assert got.shape == expected.shape == (batch, height, width, 3)
    assert float(expected.std()) > 1e-3, "reference image is flat: the test would prove nothing"
    err = np.abs(got - expected)
    assert err.max() <= IMAGE_TOLERANCE, (
        f"max abs difference {err.max():.2e} at {np.unravel_index(err.argmax(), err.shape)}"
    )


def test_guidance_rescale_matches_diffusers(tiny_model, tiny_package):
    folder, package = tiny_model("sd1"), tiny_package("sd1")
    ours = Pipeline.from_pretrained(package)
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)
    reference = load_diffusers(folder, "sd1", "ddim")
    expected = reference(
        "a red cat",
        num_inference_steps=3,
        guidance_scale=7.5,
        guidance_rescale=0.7,
        height=64,
        width=64,
        latents=torch.from_numpy(latents.copy()),
        output_type="np",
    ).images
    got = ours(
        "a red cat",
        num_inference_steps=3,
        guidance_scale=7.5,
        guidance_rescale=0.7,
        height=64,
        width=64,
        latents=latents,
        scheduler="ddim",
        output_type="np",
    ).images
    assert np.abs(got - expected).max() <= IMAGE_TOLERANCE
