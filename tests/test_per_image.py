"""One call, several requests: per-image seeds (or generators) and guidance scales.

A batched call with a seed and a guidance scale per image must give each image what a call of
its own with that seed and scale gives: what lets a server gather requests into one batch; with
img2img too, where each image also samples its input image's latents and the noise added to
them from its own seed. The comparison is against separate calls of the same pipeline. On
these tiny models the images are bit-identical (measured); the bound allows float32 rounding,
since a backend may group a larger batch's matrix products otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest

from fewstep.pipeline import Pipeline

BOUND = 1e-5


@pytest.fixture(scope="module")
def pipes(tiny_package):
    return {family: Pipeline.from_pretrained(tiny_package(family)) for family in ("sd1", "lcm")}


CASES = [
    # family, scheduler (one that adds noise each step), guidance scales per image
    pytest.param("sd1", "euler_ancestral", [3.0, 7.5, 5.0], id="sd1-cfg-euler-a"),
    pytest.param("sd1", "ddim", [1.0, 0.0, 1.0], id="sd1-unguided-ddim"),
    pytest.param("lcm", "lcm", [8.5, 2.0, 4.0], id="lcm-embedded-guidance"),
]
PROMPTS = ["a red circle", "a blue square", "a green triangle"]
SEEDS = [3, 9, 2**40]


@pytest.mark.parametrize("family,scheduler,scales", CASES)
def test_each_image_is_what_its_own_call_gives(pipes, family, scheduler, scales):
    pipe = pipes[family]
    call = dict(num_inference_steps=3, height=32, width=32, scheduler=scheduler, eta=1.0)
    batched = pipe(PROMPTS, seed=SEEDS, guidance_scale=scales, output_type="np", **call)
    assert batched.seed == SEEDS and batched.settings["guidance_scale"] == scales
    for i, (prompt, seed, scale) in enumerate(zip(PROMPTS, SEEDS, scales, strict=True)):
        alone = pipe(prompt, seed=seed, guidance_scale=scale, output_type="np", **call)
        np.testing.assert_allclose(batched.images[i], alone.images[0], rtol=0, atol=BOUND)
    if scales[0] > 1:  # guided: the scales matter, one scale for all gives other images
        same = pipe(PROMPTS, seed=SEEDS, guidance_scale=scales[0], output_type="np", **call)
        assert np.abs(same.images[1] - batched.images[1]).max() > 1e-3


def test_generators_per_image_equal_seeds_per_image(pipes):
    pipe = pipes["sd1"]
    call = dict(num_inference_steps=2, height=32, width=32, num_images_per_prompt=2)
    by_seed = pipe("a cat", seed=[5, 6], output_type="np", **call)
    by_generator = pipe(
        "a cat",
        generator=[np.random.default_rng(5), np.random.default_rng(6)],
        output_type="np",
        **call,
    )
    np.testing.assert_array_equal(by_seed.images, by_generator.images)
    assert by_generator.seed is None
    # images of one prompt with their own seeds differ
    assert np.abs(by_seed.images[0] - by_seed.images[1]).max() > 1e-3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(seed=[1, 2]), r"seed as a list must have one entry per image \(3\), got 2"),
        (dict(seed=[1, 2, -1]), r"seed\[2\] must be an integer"),
        (dict(guidance_scale=[7.5, 7.5]), "guidance_scale as a list must have one entry"),
        (dict(guidance_scale=[7.5, 1.0, 7.5]), "must all be > 1 .* or all <= 1"),
        (dict(guidance_scale=[7.5, "7", 7.5]), r"guidance_scale\[1\] must be a number"),
        (dict(generator=[np.random.default_rng(0)] * 2 + [42]), r"generator\[2\] must be"),
    ],
)
def test_per_image_lists_are_checked(pipes, guarded, kwargs, match):
    with pytest.raises(ValueError, match=match):
        guarded(pipes["sd1"])(PROMPTS, **kwargs)


# --- img2img: the same property with an input image per image --------------------------

IMG2IMG_CASES = [
    # family, scheduler, guidance scales per image
    pytest.param("sd1", "euler_ancestral", [3.0, 7.5, 5.0], id="sd1-cfg-euler-a"),
    pytest.param("sd1", "dpmpp_2m_sde", [1.0, 0.0, 1.0], id="sd1-unguided-dpmpp-sde"),
    pytest.param("lcm", "lcm", [8.5, 2.0, 4.0], id="lcm-embedded-guidance"),
]


def pictures(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(count)]


@pytest.mark.parametrize("family,scheduler,scales", IMG2IMG_CASES)
def test_img2img_each_image_is_what_its_own_call_gives(pipes, family, scheduler, scales):
    # Each image draws its encoder sample, its added noise and its step noise from its own
    # seed, so a batch of three requests equals the three calls.
    pipe = pipes[family]
    images = pictures(3)
    call = dict(num_inference_steps=5, strength=0.6, scheduler=scheduler, output_type="np")
    batched = pipe(PROMPTS, image=images, seed=SEEDS, guidance_scale=scales, **call)
    assert batched.settings["strength"] == 0.6
    for i, (prompt, seed, scale) in enumerate(zip(PROMPTS, SEEDS, scales, strict=True)):
        alone = pipe(prompt, image=images[i], seed=seed, guidance_scale=scale, **call)
        np.testing.assert_allclose(batched.images[i], alone.images[0], rtol=0, atol=BOUND)


def test_img2img_one_image_for_all_with_seeds_per_image(pipes):
    pipe = pipes["sd1"]
    image = pictures(1)[0]
    call = dict(num_inference_steps=4, strength=0.5, scheduler="euler_ancestral", output_type="np")
    batched = pipe("a cat", image=image, seed=[5, 6], num_images_per_prompt=2, **call)
    for i, seed in enumerate((5, 6)):
        alone = pipe("a cat", image=image, seed=seed, **call)
        np.testing.assert_allclose(batched.images[i], alone.images[0], rtol=0, atol=BOUND)
    assert np.abs(batched.images[0] - batched.images[1]).max() > 1e-3
