"""`fewstep bench` runs end to end on the tiny model (its workers are real subprocesses), and
its stage timings mean the same thing on both sides; its SDXL models, with and without the
tiny autoencoder, run the same way with the small SDXL layout standing in for the mid one."""

import dataclasses
import inspect
import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from fewstep.benchmarks import pipeline_bench  # noqa: E402
from fewstep.benchmarks.pipeline_bench import format_table, run_bench  # noqa: E402
from fewstep.benchmarks.sdxl_models import TAESDXL, make_sdxl_model  # noqa: E402

# fewstep fp32 against diffusers fp32: the parity tests' tolerance on a 0..1 image
IMAGE_TOLERANCE = 1e-3


def test_tiny_bench_writes_comparable_results(tmp_path):
    out = tmp_path / "bench.json"
    backends = ["onnxruntime", "onnxruntime-unfused"]
    results = run_bench(["tiny"], [1, 2], 2, tmp_path / "work", out, backends=backends)
    assert json.loads(out.read_text()) == results
    entry = results["models"]["tiny"]
    assert list(entry["results"]) == ["diffusers", *backends]
    # attention fused on one side only
    assert entry["results"]["onnxruntime"]["fused_attention"]["unet"] > 0
    assert "fused_attention" not in entry["results"]["onnxruntime-unfused"]
    for side in entry["results"].values():
        stages = side["stages_ms"]
        # one text-encoding entry per timed image (diffusers' two calls summed), one VAE
        # decode per image, one U-Net entry per step
        assert stages["text_encoder"]["n"] == stages["vae_decoder"]["n"] == 4
        assert stages["unet_step"]["n"] == 2 * (1 + 2)
        assert side["cold_start_s"] > 0 and side["peak_rss_mb"] > 0
    assert set(entry["speedup"]["onnxruntime"]) == {"unet_step", "end_to_end_1", "end_to_end_2"}
    with pytest.raises(ValueError, match="backends"):
        run_bench(["tiny"], [1], 1, tmp_path / "work", None, backends=["tensorrt"])


def test_sdxl_bench_with_and_without_the_tiny_autoencoder(monkeypatch, tmp_path):
    """Both SDXL models, at the small size and 64²: diffusers runs StableDiffusionXLPipeline,
    both sides load the tiny autoencoder where asked (the package's VAE graphs, diffusers'
    `vae`), and both make the same image (text encoders, size conditioning and VAE alike)."""
    for name in ("sdxl-mid", "sdxl-mid-taesdxl"):
        small = dataclasses.replace(
            pipeline_bench.BENCH_MODELS[name],
            build=lambda path: make_sdxl_model(path, "small"),
            image_size=64,
        )
        monkeypatch.setitem(pipeline_bench.BENCH_MODELS, name, small)
    work = tmp_path / "work"
    models = ["sdxl-mid", "sdxl-mid-taesdxl"]
    results = run_bench(models, [1, 2], 1, work, tmp_path / "b.json", backends=["onnxruntime"])
    assert list(results["models"]) == models
    for name, vae_class in zip(models, ("AutoencoderKL", "AutoencoderTiny"), strict=True):
        entry = results["models"][name]
        assert entry["image_size"] == 64
        diffusers_side, fewstep_side = entry["results"].values()
        assert diffusers_side["pipeline"] == "StableDiffusionXLPipeline"
        assert diffusers_side["vae_class"] == fewstep_side["vae_class"] == vae_class
        assert set(entry["speedup"]["onnxruntime"]) == {"unet_step", "end_to_end_1", "end_to_end_2"}
        assert 0 <= entry["image_max_abs_diff"]["onnxruntime"] < IMAGE_TOLERANCE
        for side in (diffusers_side, fewstep_side):
            stages = side["stages_ms"]
            # one text-encoding entry per image (both encoders' calls summed), one U-Net per step
            assert stages["text_encoder"]["n"] == stages["vae_decoder"]["n"] == 2
            assert stages["unet_step"]["n"] == 1 + 2
    vae_config = json.loads(
        (work / "sdxl-mid-taesdxl-onnx" / "vae_decoder" / "config.json").read_text()
    )
    assert vae_config["_class_name"] == "AutoencoderTiny"
    plain_vae = json.loads((work / "sdxl-mid-onnx" / "vae_decoder" / "config.json").read_text())
    assert plain_vae["_class_name"] == "AutoencoderKL"
    # both variants share one diffusers folder; the tiny autoencoder has TAESDXL's layout
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == [
        "sdxl-mid",
        "sdxl-mid-onnx",
        "sdxl-mid-taesdxl-onnx",
        "taesdxl",
    ]
    for key, value in TAESDXL.items():
        assert vae_config[key] == (list(value) if isinstance(value, tuple) else value), key
    rows = format_table(results).splitlines()
    for name in models:  # a row per side, the backend's with its speedups
        assert sum(row.startswith(f"| {name} | diffusers |") for row in rows) == 1
        (row,) = [row for row in rows if row.startswith(f"| {name} | onnxruntime |")]
        assert row.count("×)") == 3


def test_taesdxl_layout_is_taesds():
    """diffusers' AutoencoderTiny defaults are TAESD's layout (taesdxl's shipped config)."""
    from diffusers import AutoencoderTiny

    defaults = {
        k: p.default for k, p in inspect.signature(AutoencoderTiny.__init__).parameters.items()
    }
    assert {k: defaults[k] for k in TAESDXL} == TAESDXL


def test_bench_without_the_export_extra_names_it(tmp_path):
    """The bench lives outside the exporter, yet still needs it: without torch, `fewstep bench`
    is one line naming the extra, before anything is built."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from fewstep.cli import main\n"
        f"sys.exit(main(['bench', '--models', 'tiny', '--workdir', {str(tmp_path / 'w')!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fewstep bench: error: fewstep bench needs the export extra" in proc.stderr
    assert "pip install 'fewstep[export]'" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_harness_commit_percentiles_and_host_timing(monkeypatch, tmp_path):
    """What every benchmark records through the harness: the commit sent (FEWSTEP_COMMIT wins
    over the checkout's HEAD), p50/p90 by linear interpolation, one timing per call."""
    import torch

    from fewstep.benchmarks import harness

    monkeypatch.setenv("FEWSTEP_COMMIT", "0123abc")
    assert harness.git_commit() == "0123abc"
    monkeypatch.delenv("FEWSTEP_COMMIT")
    assert harness.git_commit(tmp_path) is None  # not a checkout
    expected = {"p50": 2.5, "p90": pytest.approx(3.7), "n": 4}
    assert harness.percentiles([4.0, 1.0, 3.0, 2.0]) == expected

    calls = []
    timing = harness.wall_ms(lambda: calls.append("call"), 3, setup=lambda: calls.append("setup"))
    assert calls == ["setup", "call"] * 3 and timing["n"] == 3
    calls.clear()
    timing = harness.time_ms(lambda: calls.append("call"), 2, 5, torch.device("cpu"))
    assert len(calls) == 1 + 2 + 5 and timing["n"] == 5 and timing["first_call_ms"] >= 0
    out = harness.write_json(tmp_path / "a" / "r.json", {"x": 1})
    assert json.loads(out.read_text()) == {"x": 1}
