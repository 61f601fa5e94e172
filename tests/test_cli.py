"""The command line end to end: every generation flag reaches the pipeline, every failure is
one line naming its cause (exit 2 for the user's, 1 for fewstep's), and output files are
checked before generating, written in the format their name says, and never replaced unasked.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import piexif
import piexif.helper
import pytest
from PIL import Image

import fewstep
from fewstep.cli import main
from fewstep.pipeline import Pipeline

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def sd1_package(tiny_package):
    return tiny_package("sd1")


@pytest.fixture(scope="module")
def sd1(sd1_package):
    return Pipeline.from_pretrained(sd1_package)


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def api_image(pipe, **kwargs):
    call = {"num_inference_steps": 2, "seed": 3, **kwargs}
    return [np.asarray(image) for image in pipe(PROMPT, **call).images]


# (flag and value, the pipeline argument it stands for). The base call always passes
# --num-inference-steps 2 --seed 3; eta is only read by DDIM, so its case picks DDIM.
FLAGS = [
    (["--negative-prompt", "blurry"], {"negative_prompt": "blurry"}),
    (["--num-inference-steps", "3"], {"num_inference_steps": 3}),
    (["--guidance-scale", "2.5"], {"guidance_scale": 2.5}),
    (["--height", "48"], {"height": 48}),
    (["--width", "48"], {"width": 48}),
    (["--num-images-per-prompt", "2"], {"num_images_per_prompt": 2}),
    (["--seed", "4"], {"seed": 4}),
    (["--scheduler", "euler_ancestral"], {"scheduler": "euler_ancestral"}),
    (["--scheduler", "DPM++ 2M Karras"], {"scheduler": "dpmpp_2m_karras"}),  # A1111's name
    (["--scheduler", "ddim", "--eta", "1.0"], {"scheduler": "ddim", "eta": 1.0}),
    (["--guidance-rescale", "0.7"], {"guidance_rescale": 0.7}),
]


@pytest.mark.parametrize(
    "flag,kwargs", FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_each_generation_flag_reaches_the_pipeline(sd1, sd1_package, tmp_path, flag, kwargs):
    out = tmp_path / "out.png"
    argv = ["generate", PROMPT, "--model", str(sd1_package), "-o", str(out)]
    assert main([*argv, "--num-inference-steps", "2", "--seed", "3", *flag]) == 0
    expected = api_image(sd1, **kwargs)
    written = [out, tmp_path / "out-1.png"][: len(expected)]
    assert sorted(tmp_path.iterdir()) == sorted(written)
    for path, image in zip(written, expected, strict=True):
        np.testing.assert_array_equal(pixels(path), image)
    # The flag matters: without it the images differ (so dropping it would be caught).
    without = {"scheduler": "ddim"} if "eta" in kwargs else {}
    baseline = api_image(sd1, **without)
    assert len(baseline) != len(expected) or any(
        b.shape != e.shape or np.abs(b.astype(int) - e).max() > 0
        for b, e in zip(baseline, expected, strict=True)
    )


def test_backend_and_precision_flags_reach_the_backend(sd1_package, tmp_path, capsys):
    out = tmp_path / "ov.png"
    argv = ["generate", PROMPT, "--model", str(sd1_package), "--num-inference-steps", "2"]
    argv += ["--seed", "3", "-o", str(out), "--backend", "openvino", "--precision", "fp32"]
    assert main(argv) == 0
    ov = Pipeline.from_pretrained(sd1_package, backend="openvino", precision="fp32")
    np.testing.assert_array_equal(pixels(out), api_image(ov)[0])
    # onnxruntime takes no precision: forwarding it is what makes this an error.
    argv = ["generate", PROMPT, "--model", str(sd1_package), "--precision", "fp32"]
    assert main([*argv, "-o", str(tmp_path / "ort.png")]) == 2
    assert "takes no option ['precision']" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max-steps", "1"], "num_inference_steps must be an integer between 1 and 1, got 2"),
        (["--max-pixels", "1000"], "at most 1000 pixels"),
        (["--num-images-per-prompt", "3", "--max-images", "2"], "at most 2 images"),
        (["--eta", "1.5"], "eta must be a number between 0 and 1"),
    ],
)
def test_limits_and_ranges_are_errors_before_generating(
    sd1_package, tmp_path, capsys, flags, message
):
    argv = ["generate", PROMPT, "--model", str(sd1_package), "--num-inference-steps", "2"]
    assert main([*argv, "-o", str(tmp_path / "x.png"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fewstep generate: error: ") and message in err
    assert list(tmp_path.iterdir()) == []


# -- failures: one line naming the culprit ------------------------------------------------------


def _package_copy(source, tmp_path):
    """A copy without fewstep.json, as optimum writes them: its files are then parsed, not
    refused by their hashes first."""
    package = tmp_path / "package"
    shutil.copytree(source, package)
    (package / "fewstep.json").unlink()
    return package


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


CORRUPTIONS = {
    "tokenizer.json": lambda p: (p / "tokenizer" / "tokenizer.json").write_text('{"model": 3}'),
    "special_tokens_map.json": lambda p: (p / "tokenizer" / "special_tokens_map.json").write_text(
        "{not json"
    ),
    "in_channels": lambda p: _edit_json(p / "unet" / "config.json", in_channels="four"),
    "beta_start": lambda p: _edit_json(
        p / "scheduler" / "scheduler_config.json", beta_start=-0.1, beta_schedule="linear"
    ),
    "trained_betas": lambda p: _edit_json(
        p / "scheduler" / "scheduler_config.json", num_train_timesteps=2, trained_betas=[0.5, 1.5]
    ),
    "num_train_timesteps": lambda p: _edit_json(
        p / "scheduler" / "scheduler_config.json", num_train_timesteps=10**12
    ),
    "sample_size": lambda p: _edit_json(p / "unet" / "config.json", sample_size=[64]),
    "scaling_factor": lambda p: _edit_json(p / "vae_decoder" / "config.json", scaling_factor="x"),
    "merges.txt": lambda p: (
        (p / "tokenizer" / "tokenizer.json").unlink(),
        (p / "tokenizer" / "merges.txt").write_text("#version: 0.2\na b c\n"),
    ),
}


@pytest.mark.parametrize("culprit", list(CORRUPTIONS))
def test_a_corrupt_package_is_one_line_naming_the_file(sd1_package, tmp_path, capsys, culprit):
    package = _package_copy(sd1_package, tmp_path)
    CORRUPTIONS[culprit](package)
    out = tmp_path / "x.png"
    assert main(["generate", PROMPT, "--model", str(package), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fewstep generate: error: "), err
    assert culprit in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["generate", "info"])
def test_a_manifest_whose_files_is_a_list_is_one_line(sd1_package, tmp_path, capsys, command):
    package = tmp_path / "package"
    shutil.copytree(sd1_package, package)
    _edit_json(package / "fewstep.json", files=["unet/model.onnx"])
    generate = ["generate", PROMPT, "--model", str(package), "-o", str(tmp_path / "x.png")]
    assert main(generate if command == "generate" else ["info", str(package)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fewstep {command}: error: ")
    assert "fewstep.json" in err


def test_verbose_adds_the_traceback(sd1_package, tmp_path, capsys):
    package = _package_copy(sd1_package, tmp_path)
    CORRUPTIONS["in_channels"](package)
    argv = ["generate", PROMPT, "--model", str(package), "-o", str(tmp_path / "x.png")]
    assert main(["-v", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("fewstep generate: error: ")


def test_an_internal_failure_exits_1_with_one_line(monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise KeyError("unet")

    monkeypatch.setattr(Pipeline, "from_pretrained", broken)
    assert main(["generate", PROMPT, "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err == (
        "fewstep generate: error: internal error (KeyError): 'unet' "
        "(run with -v for the traceback)\n"
    )


def test_a_missing_model_is_a_user_error(tmp_path, capsys):
    assert main(["generate", PROMPT, "--model", str(tmp_path / "nothing")]) == 2
    assert "model package not found" in capsys.readouterr().err


# -- output files ---------------------------------------------------------------------------------


def test_output_to_a_folder_writes_inside_it_and_never_replaces(tmp_path, capsys):
    argv = ["generate", PROMPT, "--seed", "1", "-o", str(tmp_path)]
    assert main(argv) == 0
    assert main(argv) == 0
    assert main([*argv, "--num-images-per-prompt", "2"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["image-1.png", "image-2.png", "image-3.png", "image.png"]
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'image-1.png'} " in printed
    assert f"wrote {tmp_path / 'image-2.png'}, {tmp_path / 'image-3.png'} " in printed
    # seed 1 each time: the first two are the same image, both kept.
    np.testing.assert_array_equal(pixels(tmp_path / "image.png"), pixels(tmp_path / "image-1.png"))


def test_overwrite_replaces(tmp_path):
    out = tmp_path / "a.png"
    assert main(["generate", PROMPT, "--seed", "1", "-o", str(out)]) == 0
    assert main(["generate", PROMPT, "--seed", "2", "-o", str(out), "--overwrite"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    expected = Pipeline.from_pretrained(fewstep.default_model())(PROMPT, seed=2).images[0]
    np.testing.assert_array_equal(pixels(out), np.asarray(expected))


@pytest.mark.parametrize(
    "output,message",
    [("missing/x.png", "output folder"), ("x.gif", "output must end in one of"), ("x", "output")],
)
def test_a_bad_output_is_an_error_before_generating(monkeypatch, tmp_path, capsys, output, message):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(Pipeline, "from_pretrained", must_not_run)
    assert main(["generate", PROMPT, "-o", str(tmp_path / output)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix,fmt", [(".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")])
def test_jpeg_and_webp_are_written_as_such_with_a1111_parameters(tmp_path, suffix, fmt):
    out = tmp_path / f"cat{suffix}"
    argv = ["generate", PROMPT, "--seed", "5", "--negative-prompt", "blurry, ünïcode"]
    assert main([*argv, "-o", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == fmt
    # Read back the way A1111's web UI reads them (piexif).
    exif = piexif.load(str(out))
    text = piexif.helper.UserComment.load(exif["Exif"][piexif.ExifIFD.UserComment])
    assert text.startswith(f"{PROMPT}\nNegative prompt: blurry, ünïcode\nSteps: 4, Sampler: LCM")
    assert "Seed: 5, Size: 64x64" in text
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left
    reference = Pipeline.from_pretrained(fewstep.default_model())(PROMPT, seed=5).images[0]
    assert np.abs(pixels(out).astype(int) - np.asarray(reference)).mean() < 8  # lossy, q=95
