"""img2img against diffusers' img2img pipelines, the samplers' truncation, the input checks
and the CLI flag.

Reference: diffusers' StableDiffusionImg2ImgPipeline (SD 1.x, SD 2.x), the pipeline
AutoPipelineForImage2Image makes of an SD-Turbo folder (the same class), and
LatentConsistencyModelImg2ImgPipeline (LCM), in torch fp32 on the tiny random-weight models;
fewstep runs the exported package on onnxruntime (and OpenVINO, which runs the VAE encoder
too). Images within 1e-3 on a 0..1 scale.

The runner, the samplers' diffusers classes and the same-noise scheme behind every
comparison: img2img_parity.py.
"""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest
from PIL import Image

from fewstep.image_files import read_parameters
from fewstep.inputs import Limits
from fewstep.pipeline import Pipeline
from fewstep.samplers import create_sampler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import TorchNoise, max_error  # noqa: E402
from img2img_parity import (  # noqa: E402
    SCHEDULERS,
    Case,
    Img2ImgParity,
    PNDMFromKept,
    kept_steps,
    picture,
)

TOLERANCE = 1e-3


# --- the samplers' truncation, against diffusers' schedulers -----------------------------

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}
TRUNCATION_CASES = [
    (name, spacing, steps, strength)
    for name in (
        "ddim",
        "euler",
        "euler_ancestral",
        "euler_karras",
        "heun",
        "heun_karras",
        "dpmpp_2m",
        "dpmpp_2m_karras",
        "dpmpp_2m_sde",
        "unipc",
        "unipc_karras",
    )
    for spacing, steps, strength in (
        ("leading", 10, 0.6),
        ("trailing", 7, 0.3),
        ("linspace", 4, 1.0),
    )
]


def _diffusers_img2img_schedule(scheduler, steps: int, strength: float):
    """diffusers' StableDiffusionImg2ImgPipeline.get_timesteps on `scheduler`."""
    scheduler.set_timesteps(steps)
    t_start, _ = kept_steps(steps, strength)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


def _model(sample: np.ndarray, t: float) -> np.ndarray:
    """A stand-in for the U-Net: smooth in the sample, and different per timestep."""
    return (0.4 * sample + np.float32(t / 1000.0)).astype(np.float32)


@pytest.mark.parametrize("name,spacing,steps,strength", TRUNCATION_CASES)
def test_truncated_schedule_noise_and_steps_equal_diffusers(name, spacing, steps, strength):
    # The kept timesteps, add_noise at the first of them, and the whole run from there (a
    # multistep sampler starts its history afresh) against diffusers' scheduler.
    config = {**SD_CONFIG, "timestep_spacing": spacing}
    cls, fixed = SCHEDULERS[name]
    reference = cls.from_config({**config, **fixed})
    expected_t = _diffusers_img2img_schedule(reference, steps, strength)
    ours = create_sampler(name, config)
    ours.set_img2img_timesteps(steps, strength)
    begin = ours.begin_index
    np.testing.assert_allclose(ours.timesteps[begin:], expected_t.numpy(), rtol=0, atol=2e-3)

    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    noise = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    expected = reference.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), expected_t[:1])
    sample = ours.add_noise(x0, noise, begin)
    np.testing.assert_allclose(sample, expected.numpy(), rtol=0, atol=2e-5)

    draws = TorchNoise(5)
    noisy = {"generator": torch.Generator().manual_seed(5)} if ours.needs_noise else {}
    x_ref = expected
    for t in expected_t:
        model_in = reference.scale_model_input(x_ref, t)
        model_out = torch.from_numpy(_model(model_in.numpy(), float(t)))
        x_ref = reference.step(model_out, t, x_ref, **noisy).prev_sample
    for i in range(begin, len(ours.timesteps)):
        model_in = ours.scale_model_input(sample, i)
        step_noise = draws.standard_normal(sample.shape) if ours.needs_noise else None
        sample = ours.step(
            _model(model_in, float(ours.timesteps[i])), i, sample, noise=step_noise
        ).prev_sample
    np.testing.assert_allclose(sample, x_ref.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("steps,strength", [(4, 1.0), (4, 0.5), (2, 0.3), (8, 0.17)])
def test_lcm_img2img_schedule_equals_diffusers(steps, strength):
    config = {**SD_CONFIG, "original_inference_steps": 50, "steps_offset": 0}
    reference = diffusers.LCMScheduler.from_config(config)
    reference.set_timesteps(steps, strength=strength)
    ours = create_sampler("lcm", config)
    ours.set_img2img_timesteps(steps, strength)
    assert ours.begin_index == 0  # LCM runs all its steps, from lower timesteps
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy())


