"""`fewstep bench` runs end to end on the tiny model (its workers are real subprocesses), and
its stage timings mean the same thing on both sides."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from fewstep.export.bench import run_bench  # noqa: E402


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
