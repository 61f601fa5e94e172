"""benchmarks/gpu_suite.sh runs: its CPU mode (tiny models, Triton's interpreter), end to end.

The suite is a benchmark, not a test; this only proves that the one command a GPU machine
runs works (setup skipped where the imports already do), writes its JSON and log, and that
its correctness checks pass at small sizes. The GPU numbers come from running it there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_small_mode_runs_and_checks_pass(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--small"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    log = (tmp_path / "gpu_suite.log").read_text()

    assert results["mode"] == "small-cpu" and results["checks_ok"]
    assert list(results["section_s"]) == ["checks", "kernels", "unet", "turbo", "quality"]
    assert {"torch", "triton", "diffusers"} <= set(results["env"]["versions"])
    assert all(c["ok"] for c in results["checks"]["kernels"])
    assert results["kernels"]["group_norm"] and results["kernels"]["attention"]
    nchw, channels_last = (r["launch_sweep"]["rows"] for r in results["kernels"]["group_norm"])
    assert {r["form"] for r in nchw} == {"default", "two-launch", "one-pass", "grid-sync"}
    assert channels_last[1]["form"] == "default" and channels_last[1]["groups_per_program"] == 1
    for rows in (nchw, channels_last):  # 10 = 2 · 5: whole channels
        assert [r.get("channel_block") for r in rows[-2:]] == [2, 2]
    for row in nchw + channels_last:  # fp32: every launch shape stays exact
        if "error" in row:  # a grid sync with a split > 1 needs a GPU
            assert row["form"] == "grid-sync" and "needs a CUDA GPU" in row["error"], row
        else:
            assert row["max_err"] < 1e-4, row
    ran = [r for r in nchw + channels_last if "max_err" in r]
    assert all(r in ran for r in nchw + channels_last if r.get("split", 1) == 1)
    assert {r["form"] for r in ran} == {"default", "two-launch", "one-pass", "grid-sync"}
    for row in results["kernels"]["attention"]:  # d 40: 32 + 16 lanes against 64
        assert row["head_dim_blocks"]["split"] == [32, 16]
        assert row["head_dim_blocks"]["padded_ms"] > 0
    assert {c["op"] for c in results["checks"]["kernels"]} == {
        "group_norm_silu",
        "attention",
        "geglu",
        "layer_norm",
        "upsample_conv",
    }
    for op in ("geglu", "layer_norm"):
        (row,) = results["kernels"][op]
        assert row["ms"]["kernel"] > 0 and row["kernel_gb_per_s"] > 0
    (row,) = results["kernels"]["upsample_conv"]
    assert row["ms"]["fused"] > 0 and row["ms"]["torch"] > 0
    unet = results["unet"]
    assert {"diffusers_eager", "fewstep"} <= set(unet["variants"])
    assert "fewstep-kernels-interpreted" in unet["checks"]  # the kernels ran in the model
    assert "fewstep-auto-interpreted" in unet["checks"]  # and tuned (untimed here)
    assert results["kernel_choices"] == []  # nothing is timed on the CPU
    for batch in ("1", "8"):
        rows = results["turbo"]["batches"][batch]
        assert rows["fewstep"]["p50"] > 0 and rows["diffusers_eager"]["p50"] > 0
        # same latents, 1 Euler step, fp32: the same image as diffusers
        assert rows["max_abs_image_diff_vs_diffusers"]["fewstep"] <= 1e-3
    quality = results["quality"]["rows"]["fp32"]
    assert quality["single"]["n"] == quality["two"]["n"] == 3  # every image was scored
    assert "U-Net step" in log and "SD-Turbo end to end" in log


def test_gpu_only_selections_name_real_cases():
    """What runs only on a GPU can still be checked here: the sweep's cases exist."""
    from fewstep.benchmarks import gpu_kernels, kernels_bench

    names = {case[0] for case in kernels_bench.GROUP_NORM_CUDA}
    assert set(gpu_kernels.GROUP_NORM_SWEEP_CASES) <= names


def test_the_log_lists_what_the_tuned_ops_chose(monkeypatch):
    """On a GPU the tuned ops' choices go to the JSON and the log (none are made here)."""
    import torch

    from fewstep.benchmarks import gpu_report
    from fewstep.kernels import tuning

    times = iter([0.02, 0.01])
    monkeypatch.setattr(tuning, "can_time", lambda device: True)
    monkeypatch.setattr(tuning, "device_time_ms", lambda fn, device: next(times))
    monkeypatch.setattr(tuning, "_choices", {})
    x = torch.zeros(2, 320, 64, 64).to(memory_format=torch.channels_last)
    key = tuning.signature(x, 32, None)
    candidates = {"kernel": x.clone, "torch": x.clone}
    tuning.choose("group_norm", key, candidates, x.device, reference="torch")
    results = {
        "env": {"card": {"name": "a card"}},
        "mode": "gpu",
        "section_s": {},
        "checks_ok": True,
        "kernel_choices": tuning.choices(),
    }
    table = gpu_report.format_table(results)
    assert "group_norm    2x320x64x64" in table
    assert "strided torch             kernel 0.0200  torch 0.0100" in table


def test_the_targets_summary_of_the_committed_h200_run():
    """The performance targets against the H200 run in benchmarks/results: what the README says
    of it (GroupNorm at 28-58% of a copy, attention 0.44-0.94x SDPA's best, 6.20 ms at
    best for the U-Net step), and no summary for a CPU run."""
    from fewstep.benchmarks import gpu_report

    results = json.loads((REPO / "benchmarks/results/gpu-suite-h200.json").read_text())
    goals = gpu_report.target_summary(results)
    gn, attn, unet = goals["group_norm_of_copy"], goals["attention_vs_sdpa_best"], goals["unet_ms"]
    assert (gn["met"], gn["cases"], round(gn["min"], 2), round(gn["max"], 2)) == (0, 7, 0.28, 0.58)
    assert (attn["met"], attn["cases"], round(attn["min"], 2), round(attn["max"], 2)) == (
        0,
        5,
        0.44,
        0.94,
    )
    assert round(unet["best"]["p50"], 2) == 6.20 and not unet["met"]
    assert goals["sections_s"]["sum"] < goals["sections_s"]["target"]
    assert gpu_report.target_summary({**results, "mode": "small-cpu"}) == {}
    summary = {"mode": "gpu", "section_s": results["section_s"], "checks_ok": True}
    table = gpu_report.format_table({**summary, "env": results["env"], "targets": goals})
    assert "group_norm_of_copy       >= 0.75: met in 0 of 7 cases (from 0.28 to 0.58)" in table
    best = "best 6.20 (fewstep-compile-group-norm-kernel-only): not met"
    assert f"U-Net step <= 6.0 ms: default 8.96, {best}" in table