@pytest.mark.parametrize("name,kept", [("plms", 1), ("plms", 2), ("plms", 5), ("pndm", 4)])
def test_pndm_runs_afresh_over_the_kept_steps(name, kept):
    steps = 8
    config = {**SD_CONFIG, "skip_prk_steps": name == "plms"}
    reference = PNDMFromKept.from_config(config)
    reference.skip = steps - kept
    reference.set_timesteps(steps)
    ours = create_sampler(name, config)
    ours.set_img2img_timesteps(steps, kept / steps)
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy()[steps - kept :])


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpmpp_2m", "unipc", "plms", "lcm"])
def test_set_timesteps_after_img2img_starts_from_the_top_again(name):
    sampler = create_sampler(name, {**SD_CONFIG, "skip_prk_steps": True})
    sampler.set_img2img_timesteps(10, 0.5)
    sampler.set_timesteps(10)
    fresh = create_sampler(name, {**SD_CONFIG, "skip_prk_steps": True})
    fresh.set_timesteps(10)
    assert sampler.begin_index == 0
    np.testing.assert_array_equal(sampler.timesteps, fresh.timesteps)


def test_strength_times_steps_below_one_is_refused():
    sampler = create_sampler("euler", SD_CONFIG)
    with pytest.raises(ValueError, match=r"num_inference_steps × strength must be at least 1"):
        sampler.set_img2img_timesteps(3, 0.3)
    lcm = create_sampler("lcm", {**SD_CONFIG, "original_inference_steps": 50})
    with pytest.raises(ValueError, match=r"int\(50 × 0.06\) = 3 for LCM img2img.*got 4"):
        lcm.set_img2img_timesteps(4, 0.06)
    pndm = create_sampler("pndm", {**SD_CONFIG, "skip_prk_steps": False})
    with pytest.raises(ValueError, match="PRK warm-up needs at least 4 steps to run, got 3"):
        pndm.set_img2img_timesteps(10, 0.3)


# --- whole pipelines against diffusers ---------------------------------------------------


CASES = [
    Case("sd1-ddim-cfg", "sd1", "ddim", 5, 0.6, 7.5),
    Case("sd1-euler-resized", "sd1", "euler", 4, 0.5, 7.5, size=(71, 101)),
    Case("sd1-eulera-two-prompts", "sd1", "euler_ancestral", 4, 0.75, 7.5, ("a cat", "a dog"),
         images="pils"),
    Case("sd1-dpmpp2m", "sd1", "dpmpp_2m", 6, 0.7, 7.5),
    Case("sd1-plms-default", "sd1", None, 6, 0.5, 7.5),
    Case("sd1-heun", "sd1", "heun", 4, 0.5, 7.5, size=(64, 96)),
    Case("sd1-unipc-karras", "sd1", "unipc_karras", 6, 0.6, 7.5),
    Case("sd2-ddim-vpred", "sd2", "ddim", 5, 0.8, 7.5),
    Case("sd2-eulera-float-resized", "sd2", "euler_ancestral", 5, 0.6, 7.5, images="float",
         size=(70, 66)),
    Case("sd2-dpmpp2m-n2-shared", "sd2", "dpmpp_2m", 8, 0.5, 7.5, per_prompt=2),
    Case("sd2-euler-generator-each", "sd2", "euler", 4, 0.5, 1.0, per_prompt=2,
         generators="each"),
    Case("sd2-dpmpp2m-sde", "sd2", "dpmpp_2m_sde", 5, 0.6, 7.5),
    Case("sd2-pndm-prk", "sd2", "pndm", 10, 0.5, 7.5),
    Case("lcm-w8.5", "lcm", None, 4, 0.5, 8.5),
    Case("lcm-two-prompts", "lcm", None, 2, 0.3, 3.0, ("a cat", "a dog"), images="pils"),
    Case("lcm-each", "lcm", None, 3, 0.8, 8.5, per_prompt=2, generators="each"),
    Case("turbo-2step", "turbo", None, 2, 0.5, 0.0),
    Case("turbo-eulera-cfg", "turbo", "euler_ancestral", 4, 0.75, 2.0, size=(96, 64)),
]  # fmt: skip


