"""The whole pipeline against diffusers' pipelines on the same weights, latents and noise.

Reference: diffusers' StableDiffusionPipeline (DDIM, Euler, Euler-ancestral
schedulers) and LatentConsistencyModelPipeline, run in torch fp32 on the tiny
random-weight models; fewstep runs the exported ONNX package on onnxruntime.
The cases and the comparison are conftest's (`parity_case`, `parity`), shared with the
torch backend's parity tests.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

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
