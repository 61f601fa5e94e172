"""Every sampler family on every package backend (onnxruntime, openvino), fp32 and fp16
packages.

References: onnxruntime's images on the same package, seed and sampler (test_pipeline_parity.py
holds onnxruntime fp32 to diffusers); for fp16 packages also the fp32 package of the same
weights on onnxruntime. The packages: the tiny random-weight sd1 model exported in fp32
(conftest) and fp16 (here), and the bundled default model (fp16, v-prediction, LCM guidance
embedding), each sampler forced with `scheduler=`: one name per family (`SAMPLERS_RUN`; the
Karras and SDE variants differ only in numpy arithmetic the backends never see, and PNDM's
PRK warm-up needs more steps than these runs take), with two Karras schedules among them.

Tolerances. fp32: `parity.tolerance` (conftest), the max abs difference both backends keep to
diffusers (measured between the backends: at most 1.1e-5). fp16: a PSNR floor, as for bf16 in
test_openvino.py: onnxruntime computes an fp16 graph in fp16 while OpenVINO computes it in f32
from the fp16 weights, so they differ by fp16 rounding along the trajectory, and on the trained
default model a few edge pixels move by up to 0.066 while the image stays > 50 dB away; a
max abs bound would have to be loose enough to miss real faults. Measured (OpenVINO 2026.4.1,
onnxruntime 1.32, 2 steps, 64x64, 10 seeds x 4 prompts = 40 images per sampler, DDIM eta 0.5;
DDIM, LCM, Euler and Euler-ancestral):
    openvino vs onnxruntime, sd1 fp16 (CFG 7.5):    min 58.5 dB (DDIM), others >= 63.5 dB
    openvino vs onnxruntime, default model (fp16):  min 51.9 dB (DDIM), others >= 52.5 dB
    fp16 vs fp32 package, either backend, sd1:      min 56.3 dB (DDIM), others >= 62.3 dB
PLMS, Heun (Karras), DPM++ 2M SDE (Karras) and UniPC, one seed, the same runs: >= 64.9 dB in
all three comparisons. An unrelated image (another seed) is ~13 dB away. Each floor is the worst
measured minus 3 dB (twice the worst squared error), rounded down.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

import fewstep  # noqa: E402
from fewstep.backends.base import create_backend  # noqa: E402
from fewstep.cli import main  # noqa: E402
from fewstep.pipeline import Pipeline  # noqa: E402

PACKAGE_BACKENDS = ("onnxruntime", "openvino")
PACKAGES = ("sd1-fp32", "sd1-fp16", "default-fp16")
FP16_PSNR_FLOOR_DB = {"sd1-fp16": 55.0, "default-fp16": 48.0}
FP16_VS_FP32_PSNR_FLOOR_DB = 53.0
PROMPTS = ["a red circle on a blue background", "a green square"]
SAMPLERS_RUN = (
    "ddim",
    "lcm",
    "euler",
    "euler_ancestral",
    "plms",
    "heun_karras",
    "dpmpp_2m_sde_karras",
    "unipc",
)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of images in 0..1."""
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.fixture(scope="session")
def fp16_package(tiny_model, tmp_path_factory):
    """The tiny sd1 model exported as an fp16 package (graphs take and return fp16)."""
    from fewstep.export import export_package

    out = tmp_path_factory.mktemp("sd1-fp16-pkg") / "package"
    return export_package(tiny_model("sd1"), out, dtype="fp16", progress=False)


@pytest.fixture(scope="module")
def package_path(tiny_package, fp16_package):
    paths = {
        "sd1-fp32": lambda: tiny_package("sd1"),
        "sd1-fp16": lambda: fp16_package,
        "default-fp16": lambda: fewstep.default_model(),
    }
    return lambda package: paths[package]()


@pytest.fixture(scope="module")
def pipeline(package_path):
    """(backend, package) -> Pipeline, shared so each shape compiles once."""
    cache: dict = {}

    def get(backend: str, package: str) -> Pipeline:
        if (backend, package) not in cache:
            cache[backend, package] = Pipeline.from_pretrained(
                package_path(package), backend=backend
            )
        return cache[backend, package]

    return get