@pytest.fixture(scope="module")
def img2img_parity(tiny_model):
    return Img2ImgParity(tiny_model)


@pytest.fixture(scope="module")
def ort_pipes(tiny_package):
    cache: dict[str, Pipeline] = {}

    def get(family: str) -> Pipeline:
        if family not in cache:
            cache[family] = Pipeline.from_pretrained(tiny_package(family))
        return cache[family]

    return get


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_img2img_matches_diffusers(ort_pipes, img2img_parity, case):
    got, expected = img2img_parity.run(ort_pipes(case.family), case)
    err = max_error(got, expected)
    print(f"{case.id}: onnxruntime vs diffusers max abs error {err:.2e}")
    assert err <= TOLERANCE


def test_img2img_on_openvino_matches_diffusers(tiny_package, img2img_parity):
    pytest.importorskip("openvino")
    ours = Pipeline.from_pretrained(tiny_package("sd1"), backend="openvino")
    got, expected = img2img_parity.run(ours, CASES[0])
    assert max_error(got, expected) <= TOLERANCE


def test_img2img_on_torch_matches_diffusers(tiny_model, img2img_parity, one_torch_thread):
    ours = Pipeline.from_pretrained(tiny_model("turbo"), backend="torch")
    got, expected = img2img_parity.run(ours, CASES[-1])
    assert max_error(got, expected) <= TOLERANCE


# --- inputs ------------------------------------------------------------------------------


