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
    assert list(results["section_s"]) == [
        "checks",
        "kernels",
        "unet",
        "turbo",
        "sdxl_unet",
        "sdxl_turbo",
        "quality",
    ]
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
    for section in ("unet", "sdxl_unet"):
        unet = results[section]
        assert {"diffusers_eager", "fewstep"} <= set(unet["variants"])
        assert "fewstep-kernels-interpreted" in unet["checks"]  # the kernels ran in the model
        assert "fewstep-auto-interpreted" in unet["checks"]  # and tuned (untimed here)
        assert all(check["ok"] for check in unet["checks"].values()), section
        assert unet["latent"] == [2, 4, 8, 8]
    # SDXL's step takes its added conditioning: the tiny encoder 2's pooled width, 6 size ids
    assert results["sdxl_unet"]["inputs"]["text_embeds"] == [2, 40]
    assert results["sdxl_unet"]["inputs"]["time_ids"] == [2, 6]
    assert "text_embeds" not in results["unet"]["inputs"]
    assert results["kernel_choices"] == []  # nothing is timed on the CPU
    for section in ("turbo", "sdxl_turbo"):
        for batch in ("1", "8"):
            rows = results[section]["batches"][batch]
            assert rows["fewstep"]["p50"] > 0 and rows["diffusers_eager"]["p50"] > 0
            # same latents, 1 Euler (SDXL-Turbo: ancestral, to sigma 0) step, fp32: the same
            # image as diffusers
            assert rows["max_abs_image_diff_vs_diffusers"]["fewstep"] <= 1e-3, (section, batch)
    assert results["sdxl_turbo"]["model"] == "SDXL-Turbo"
    quality = results["quality"]["rows"]["fp32"]
    assert quality["single"]["n"] == quality["two"]["n"] == 3  # every image was scored
    for title in ("U-Net step", "SD-Turbo end to end", "SDXL U-Net step", "SDXL-Turbo end to end"):
        assert title in log


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


# The published sizes of stabilityai/stable-diffusion-xl-base-1.0 (parameters; CLIP's 49,408-row
# vocabulary for the encoders): U-Net, CLIP ViT-L text encoder, OpenCLIP bigG with its
# projection, VAE.
SDXL_BASE_PARAMETERS = {
    "unet": 2_567_463_684,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
    "vae": 83_653_863,
}


def test_sdxl_preset_is_sdxl_base_and_flop_anchors_count_the_presets():
    """The sdxl preset builds SDXL base's components at their published sizes (on the meta
    device: no memory, no compute), and GFLOP holds what torch's FLOP counter counts for
    one step of each U-Net preset at the suite's shapes."""
    import diffusers
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fewstep.benchmarks import gpu_models, gpu_unet

    sdxl = gpu_models.PRESETS["sdxl"]
    assert gpu_models.PRESETS["sdxl_turbo"].unet == sdxl.unet
    with torch.device("meta"):
        text = {"vocab_size": 49408, "max_position_embeddings": 77}
        built = {
            "unet": diffusers.UNet2DConditionModel(**sdxl.unet),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**sdxl.text_encoder, **text)),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig(**sdxl.text_encoder_2, **text)
            ),
            "vae": diffusers.AutoencoderKL(**sdxl.vae),
        }
    sizes = {name: sum(p.numel() for p in module.parameters()) for name, module in built.items()}
    assert sizes == SDXL_BASE_PARAMETERS
    assert built["vae"].config.scaling_factor == 0.13025 and built["vae"].config.force_upcast

    for preset, step in (("sd15", gpu_unet.SD15_STEP), ("sdxl", gpu_unet.SDXL_STEP)):
        meta = torch.device("meta")
        with meta:
            unet = diffusers.UNet2DConditionModel(**gpu_models.PRESETS[preset].unet)
        args, kwargs = gpu_unet.module_call(
            gpu_unet.step_inputs(dict(unet.config), step.side, meta), torch.float32
        )
        with FlopCounterMode(display=False) as counter:
            unet(*args, **kwargs)
        gflop = counter.get_total_flops() / 1e9
        assert abs(gflop / gpu_models.GFLOP[step.gflop] - 1) < 1e-3, (preset, gflop)