def generate(pipe: Pipeline, sampler: str, package: str) -> np.ndarray:
    kwargs = dict(
        num_inference_steps=2,
        height=64,
        width=64,
        seed=3,
        scheduler=sampler,
        eta=0.5 if sampler == "ddim" else 0.0,  # DDIM with noise: the same draws on each
        output_type="np",
    )
    if package.startswith("sd1"):
        kwargs["guidance_scale"] = 7.5  # CFG: the U-Net runs on a batch of 4
    out = pipe(PROMPTS, **kwargs)
    assert out.settings["sampler"] == sampler
    assert out.images.dtype == np.float32 and np.isfinite(out.images).all()
    return out.images


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("sampler", SAMPLERS_RUN)
def test_openvino_matches_onnxruntime(pipeline, parity, sampler, package, record_property):
    expected = generate(pipeline("onnxruntime", package), sampler, package)
    got = generate(pipeline("openvino", package), sampler, package)
    assert got.shape == expected.shape == (len(PROMPTS), 64, 64, 3)
    assert float(expected.std()) > 1e-3, "reference image is flat: the test would prove nothing"
    if package.endswith("fp32"):
        err = np.abs(got - expected)
        assert err.max() <= parity.tolerance, (
            f"max abs difference {err.max():.2e} at {np.unravel_index(err.argmax(), err.shape)}"
        )
    else:
        value = psnr_db(got, expected)
        record_property("psnr_db", value)
        assert value >= FP16_PSNR_FLOOR_DB[package], (
            f"{package} {sampler}: openvino vs onnxruntime PSNR {value:.1f} dB "
            f"< floor {FP16_PSNR_FLOOR_DB[package]} dB"
        )


@pytest.mark.parametrize("backend", PACKAGE_BACKENDS)
@pytest.mark.parametrize("sampler", SAMPLERS_RUN)
def test_fp16_package_matches_fp32_package(pipeline, backend, sampler, record_property):
    # Anchors fp16 to fp32 (and so to diffusers): a fault both backends shared would pass
    # the comparison between them.
    expected = generate(pipeline("onnxruntime", "sd1-fp32"), sampler, "sd1-fp32")
    got = generate(pipeline(backend, "sd1-fp16"), sampler, "sd1-fp16")
    value = psnr_db(got, expected)
    record_property("psnr_db", value)
    assert value >= FP16_VS_FP32_PSNR_FLOOR_DB, (
        f"{backend} {sampler}: fp16 vs fp32 PSNR {value:.1f} dB "
        f"< floor {FP16_VS_FP32_PSNR_FLOOR_DB} dB"
    )
    # And the fp16 package really ran in fp16: identical images would mean it did not.
    assert value < 90.0, f"{backend}: fp16 images equal fp32 ({value:.1f} dB)"


@pytest.mark.parametrize("backend", PACKAGE_BACKENDS)
def test_fp16_package_outputs_are_float32(fp16_package, backend):
    runner = create_backend(backend, fp16_package)
    rng = np.random.default_rng(0)
    outputs = {
        "text_encoder": runner.run("text_encoder", input_ids=np.ones((1, 77), np.int64)),
        "unet": runner.run(
            "unet",
            sample=rng.standard_normal((1, 4, 8, 8), dtype=np.float32),
            timestep=np.array(501.0, np.float32),
            encoder_hidden_states=rng.standard_normal((1, 77, 32), dtype=np.float32),
        ),
        "vae_decoder": runner.run(
            "vae_decoder", latent_sample=rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
        ),
    }
    dtypes = {f"{g}.{n}": a.dtype for g, out in outputs.items() for n, a in out.items()}
    assert dtypes and all(d == np.float32 for d in dtypes.values()), dtypes


def test_default_model_generates_with_openvino_from_the_cli(tmp_path):
    from PIL import Image

    paths = {}
    for backend in PACKAGE_BACKENDS:
        paths[backend] = tmp_path / f"{backend}.png"
        argv = ["generate", "a red circle", "--backend", backend, "--seed", "5"]
        assert main([*argv, "-o", str(paths[backend])]) == 0
    with Image.open(paths["openvino"]) as image:
        assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
        got = np.asarray(image, dtype=np.float32) / 255
    with Image.open(paths["onnxruntime"]) as image:
        expected = np.asarray(image, dtype=np.float32) / 255
    assert float(expected.std()) > 1e-3, "reference image is flat: the test would prove nothing"
    # (uint8 rounding included: measured >= 55.4 dB over 20 seeds, the default model's 4 steps)
    assert psnr_db(got, expected) >= FP16_PSNR_FLOOR_DB["default-fp16"]