def png_bytes(array: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def test_paths_bytes_pil_and_arrays_give_the_same_image(ort_pipes, tmp_path):
    pipe = ort_pipes("sd1")
    array = picture(64, 64, seed=3)
    path = tmp_path / "in.png"
    path.write_bytes(png_bytes(array))
    call = dict(strength=0.5, num_inference_steps=4, seed=2, output_type="np")
    reference = pipe("a cat", image=Image.fromarray(array), **call).images
    for image in (str(path), path, path.read_bytes(), array, array[None], [array]):
        np.testing.assert_array_equal(pipe("a cat", image=image, **call).images, reference)
    as_float = pipe("a cat", image=array / 255.0, **call).images  # rounded otherwise: ~1 ulp
    np.testing.assert_allclose(as_float, reference, rtol=0, atol=1e-5)


def test_size_comes_from_the_image_or_from_height_and_width(ort_pipes):
    pipe = ort_pipes("sd1")  # size multiple 16
    image = Image.fromarray(picture(50, 90, seed=1))
    call = dict(strength=0.5, num_inference_steps=2, seed=2)
    out = pipe("a cat", image=image, **call)
    assert out.images[0].size == (80, 48) and (out.settings["width"], out.settings["height"]) == (
        80,
        48,
    )
    assert pipe("a cat", image=image, height=32, width=64, **call).images[0].size == (64, 32)


@pytest.mark.parametrize(
    ("family", "reference"),
    [
        ("sd1", "StableDiffusionImg2ImgPipeline"),
        ("lcm", "LatentConsistencyModelImg2ImgPipeline"),
    ],
)
def test_default_strength_is_diffusers(ort_pipes, family, reference):
    """Without `strength`, the default of diffusers' img2img pipeline for the family."""
    expected = inspect.signature(getattr(diffusers, reference).__call__).parameters["strength"]
    call = dict(image=picture(64, 64, seed=3), num_inference_steps=4, seed=1, output_type="np")
    assert ort_pipes(family)("a cat", **call).settings["strength"] == expected.default


def test_strength_one_keeps_every_step_and_strength_sets_the_calls(ort_pipes):
    pipe = ort_pipes("sd1")
    image = picture(32, 32, seed=0)
    for strength, calls in ((1.0, 8), (0.5, 4), (0.13, 1)):
        out = pipe("a cat", image=image, strength=strength, num_inference_steps=8, scheduler="ddim")
        assert out.settings["unet_calls"] == calls, strength
    default = pipe("a cat", image=image, num_inference_steps=10, scheduler="ddim")
    assert default.settings["strength"] == 0.8 and default.settings["unet_calls"] == 8
    # Heun: two calls per kept step but the last
    heun = pipe("a cat", image=image, strength=0.5, num_inference_steps=6, scheduler="heun")
    assert heun.settings["unet_calls"] == 5


def test_the_lower_the_strength_the_more_the_image_decides(ort_pipes):
    # Two opposite images, the same seed: their outputs differ most at a low strength and
    # ever less as more of the schedule runs (a pipeline that ignored the image, or noised
    # it to the wrong level, would not order them so).
    pipe = ort_pipes("turbo")
    image = picture(64, 64, seed=4)
    call = dict(num_inference_steps=50, seed=1, output_type="np")
    differences = []
    for strength in (0.02, 0.2, 0.5, 1.0):
        a = pipe("a cat", image=image, strength=strength, **call).images
        b = pipe("a cat", image=255 - image, strength=strength, **call).images
        differences.append(float(np.abs(a - b).mean()))
    assert differences == sorted(differences, reverse=True), differences
    assert differences[0] > 0.1 and differences[0] > 20 * differences[-1], differences


def huge_png(width: int, height: int) -> bytes:
    """A small file whose header claims a large 1-bit image (a decompression bomb's shape)."""
    return png_bytes(np.zeros((height, width), dtype=bool))


BAD_IMAGES = [
    (5, r"image must be a PIL image, a numpy array .* got int"),
    ("/nonexistent/in.png", r"image must be an image file, got '/nonexistent/in.png': no such"),
    (b"not an image", r"image \(12 bytes\) is not a PNG, JPEG or WebP image"),
    ([], "image must hold at least one image, got an empty list"),
    ([picture(32, 32, 0)] * 2, r"image must be one image, one per prompt \(1\) or one per "
     r"generated image \(1\), got 2"),
    ([[picture(32, 32, 0)]], r"image\[0\] must be one image, got list"),
    (np.zeros((32, 32, 4), np.uint8), r"image as an array must be \[height, width, 3\]"),
    (np.zeros((32, 32, 3), np.int64), "image as an array must be uint8 .* got dtype int64"),
    (np.full((32, 32, 3), 1.5), r"image as a float array must hold finite values in 0..1, "
     r"got 1.5..1.5"),
    (np.full((32, 32, 3), np.nan), "must hold finite values in 0..1"),
    (np.zeros((8, 64, 3), np.uint8), "image height must be at least 16 pixels .* got 8"),
    (np.zeros((400, 400, 3), np.uint8), r"image must have between 1 and 65536 pixels, got "
     r"400×400"),
    (huge_png(3000, 3000), r"image must have between 1 and 65536 pixels, got 3000×3000"),
    (png_bytes(picture(32, 32, 0))[:-40], r"image \(\d+ bytes\) could not be decoded"),
    (Image.new("I;16", (32, 32)), "image must have 8-bit pixels .* got mode 'I;16'"),
    (b"\0" * (8 * 65536 + (1 << 20) + 1), "image must be an image file of at most"),
]  # fmt: skip


@pytest.mark.parametrize("image,match", BAD_IMAGES, ids=range(len(BAD_IMAGES)))
def test_bad_images_are_refused_before_any_graph_runs(ort_pipes, guarded, image, match):
    pipe = guarded(ort_pipes("sd1"), limits=Limits(max_pixels=256 * 256))
    with pytest.raises(ValueError, match=match):
        pipe("a cat", image=image)


def test_other_file_formats_are_refused(ort_pipes, guarded, tmp_path):
    pipe = guarded(ort_pipes("sd1"))
    for fmt in ("GIF", "BMP", "TIFF"):
        path = tmp_path / f"in.{fmt.lower()}"
        Image.fromarray(picture(32, 32, 0)).save(path, format=fmt)
        with pytest.raises(ValueError, match=r"is not a PNG, JPEG or WebP image"):
            pipe("a cat", image=path)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(strength=0.0), r"strength must be a number in \(0, 1\]"),
        (dict(strength=1.5), r"strength must be a number in \(0, 1\]"),
        (dict(strength=float("nan")), r"strength must be a number in \(0, 1\]"),
        (dict(strength="0.5"), r"strength must be a number in \(0, 1\]"),
        (dict(strength=True), r"strength must be a number in \(0, 1\]"),
        (dict(strength=0.3, num_inference_steps=3, scheduler="euler"), "× strength must be at"),
        (dict(latents=np.zeros((1, 4, 4, 4), np.float32)), "either image .* or latents"),
        (dict(height=24), "height must be a multiple of 16"),
        (dict(prompt=["a", "b", "c"], image=[picture(32, 32, 0)] * 2), "one per prompt"),
    ],
)
def test_bad_img2img_arguments_are_refused_before_any_graph_runs(ort_pipes, guarded, kwargs, match):
    call = {"prompt": "a cat", "image": picture(32, 32, 0), **kwargs}
    with pytest.raises(ValueError, match=match):
        guarded(ort_pipes("sd1"))(**call)


