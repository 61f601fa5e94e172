"""Pipeline behaviour: input checks before any graph runs, determinism, package errors."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fewstep.package import PackageError
from fewstep.pipeline import Pipeline


@pytest.fixture(scope="module")
def sd1(tiny_package):
    return Pipeline.from_pretrained(tiny_package("sd1"))


@pytest.fixture(scope="module")
def lcm(tiny_package):
    return Pipeline.from_pretrained(tiny_package("lcm"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(height=60), "height must be a multiple of 16 for this model"),
        (dict(width=0), "width must be an integer >= 16, got 0"),
        (dict(height=-64), "height"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=1001), "num_inference_steps"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(guidance_scale=float("inf")), "guidance_scale"),
        (dict(num_images_per_prompt=-1), "num_images_per_prompt"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(latents=np.zeros((1, 4, 8, 9), np.float32)), "latents must have shape"),
        (dict(output_type="latent-ish"), "output_type"),
        (dict(scheduler="lms"), "scheduler"),
        (dict(eta=-0.5), "eta"),
        (dict(guidance_rescale=2.0), "guidance_rescale"),
        (dict(seed=-3), "seed"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_is_refused_before_any_graph_runs(sd1, guarded, kwargs, match):
    guarded = guarded(sd1)
    with pytest.raises(ValueError, match=match):
        guarded("a cat", **kwargs)


def test_lcm_refuses_more_steps_than_original_inference_steps(lcm, guarded):
    guarded = guarded(lcm)
    original = lcm.info.scheduler_config["original_inference_steps"]
    with pytest.raises(ValueError, match="num_inference_steps"):
        guarded("a cat", num_inference_steps=original + 1)


def test_same_seed_same_image_and_other_seed_differs(sd1):
    a = sd1("a red cat", num_inference_steps=2, seed=5, output_type="np").images
    b = sd1("a red cat", num_inference_steps=2, seed=5, output_type="np").images
    c = sd1("a red cat", num_inference_steps=2, seed=6, output_type="np").images
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_family_defaults_and_pil_output(sd1, lcm):
    out = sd1("a cat", num_inference_steps=2, seed=0)
    assert out.images[0].size == (sd1.info.default_width, sd1.info.default_height)
    floats = sd1("a cat", num_inference_steps=2, seed=0, output_type="np").images
    # diffusers' numpy_to_pil of the float images
    np.testing.assert_array_equal(np.asarray(out.images[0]), (floats[0] * 255).round())
    assert out.settings["guidance_scale"] == 7.5
    assert lcm.info.default_num_inference_steps == 4
    assert lcm.info.guidance_embedding_dim is not None


def test_long_prompt_is_truncated_with_a_warning(sd1, caplog):
    long_prompt = " ".join(["cat"] * 100)
    truncated = " ".join(["cat"] * 75)
    with caplog.at_level(logging.WARNING):
        ids = sd1.tokenizer([long_prompt])
    assert "truncated" in caplog.text
    assert np.array_equal(ids, sd1.tokenizer([truncated]))


def test_tokenizer_matches_transformers(tiny_model, tiny_package):
    transformers = pytest.importorskip("transformers")
    from fewstep.tokenizer import CLIPTokenizer

    prompts = [
        "a red cat",
        "A  Photo of   THE dog, 4k!!",
        "don't stop: caf\u00e9 \u65e5\u672c",
        "",
        " ".join(["green"] * 90),
    ]
    for family in ("sd1", "sd2"):
        reference = transformers.CLIPTokenizer.from_pretrained(tiny_model(family) / "tokenizer")
        expected = reference(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np"
        ).input_ids
        for folder in (tiny_model(family) / "tokenizer", tiny_package(family) / "tokenizer"):
            ours = CLIPTokenizer.from_folder(folder)
            assert np.array_equal(ours(prompts), expected), (family, folder)


def test_missing_package_file_is_named(tiny_package, tmp_path):
    broken = tmp_path / "pkg"
    shutil.copytree(tiny_package("sd1"), broken)
    (broken / "unet" / "model.onnx").unlink()
    with pytest.raises(PackageError, match="unet/model.onnx"):
        Pipeline.from_pretrained(broken)


def test_corrupt_package_file_is_named(tiny_package, tmp_path):
    broken = tmp_path / "pkg"
    shutil.copytree(tiny_package("sd1"), broken)
    target = broken / "vae_decoder" / "model.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="vae_decoder/model.onnx"):
        Pipeline.from_pretrained(broken)


def test_corrupt_config_is_named(tiny_package, tmp_path):
    broken = tmp_path / "pkg"
    shutil.copytree(tiny_package("sd1"), broken)
    (broken / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(PackageError, match="scheduler_config.json"):
        Pipeline.from_pretrained(broken, check_hashes=False)


def test_onnxruntime_path_never_imports_torch(tiny_package):
    code = f"""
import sys, json
from fewstep.pipeline import Pipeline
pipe = Pipeline.from_pretrained({str(tiny_package("sd1"))!r})
pipe("a red cat", num_inference_steps=2, seed=1)
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print(json.dumps(heavy))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


class CountingSync:
    """A backend's array_ops that count how often the pipeline waits for the device."""

    def __init__(self, ops):
        self._ops, self.waits = ops, 0

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def synchronize(self):
        self.waits += 1


def test_the_device_is_waited_on_only_when_timings_are_asked(sd1, monkeypatch):
    counting = CountingSync(sd1.backend.array_ops)
    monkeypatch.setattr(sd1.backend, "array_ops", counting)
    out = sd1("a cat", num_inference_steps=3, seed=0, output_type="np")
    assert counting.waits == 0 and set(out.timings_ms) == {"total"}
    timed = sd1("a cat", num_inference_steps=3, seed=0, output_type="np", timings=True)
    # After the text encoder; 3 around each U-Net call: PLMS makes n + 1 = 4 for 3 steps.
    assert timed.settings["unet_calls"] == 4
    assert counting.waits == 1 + 3 * 4
    assert len(timed.timings_ms["sampler_step"]) == len(timed.timings_ms["unet_call"]) == 4
    assert {"text_encoder", "vae_decoder", "total"} <= set(timed.timings_ms)
    np.testing.assert_array_equal(out.images, timed.images)