def test_full_size_folders_replace_every_component(tmp_path, monkeypatch, one_torch_thread):
    """make_model_folder's GPU path, on the CPU at reduced widths: both SDXL text encoders,
    the U-Net and the VAE replaced by the preset's, redrawn and saved in fp16, with the
    family's Euler-ancestral trailing scheduler; diffusers' StableDiffusionXLPipeline and
    fewstep's pipeline load the folder and make the same image from the same latents."""
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from fewstep.benchmarks import gpu_end_to_end, gpu_models

    sdxl = gpu_models.PRESETS["sdxl_turbo"]
    time_dim, pooled = 8, 48
    reduced = dataclasses.replace(
        sdxl,
        unet={
            **sdxl.unet,
            "block_out_channels": (32, 64, 64),
            "transformer_layers_per_block": (1, 1, 2),
            "attention_head_dim": (2, 4, 4),
            "layers_per_block": 1,
            "norm_num_groups": 16,
            "cross_attention_dim": 32 + 48,
            "addition_time_embed_dim": time_dim,
            "projection_class_embeddings_input_dim": 6 * time_dim + pooled,
            "sample_size": 8,
        },
        text_encoder={
            **sdxl.text_encoder,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
        },
        text_encoder_2={
            **sdxl.text_encoder_2,
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": pooled,
        },
        vae={**sdxl.vae, "block_out_channels": (16, 32, 32, 32), "norm_num_groups": 16},
    )
    monkeypatch.setitem(gpu_models.PRESETS, "sdxl_turbo", reduced)
    cpu = torch.device("cpu")
    folder = gpu_models.make_model_folder(tmp_path / "m", "sdxl_turbo", False, cpu)

    configs = {
        name: json.loads((folder / name / "config.json").read_text())
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
    }
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for key, value in getattr(reduced, name).items():
            got = configs[name][key]
            assert (tuple(got) if isinstance(got, list) else got) == value, (name, key)
    assert scheduler["_class_name"] == "EulerAncestralDiscreteScheduler"
    assert scheduler["timestep_spacing"] == "trailing"
    (weights,) = (folder / "text_encoder_2").glob("*.safetensors")
    tensors = load_file(weights)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    projection = tensors["text_projection.weight"].float()  # redrawn: N(0, 1/fan_in)
    assert projection.shape == (pooled, 48)
    assert abs(float(projection.std()) * 48**0.5 - 1) < 0.1

    result = gpu_end_to_end.bench_turbo(
        folder, cpu, torch.float32, True, 0, 1, model=gpu_end_to_end.SDXL_TURBO
    )
    for rows in result["batches"].values():
        assert rows["max_abs_image_diff_vs_diffusers"]["fewstep"] <= 1e-3


def test_sdxl_step_without_compile_runs_the_gpu_variants(tiny_model, one_torch_thread, monkeypatch):
    """The GPU's variant list on the tiny SDXL model (on the CPU the graphs fall back to eager
    calls, and the kernels to torch's ops: the suite's small mode runs them interpreted):
    every configuration but the compiled ones runs and passes its check, and the result
    names what a run with --sdxl-compile adds."""
    import dataclasses

    import torch

    from fewstep.benchmarks import gpu_unet
    from fewstep.kernels import _interpreter

    monkeypatch.setattr(_interpreter, "INTERPRETED", False)

    step = dataclasses.replace(gpu_unet.SDXL_STEP, side=8)  # the CPU's size
    result = gpu_unet.bench_unet(
        tiny_model("sdxl"),
        torch.device("cpu"),
        torch.float32,
        False,
        0,
        1,
        "reduce-overhead",
        step=step,
        compile_variants=False,
    )
    expected = {v.name for v in gpu_unet.GPU_VARIANTS if not v.compile}
    assert set(result["variants"]) == expected | {"diffusers_eager"}
    assert set(result["checks"]) == set(result["variants"])
    assert all(check["ok"] for check in result["checks"].values())
    assert result["left_out"] == ["fewstep-compile", "torch_compile"]
    assert result["latent"] == [2, 4, 8, 8]
    assert {v.name for v in gpu_unet.unet_variants(False)} == {
        v.name for v in gpu_unet.GPU_VARIANTS
    }


def sdxl_step_results(fewstep_ok: bool = True, variant_errors: dict | None = None) -> dict:
    """A GPU run's results with the SDXL U-Net step only."""
    check = {"err": 0.01, "tol": 0.02, "ok": True}
    rows = {"diffusers_eager": 60.0, "fewstep": 40.0, "fewstep-no-kernels": 35.0}
    sdxl = {
        "latent": [2, 4, 128, 128],
        "dtype": "float16",
        "variants": {
            name: {"p50": p50, "p90": p50 + 1, "speedup_vs_eager": 60.0 / p50}
            for name, p50 in rows.items()
        },
        "checks": {name: dict(check) for name in rows},
        "left_out": ["fewstep-compile", "torch_compile"],
    }
    sdxl["checks"]["fewstep"]["ok"] = fewstep_ok
    if variant_errors:
        sdxl["variant_errors"] = variant_errors
    return {
        "env": {"card": {"name": "a card"}},
        "mode": "gpu",
        "section_s": {"sdxl_unet": 100.0},
        "sdxl_unet": sdxl,
    }


def test_the_sdxl_step_is_checked_and_reported_without_a_target():
    """A failed SDXL check or variant fails the run; the step is reported beside the targets,
    with none of its own."""
    from fewstep.benchmarks import gpu_report

    assert gpu_report.all_checks_ok(sdxl_step_results())
    assert not gpu_report.all_checks_ok(sdxl_step_results(fewstep_ok=False))
    assert not gpu_report.all_checks_ok(sdxl_step_results(variant_errors={"fewstep": "OOM"}))

    results = sdxl_step_results(variant_errors={"fewstep-compile": "RuntimeError: boom"})
    goals = gpu_report.target_summary(results)
    assert "unet_ms" not in goals  # the 6 ms target is SD1.5's step
    assert goals["sdxl_unet_ms"] == {
        "default": 40.0,
        "best": {"variant": "fewstep-no-kernels", "p50": 35.0},
        "diffusers_eager": 60.0,
    }
    results.update(targets=goals, checks_ok=gpu_report.all_checks_ok(results))
    table = gpu_report.format_table(results)
    assert "SDXL U-Net step [2, 4, 128, 128] float16, p50 / p90 ms:" in table
    assert "left out (--sdxl-compile runs them): fewstep-compile, torch_compile" in table
    best = "best 35.00 (fewstep-no-kernels); diffusers eager 60.00"
    assert f"SDXL U-Net step (no target): default 40.00, {best}" in table
    assert "ERROR in SDXL U-Net variant fewstep-compile: RuntimeError: boom" in table