def test_strength_without_an_image_is_refused(ort_pipes, guarded):
    with pytest.raises(ValueError, match="strength is for img2img: pass it with an image"):
        guarded(ort_pipes("sd1"))("a cat", strength=0.5)


def test_a_model_without_a_vae_encoder_is_a_clear_error(ort_pipes, guarded):
    pipe = guarded(ort_pipes("sd1"))
    pipe.backend.has_graph = lambda graph: graph != "vae_encoder"
    with pytest.raises(ValueError, match=r"image \(img2img\) needs the model's VAE encoder.*"
                       r"no vae_encoder graph \(vae_encoder/model.onnx\)"):  # fmt: skip
        pipe("a cat", image=picture(32, 32, 0))


def test_the_default_model_ships_its_vae_encoder():
    # Two opposite images, the same seed: the image decides at a low strength, and at strength
    # 1 the model's zero-terminal-SNR schedule keeps none of it. (Its int8-weight encoder
    # against diffusers: tests/test_default_model.py.)
    import fewstep

    pipe = Pipeline.from_pretrained(fewstep.default_model())
    image = picture(64, 64, 0)
    differences = []
    for strength in (0.3, 0.6, 1.0):
        a, b = (
            pipe("a red circle", image=x, strength=strength, seed=1, output_type="np").images
            for x in (image, 255 - image)
        )
        differences.append(float(np.abs(a - b).mean()))
    assert differences[0] > differences[1] > 0.1 and differences[2] == 0.0, differences


# --- the command line --------------------------------------------------------------------


def test_cli_image_and_strength_end_to_end(ort_pipes, tiny_package, tmp_path, capsys):
    from fewstep.cli import main

    source = tmp_path / "in.png"
    Image.fromarray(picture(48, 80, seed=2)).save(source)
    out = tmp_path / "out.png"
    argv = ["generate", "a cat", "--model", str(tiny_package("sd1")), "--image", str(source)]
    argv += ["--strength", "0.6", "--num-inference-steps", "5", "--seed", "3", "-o", str(out)]
    assert main(argv) == 0
    expected = ort_pipes("sd1")("a cat", image=source, strength=0.6, num_inference_steps=5, seed=3)
    with Image.open(out) as written:
        assert written.size == (80, 48)
        np.testing.assert_array_equal(np.asarray(written), np.asarray(expected.images[0]))
    parameters = read_parameters(out)
    assert parameters.endswith(", Denoising strength: 0.6"), parameters
    assert "Steps: 5, " in parameters and "Size: 80x48" in parameters


def test_cli_bad_image_and_lone_strength_are_one_line_errors(tiny_package, tmp_path, capsys):
    from fewstep.cli import main

    base = ["generate", "a cat", "--model", str(tiny_package("sd1")), "-o", str(tmp_path)]
    assert main([*base, "--image", str(tmp_path / "missing.png")]) == 2
    assert "error: image must be an image file" in capsys.readouterr().err
    assert main([*base, "--strength", "0.5"]) == 2
    assert "error: strength is for img2img" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
