"""SDXL img2img against diffusers' StableDiffusionXLImg2ImgPipeline, on every backend.

Reference: diffusers' StableDiffusionXLImg2ImgPipeline built from the tiny SDXL folder (base
SDXL: `requires_aesthetics_score` off, so the time ids are original size + crop + target
size, by default the input image's size), and the pipeline AutoPipelineForImage2Image makes
of the SDXL-Turbo folder (the same class; Euler-ancestral, trailing), in torch fp32. fewstep
runs the exported package on onnxruntime and OpenVINO (conftest's `sdxl_package` and
`turbo_package`) and the folder itself on the torch backend. Images within conftest's image
tolerance, from the same noise (img2img_parity.py's runner and cases: conftest's TorchNoise
behind both).

Where fewstep and diffusers' SDXL img2img part (fewstep.prompt_sdxl: the negative crop, a
lone negative size), the cases stay on what both do alike.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import IMAGE_TOLERANCE, max_error  # noqa: E402
from img2img_parity import Case, Img2ImgParity, picture  # noqa: E402
from sdxl_parity import NEGATIVE_SIZES, SIZES  # noqa: E402

from fewstep.pipeline import Pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sdxl_img2img_reference(folder, family: str):
    """diffusers' SDXL img2img pipeline of a tiny folder, as its users make it."""
    if family == "sdxl_turbo":  # SDXL-Turbo's documented img2img entry point
        pipe = diffusers.AutoPipelineForImage2Image.from_pretrained(folder, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(
            folder, add_watermarker=False
        )
    assert isinstance(pipe, diffusers.StableDiffusionXLImg2ImgPipeline)
    assert pipe.config.requires_aesthetics_score is False and pipe.vae.config.force_upcast
    pipe.set_progress_bar_config(disable=True)
    return pipe


class SDXLImg2ImgParity(Img2ImgParity):
    """img2img_parity's runner on diffusers' SDXL img2img pipelines; `run`'s keywords (SDXL's
    size conditioning, guidance_rescale …) go to both sides."""

    def __init__(self, tiny_model):
        super().__init__(tiny_model)
        self.extra: dict = {}

    def reference(self, family: str, sampler: str | None, skip: int):
        if family not in self._pipes:
            self._pipes[family] = sdxl_img2img_reference(self._tiny_model(family), family)
        return functools.partial(super().reference(family, sampler, skip), **self.extra)

    def run(self, ours, case, **extra):
        self.extra = extra
        return super().run(functools.partial(ours, **extra), case)


@pytest.fixture(scope="module")
def sdxl_parity(tiny_model):
    return SDXLImg2ImgParity(tiny_model)


@pytest.fixture(scope="module")
def sdxl_pipes(tiny_model, sdxl_package, turbo_package):
    """(family, backend) -> Pipeline: the exported package on onnxruntime and OpenVINO, the
    diffusers folder on torch."""
    packages = {"sdxl": sdxl_package, "sdxl_turbo": turbo_package}
    cache: dict[tuple[str, str], Pipeline] = {}

    def get(family: str, backend: str) -> Pipeline:
        if (family, backend) not in cache:
            if backend == "openvino":
                pytest.importorskip("openvino")
            source = tiny_model(family) if backend == "torch" else packages[family]
            cache[family, backend] = Pipeline.from_pretrained(source, backend=backend)
        return cache[family, backend]

    return get


CASES = [
    # 71×101 → 64×96 on both sides: the time ids are the resized image's size
    Case("sdxl-ddim-cfg-resized", "sdxl", "ddim", 5, 0.6, 5.0, size=(71, 101)),
    Case("sdxl-euler-default-two-prompts", "sdxl", None, 4, 0.5, 5.0, ("a cat", "a dog"),
         images="pils", size=(64, 96)),
    Case("sdxl-eulera-n2-generator-each", "sdxl", "euler_ancestral", 4, 0.75, 5.0, per_prompt=2,
         generators="each", size=(96, 64)),
    Case("sdxl-dpmpp2m-float-nocfg", "sdxl", "dpmpp_2m", 6, 0.5, 1.0, images="float"),
    # SDXL-Turbo's img2img: strength 0.5 of 2 steps, no guidance
    Case("turbo-2step", "sdxl_turbo", None, 2, 0.5, 0.0),
]  # fmt: skip
CASES_BY_ID = {case.id: case for case in CASES}
BACKEND_CASES = [
    *(pytest.param("onnxruntime", case.id, id=f"onnxruntime-{case.id}") for case in CASES),
    *(pytest.param("torch", case.id, id=f"torch-{case.id}") for case in CASES),
    *(pytest.param("openvino", i, id=f"openvino-{i}") for i in ("sdxl-ddim-cfg-resized",
                                                                 "turbo-2step")),
]  # fmt: skip


@pytest.mark.parametrize(("backend", "case_id"), BACKEND_CASES)
def test_img2img_matches_diffusers(sdxl_pipes, sdxl_parity, backend, case_id):
    case = CASES_BY_ID[case_id]
    got, expected = sdxl_parity.run(sdxl_pipes(case.family, backend), case)
    err = max_error(got, expected)
    print(f"{case.id}: {backend} vs diffusers max abs error {err:.2e}")
    assert err <= IMAGE_TOLERANCE


SIZE_CALLS = {
    # the positive size conditioning, crop included; the negative half gets the same
    "sizes": dict(SIZES),
    # negative sizes at their default crop (0, 0), and guidance rescale
    "negative-sizes-rescale": dict(
        original_size=(128, 96),
        target_size=(64, 96),
        **{k: v for k, v in NEGATIVE_SIZES if k != "negative_crops_coords_top_left"},
        guidance_rescale=0.7,
    ),
}


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("call", list(SIZE_CALLS))
def test_size_conditioning_matches_diffusers(sdxl_pipes, sdxl_parity, backend, call):
    case = Case(f"sdxl-{call}", "sdxl", "ddim", 4, 0.5, 5.0, ("a cat", "a dog"), size=(64, 96))
    got, expected = sdxl_parity.run(sdxl_pipes("sdxl", backend), case, **SIZE_CALLS[call])
    assert max_error(got, expected) <= IMAGE_TOLERANCE
    plain, _ = sdxl_parity.run(sdxl_pipes("sdxl", backend), case)
    assert float(np.abs(plain - got).max()) > 10 * IMAGE_TOLERANCE  # the sizes mattered


def test_the_size_conditioning_is_the_image_size(sdxl_pipes):
    """By default, the size the image is encoded at: its own (rounded down to the model's
    multiple) or the height and width the call resizes it to."""
    pipe = sdxl_pipes("sdxl", "onnxruntime")
    image = picture(71, 101, seed=2)
    call = dict(image=image, strength=0.5, num_inference_steps=2, seed=1, output_type="np")
    settings = pipe("a cat", **call).settings
    assert settings["original_size"] == settings["target_size"] == [64, 96]
    assert settings["negative_original_size"] == [64, 96]
    resized = pipe("a cat", height=96, width=64, **call)
    assert resized.images.shape == (1, 96, 64, 3)
    assert resized.settings["original_size"] == resized.settings["target_size"] == [96, 64]


def test_a_lone_negative_size_is_refused_in_img2img_too(sdxl_pipes, guarded):
    """diffusers' SDXL img2img fills it from the positive size, its text-to-image pipeline
    ignores it; fewstep refuses it either way (fewstep.prompt_sdxl), before any graph runs."""
    pipe = guarded(sdxl_pipes("sdxl", "onnxruntime"))
    call = dict(image=picture(64, 64, seed=0), strength=0.5, num_inference_steps=2)
    with pytest.raises(ValueError, match="negative_original_size needs negative_target_size"):
        pipe("a cat", negative_original_size=(64, 64), **call)
    with pytest.raises(guarded.GraphRan):
        pipe("a cat", **call)


@pytest.mark.parametrize("family", ["sdxl", "sdxl_turbo"])
def test_default_strength_is_diffusers(sdxl_pipes, family):
    """Without `strength`, the default of diffusers' img2img pipeline for the family (SDXL's
    is 0.3, where the SD ones default to 0.8)."""
    reference = diffusers.StableDiffusionXLImg2ImgPipeline.__call__
    expected = inspect.signature(reference).parameters["strength"]
    pipe = sdxl_pipes(family, "onnxruntime")
    call = dict(image=picture(64, 64, seed=3), num_inference_steps=4, seed=1, output_type="np")
    assert pipe("a cat", **call).settings["strength"] == expected.default
