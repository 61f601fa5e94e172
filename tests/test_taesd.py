"""Tiny autoencoders (diffusers' AutoencoderTiny: TAESD) as a package's VAE.

References: diffusers' AutoencoderTiny called through its own `decode`/`encode`, and diffusers'
StableDiffusionPipeline / StableDiffusionImg2ImgPipeline given `vae=AutoencoderTiny(...)`, in
torch fp32 on the tiny random-weight models (fewstep.export.testing); fewstep runs the package
exported with `--vae` on onnxruntime, and the diffusers folder on torch with `vae=`. Images
within 1e-3 on a 0..1 scale, as the other parity tests.

A tiny VAE's encoder gives latents, not a distribution: diffusers draws no noise for them, so
the first noise of an img2img call is the one `add_noise` adds. Drawing one for a sample first
(as for AutoencoderKL) shifts every later draw, which the ancestral sampler's case catches.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

import fewstep.export.package_writer as package_writer
from fewstep import cli
from fewstep.export import export_package
from fewstep.export.testing import make_tiny_autoencoder
from fewstep.package import TINY_VAE_CLASS, read_manifest, read_model_info
from fewstep.pipeline import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import TorchNoise  # noqa: E402

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    return make_tiny_autoencoder(tmp_path_factory.mktemp("taesd") / "taesd", "sd1")


@pytest.fixture(scope="module")
def taesd_package(tiny_model, taesd, tmp_path_factory):
    """The tiny SD 1.x model exported with the tiny autoencoder, through the CLI flag."""
    out = tmp_path_factory.mktemp("taesd-pkg") / "package"
    assert cli.main(["export", str(tiny_model("sd1")), str(out), "--vae", str(taesd)]) == 0
    return out


@pytest.fixture(scope="module")
def reference_vae(taesd):
    return diffusers.AutoencoderTiny.from_pretrained(taesd).eval()


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --- the package -------------------------------------------------------------------------


def test_package_records_the_tiny_autoencoder(taesd_package, taesd):
    info = read_model_info(taesd_package)
    assert info.vae_class == TINY_VAE_CLASS
    assert info.vae_scaling_factor == 1.0  # not the source VAE's 0.18215
    assert info.vae_scale_factor == 8
    manifest = read_manifest(taesd_package)
    assert manifest["vae_class"] == TINY_VAE_CLASS
    assert manifest["vae_scaling_factor"] == 1.0
    assert manifest["source"]["vae"] == str(taesd.resolve())
    assert [o["name"] for o in manifest["graphs"]["vae_encoder"]["outputs"]] == ["latents"]
    for graph in ("vae_decoder", "vae_encoder"):
        config = json.loads((taesd_package / graph / "config.json").read_text())
        assert config == json.loads((taesd / "config.json").read_text())
    index = json.loads((taesd_package / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", TINY_VAE_CLASS]


@torch.no_grad()
def test_decoder_graph_matches_diffusers(taesd_package, reference_vae):
    latents = np.random.default_rng(0).standard_normal((2, 4, 6, 10), dtype=np.float32)
    (got,) = _session(taesd_package / "vae_decoder" / "model.onnx").run(
        None, {"latent_sample": latents}
    )
    expected = reference_vae.decode(torch.from_numpy(latents)).sample.numpy()
    assert got.shape == expected.shape == (2, 3, 48, 80)
    assert float(np.abs(got - expected).max()) <= 1e-4 * float(np.abs(expected).max())


@torch.no_grad()
def test_encoder_graph_gives_the_latents_diffusers_gives(taesd_package, reference_vae):
    images = np.random.default_rng(1).uniform(-1, 1, (2, 3, 48, 80)).astype(np.float32)
    session = _session(taesd_package / "vae_encoder" / "model.onnx")
    assert [o.name for o in session.get_outputs()] == ["latents"]
    (got,) = session.run(None, {"sample": images})
    expected = reference_vae.encode(torch.from_numpy(images)).latents.numpy()
    assert got.shape == expected.shape == (2, 4, 6, 10)
    assert float(np.abs(got - expected).max()) <= 1e-4 * float(np.abs(expected).max())


# --- whole pipelines against diffusers ----------------------------------------------------


def _max_error(got: np.ndarray, expected: np.ndarray) -> float:
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert float(expected.std()) > 1e-3, "reference image is flat: the test would prove nothing"
    return float(np.abs(got - expected).max())


def _diffusers_pipe(cls, folder, vae, scheduler):
    pipe = cls.from_pretrained(folder, vae=vae, safety_checker=None)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(3)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return (base + rng.integers(0, 56, (height, width, 3))).astype(np.uint8)


def test_txt2img_matches_diffusers_with_the_tiny_autoencoder(
    taesd_package, tiny_model, reference_vae
):
    common = dict(
        negative_prompt=["ugly"],
        num_inference_steps=4,
        guidance_scale=7.5,
        height=64,
        width=96,
        output_type="np",
    )
    pipe = _diffusers_pipe(
        diffusers.StableDiffusionPipeline, tiny_model("sd1"), reference_vae, "DDIMScheduler"
    )
    expected = pipe(["a red cat"], generator=torch.Generator().manual_seed(5), **common).images
    ours = Pipeline.from_pretrained(taesd_package)
    got = ours(["a red cat"], generator=TorchNoise(5), scheduler="ddim", **common).images
    assert _max_error(got, expected) <= TOLERANCE


IMG2IMG = dict(
    negative_prompt=["ugly", "ugly"],
    num_inference_steps=4,
    strength=0.75,
    guidance_scale=7.5,
    output_type="np",
)


def _img2img_reference(tiny_model, reference_vae, image):
    pipe = _diffusers_pipe(
        diffusers.StableDiffusionImg2ImgPipeline,
        tiny_model("sd1"),
        reference_vae,
        "EulerAncestralDiscreteScheduler",
    )
    generator = torch.Generator().manual_seed(9)
    return pipe(["a cat", "a dog"], image=image, generator=generator, **IMG2IMG).images


def test_img2img_matches_diffusers_with_the_tiny_autoencoder(
    taesd_package, tiny_model, reference_vae
):
    from PIL import Image

    image = Image.fromarray(picture(64, 64))
    expected = _img2img_reference(tiny_model, reference_vae, image)
    ours = Pipeline.from_pretrained(taesd_package)
    got = ours(
        ["a cat", "a dog"], image=image, generator=TorchNoise(9), scheduler="euler_ancestral",
        **IMG2IMG,
    ).images  # fmt: skip
    assert _max_error(got, expected) <= TOLERANCE


def test_torch_backend_runs_the_tiny_autoencoder_as_diffusers(
    tiny_model, taesd, reference_vae, one_torch_thread
):
    from PIL import Image

    image = Image.fromarray(picture(64, 64))
    expected = _img2img_reference(tiny_model, reference_vae, image)
    ours = Pipeline.from_pretrained(tiny_model("sd1"), backend="torch", vae=taesd)
    assert ours.info.vae_class == TINY_VAE_CLASS and ours.info.vae_scaling_factor == 1.0
    got = ours(
        ["a cat", "a dog"], image=image, generator=TorchNoise(9), scheduler="euler_ancestral",
        **IMG2IMG,
    ).images  # fmt: skip
    assert _max_error(got, expected) <= TOLERANCE


# --- bad tiny autoencoder folders -----------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the source was loaded before the vae folder was checked")

    monkeypatch.setattr(package_writer, "load_source", fail)


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _pickle_only(folder):
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "diffusion_pytorch_model.bin")


def _config_outside(folder):
    outside = folder.parent / "elsewhere.json"
    shutil.move(folder / "config.json", outside)
    (folder / "config.json").symlink_to(outside)


BAD_FOLDERS = {
    "class": (
        lambda f: _edit_config(f, _class_name="AutoencoderKL"),
        r"config.json: _class_name must be one of \('AutoencoderTiny',\), got 'AutoencoderKL'",
    ),
    "no-class": (
        lambda f: _edit_config(f, _class_name=None),
        r"_class_name must be one of \('AutoencoderTiny',\), got '\(absent\)'",
    ),
    "latent-channels": (
        lambda f: _edit_config(f, latent_channels=16),
        r"latent_channels must be one of \(4,\), got 16",
    ),
    "scale": (
        lambda f: _edit_config(
            f, encoder_block_out_channels=[8, 8, 8], num_encoder_blocks=[1, 1, 1]
        ),
        "encoder_block_out_channels has 3 entries, a scale of 4; the model's VAE scales by 8",
    ),
    "blocks": (
        lambda f: _edit_config(f, num_decoder_blocks=[1, 1]),
        r"num_decoder_blocks \(\[1, 1\]\) must have one entry per decoder_block_out_channels",
    ),
    "upsampling": (
        lambda f: _edit_config(f, upsampling_scaling_factor=3),
        r"upsampling_scaling_factor must be one of \(2,\), got 3",
    ),
    "act": (lambda f: _edit_config(f, act_fn="evil"), "act_fn must be one of .*got 'evil'"),
    "scaling": (
        lambda f: _edit_config(f, scaling_factor=0),
        "scaling_factor must be a number > 0, got 0",
    ),
    "pickle": (
        _pickle_only,
        r"vae: missing .*diffusion_pytorch_model.safetensors \(diffusion_pytorch_model.bin is "
        "a pickle",
    ),
    "no-config": (lambda f: (f / "config.json").unlink(), "missing package file: .*config.json"),
    "link-out": (_config_outside, "vae: the config 'config.json' resolves to .*outside"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_tiny_autoencoders_are_refused_before_loading(
    case, tiny_model, taesd, tmp_path, no_loading
):
    folder = tmp_path / "vae"
    shutil.copytree(taesd, folder)
    spoil, match = BAD_FOLDERS[case]
    spoil(folder)
    with pytest.raises(ValueError, match=match):
        export_package(tiny_model("sd1"), tmp_path / "pkg", vae=folder, progress=False)
    assert not (tmp_path / "pkg").exists()


def test_missing_folder_is_named_by_the_cli(tiny_model, tmp_path, capsys, no_loading):
    code = cli.main(["export", str(tiny_model("sd1")), str(tmp_path / "pkg"), "--vae", "nope"])
    assert code != 0
    assert "vae must be a diffusers AutoencoderTiny folder" in capsys.readouterr().err
    assert not (tmp_path / "pkg").exists()


def test_torch_backend_refuses_a_bad_tiny_autoencoder_before_loading(tiny_model, taesd, tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(taesd, folder)
    _edit_config(folder, latent_channels=16)
    with pytest.raises(ValueError, match="latent_channels must be one of"):
        Pipeline.from_pretrained(tiny_model("sd1"), backend="torch", vae=folder)


def test_scaling_factor_defaults_to_diffusers_own_for_a_tiny_autoencoder(
    tiny_model, taesd, tmp_path
):
    folder = tmp_path / "vae"
    shutil.copytree(taesd, folder)
    _edit_config(folder, scaling_factor=None)
    info = read_model_info(tiny_model("sd1"), vae=folder)
    assert (
        info.vae_scaling_factor
        == diffusers.AutoencoderTiny.from_pretrained(folder).config.scaling_factor
    )
