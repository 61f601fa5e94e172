"""Every argument of a generation call is checked before any graph runs; limits bound a call.

Bad values are the ones callers actually send: None, numbers where text goes, text where
numbers go (`eta="0.5"`, as a form or JSON body gives it), bools for integers, lone
surrogates (what a broken UTF-16 decoder hands on), non-finite or complex latents, generators
of other libraries. numpy scalars are accepted wherever Python's are, and mean the same.
"""

from __future__ import annotations

import numpy as np
import pytest

import fewstep
from fewstep.inputs import Limits
from fewstep.pipeline import Pipeline


@pytest.fixture(scope="module")
def sd1(tiny_package):
    return Pipeline.from_pretrained(tiny_package("sd1"))


@pytest.fixture(scope="module")
def default_model():
    return Pipeline.from_pretrained(fewstep.default_model())


def _latents(pipe, **overrides):
    info = pipe.info
    side = info.default_height // info.vae_scale_factor
    array = np.random.default_rng(0).standard_normal((1, info.latent_channels, side, side))
    for index, value in overrides.items():
        array.flat[int(index.removeprefix("at"))] = value
    return array


BAD_ARGUMENTS = [
    (dict(prompt=None), "prompt must be a string"),
    (dict(prompt=123), "prompt must be a string"),
    (dict(prompt={"a cat": 1}), "prompt must be a string"),
    (dict(prompt=[]), "prompt must be a string"),
    (dict(prompt=["a cat", 7]), r"prompt\[1\] must be a string"),
    (dict(prompt="a \ud800 cat"), "prompt is not valid text: surrogates"),
    (dict(prompt="x" * 10_001), "prompt must be at most 10000 characters"),
    (dict(negative_prompt=5), "negative_prompt must be a string"),
    (dict(negative_prompt=[None]), r"negative_prompt\[0\] must be a string"),
    (dict(negative_prompt="\udfff"), "negative_prompt is not valid text"),
    (dict(eta="0.5"), "eta must be a number"),
    (dict(eta=float("nan")), "eta must be a number"),
    (dict(guidance_scale="7.5"), "guidance_scale must be a number"),
    (dict(guidance_scale=1e30), "guidance_scale must be a number between 0 and 100"),
    (dict(guidance_rescale=[0.5]), "guidance_rescale must be a number"),
    (dict(num_inference_steps=True), "num_inference_steps must be an integer"),
    (dict(num_inference_steps=2.0), "num_inference_steps must be an integer"),
    (dict(num_inference_steps="2"), "num_inference_steps must be an integer"),
    (dict(height=True), "height must be an integer"),
    (dict(width=np.float64(32.0)), "width must be an integer"),
    (dict(num_images_per_prompt=True), "num_images_per_prompt must be an integer"),
    (dict(seed=True), "seed must be an integer"),
    (dict(seed=2**64), "seed must be an integer between 0 and"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(generator=42), "generator must be a numpy Generator"),
    (dict(generator=np.random.RandomState(0)), "generator must be a numpy Generator"),
    (dict(seed=1, generator=np.random.default_rng(1)), "either seed or generator"),
    (dict(output_type=["pil"]), "output_type must be one of"),
    (dict(scheduler=1), "scheduler must be one of"),
    (dict(latents="noise"), "latents must be a real float array"),
    (dict(latents=[[1, 2], [3]]), "latents must be a float array"),
]


@pytest.mark.parametrize(
    "kwargs,match", BAD_ARGUMENTS, ids=lambda v: v if isinstance(v, str) else None
)
def test_bad_argument_is_a_value_error_naming_it(sd1, guarded, kwargs, match):
    call = {"prompt": "a cat", **kwargs}
    with pytest.raises(ValueError, match=match):
        guarded(sd1)(**call)


@pytest.mark.parametrize(
    "value,match",
    [
        (np.nan, "2 NaN or infinite"),
        (np.inf, "2 NaN or infinite"),
        (1e39, "2 NaN or infinite"),  # finite in float64, infinite in float32
        (1j, "real float array, got dtype complex128"),
    ],
)
def test_latents_must_be_real_and_finite(sd1, guarded, value, match):
    latents = _latents(sd1).astype(np.result_type(value, np.float64))
    latents.flat[3] = value
    latents.flat[7] = value
    with pytest.raises(ValueError, match=match):
        guarded(sd1)("a cat", latents=latents)


