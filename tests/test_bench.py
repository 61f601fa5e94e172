"""`fewstep bench` runs end to end on the tiny model (its workers are real subprocesses), and
its stage timings mean the same thing on both sides."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from fewstep.benchmarks.pipeline_bench import run_bench  # noqa: E402


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