def test_numpy_scalars_mean_what_python_scalars_mean(sd1):
    python = sd1(
        "a cat",
        num_inference_steps=2,
        guidance_scale=3.5,
        eta=0.5,
        scheduler="ddim",
        height=32,
        width=48,
        num_images_per_prompt=2,
        seed=7,
        output_type="np",
    )
    numpy = sd1(
        "a cat",
        num_inference_steps=np.int64(2),
        guidance_scale=np.float32(3.5),
        eta=np.float16(0.5),
        scheduler="ddim",
        height=np.int32(32),
        width=np.uint16(48),
        num_images_per_prompt=np.int8(2),
        seed=np.uint64(7),
        output_type="np",
    )
    assert numpy.images.shape == (2, 32, 48, 3)
    np.testing.assert_array_equal(numpy.images, python.images)


def test_a_size_the_unet_cannot_halve_is_refused_naming_the_multiple(default_model, guarded):
    # The default model: VAE ×4 and two U-Net downsamplers → multiples of 16. 72 is a
    # multiple of 8 (the old check) and died inside onnxruntime's Concat.
    assert default_model.info.size_multiple == 16
    with pytest.raises(
        ValueError, match=r"height must be a multiple of 16 for this model .*, got 72"
    ):
        guarded(default_model)("a red circle", height=72)
    out = default_model("a red circle", height=80, width=48, seed=0, output_type="np")
    assert out.images.shape == (1, 80, 48, 3)


def test_limits_refuse_big_calls_before_any_graph_runs(sd1, guarded):
    pipe = guarded(sd1)
    with pytest.raises(ValueError, match=r"height × width must be at most 4194304 pixels"):
        pipe("a cat", height=8192, width=8192)
    with pytest.raises(ValueError, match="at most 64 images, got 3 prompts × .* 22 = 66"):
        pipe(["a", "b", "c"], num_images_per_prompt=22)
    with pytest.raises(
        ValueError, match="num_inference_steps must be an integer between 1 and 150"
    ):
        pipe("a cat", num_inference_steps=151)
    # Inside the limits, the call gets as far as the first graph.
    with pytest.raises(guarded.GraphRan):
        pipe(["a", "b"], num_images_per_prompt=32, num_inference_steps=150)


def test_limits_are_the_callers_to_set(sd1, guarded):
    small = guarded(sd1, limits=Limits(max_pixels=32 * 32, max_images=2, max_steps=3))
    with pytest.raises(ValueError, match="at most 1024 pixels, got 32×48"):
        small("a cat", height=32, width=48, num_inference_steps=2)
    with pytest.raises(ValueError, match="at most 2 images"):
        small("a cat", num_images_per_prompt=3, height=32, width=32, num_inference_steps=2)
    with pytest.raises(ValueError, match="between 1 and 3"):
        small("a cat", num_inference_steps=4, height=32, width=32)
    big = guarded(sd1, limits=Limits(max_steps=500))
    with pytest.raises(guarded.GraphRan):
        big("a cat", num_inference_steps=500)


@pytest.mark.parametrize("field", ["max_pixels", "max_images", "max_steps", "max_prompt_chars"])
@pytest.mark.parametrize("value", [0, -1, True, 2.5, "64"])
def test_limits_must_be_positive_integers(field, value):
    with pytest.raises(ValueError, match=f"{field} must be an integer >= 1"):
        Limits(**{field: value})


def test_from_pretrained_takes_limits(tiny_package):
    pipe = Pipeline.from_pretrained(tiny_package("sd1"), limits=Limits(max_steps=2))
    assert pipe.limits.max_steps == 2
    with pytest.raises(ValueError, match="limits must be a fewstep.Limits"):
        Pipeline.from_pretrained(tiny_package("sd1"), limits={"max_steps": 2})
