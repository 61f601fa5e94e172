"""`fewstep bench` runs end to end on the tiny model (its workers are real subprocesses), and
its stage timings mean the same thing on both sides; its SDXL models, with and without the
tiny autoencoder, run the same way with the small SDXL layout standing in for the mid one."""

import dataclasses
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from fewstep.benchmarks import pipeline_bench  # noqa: E402
from fewstep.benchmarks.pipeline_bench import format_table, run_bench  # noqa: E402
from fewstep.benchmarks.sdxl_models import TAESDXL, make_sdxl_model  # noqa: E402

# fewstep fp32 against diffusers fp32: the parity tests' tolerance on a 0..1 image
IMAGE_TOLERANCE = 1e-3


@pytest.fixture(autouse=True)
def small_roofline(monkeypatch):
    """Every bench here measures the roofline on a 64³ matmul and a 1 MiB copy: seconds, not a
    minute; the figures mean nothing, what they feed is checked."""
    monkeypatch.setattr(pipeline_bench, "ROOFLINE_MATMUL_SIZE", 64)
    monkeypatch.setattr(pipeline_bench, "ROOFLINE_COPY_BYTES", 1 << 20)


def test_tiny_bench_writes_comparable_results(monkeypatch, tmp_path):
    """tiny with both diffusers baselines and a no-CFG run: every side's timings, speedups over
    fp32 and bf16 diffusers, the counted FLOPs and each side's use of the roofline."""
    tiny = dataclasses.replace(
        pipeline_bench.BENCH_MODELS["tiny"],
        baselines=("diffusers", "diffusers-bf16"),
        nocfg_steps=(2,),
    )
    monkeypatch.setitem(pipeline_bench.BENCH_MODELS, "tiny", tiny)
    out = tmp_path / "bench.json"
    backends = ["onnxruntime", "onnxruntime-unfused"]
    results = run_bench(["tiny"], [1, 2], 2, tmp_path / "work", out, backends=backends)
    assert json.loads(out.read_text()) == results
    entry = results["models"]["tiny"]
    sides = ["diffusers", "diffusers-bf16", *backends]
    assert list(entry["results"]) == sides
    # attention fused on one side only
    assert entry["results"]["onnxruntime"]["fused_attention"]["unet"] > 0
    assert "fused_attention" not in entry["results"]["onnxruntime-unfused"]
    for side in entry["results"].values():
        stages = side["stages_ms"]
        # one text-encoding entry per timed image (diffusers' two calls summed), one VAE
        # decode per image, one U-Net entry per step; the no-CFG runs add none
        assert stages["text_encoder"]["n"] == stages["vae_decoder"]["n"] == 4
        assert stages["unet_step"]["n"] == 2 * (1 + 2)
        assert set(side["end_to_end_ms"]) == {"1", "2", "2-nocfg"}
        assert side["end_to_end_ms"]["2-nocfg"]["n"] == 2
        assert side["cold_start_s"] > 0 and side["peak_rss_mb"] > 0
    assert [r["dtype"] for r in list(entry["results"].values())[:2]] == ["fp32", "bf16"]
    # the bf16 pipeline really computed in bf16: its image is off fp32's, the backends' aren't
    assert entry["image_max_abs_diff"]["diffusers-bf16"] > IMAGE_TOLERANCE
    assert entry["image_max_abs_diff"]["onnxruntime"] < IMAGE_TOLERANCE
    keys = {"unet_step", "end_to_end_1", "end_to_end_2", "end_to_end_2-nocfg"}
    assert set(entry["speedup"]) == set(sides[1:])
    assert set(entry["speedup_over_bf16"]) == set(sides) - {"diffusers-bf16"}
    fp32, bf16, ort = (entry["results"][s] for s in ("diffusers", "diffusers-bf16", "onnxruntime"))
    for table, ref in ((entry["speedup"], fp32), (entry["speedup_over_bf16"], bf16)):
        assert set(table["onnxruntime"]) == keys
        p50 = ref["end_to_end_ms"]["2-nocfg"]["p50"] / ort["end_to_end_ms"]["2-nocfg"]["p50"]
        assert table["onnxruntime"]["end_to_end_2-nocfg"] == pytest.approx(p50)
    # FLOPs counted once, on the fp32 side, with attention counted
    assert entry["flops"] == fp32["flops"] and "flops" not in bf16
    assert entry["flops"] == expected_tiny_flops(tmp_path / "work" / "tiny", latent=8)
    assert_roofline_use(entry, results["roofline"])
    with pytest.raises(ValueError, match="backends"):
        run_bench(["tiny"], [1], 1, tmp_path / "work", None, backends=["tensorrt"])


def assert_roofline_use(entry, roofline):
    """Per side and stage: achieved = FLOPs / p50 s, shares = achieved / the side's format's
    peak and / the bf16 peak."""
    assert roofline["matmul_size"] == 64 and roofline["copy_bytes"] == 1 << 20
    peaks = roofline["peak_tflops"]
    assert set(entry["utilization"]) == set(entry["results"])
    for side, use in entry["utilization"].items():
        fmt = pipeline_bench.SIDE_FORMATS[side]
        assert use["number_format"] == fmt
        for stage, flops in entry["flops"].items():
            p50_s = entry["results"][side]["stages_ms"][stage]["p50"] / 1e3
            achieved = use["achieved_tflops"][stage]
            assert achieved == pytest.approx(flops / p50_s / 1e12)
            assert use["peak_fraction"][stage] == pytest.approx(achieved / peaks[fmt])
            assert use["bf16_peak_fraction"][stage] == pytest.approx(achieved / peaks["bf16"])


def expected_tiny_flops(folder, latent):
    """One generation's FLOPs of the tiny SD 1 model at latent², each stage counted with
    attention computing nothing, plus attention's analytic 4·b·n·m·inner per call."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    ids = torch.zeros(1, 77, dtype=torch.long)
    config = encoder.config
    text_attention = config.num_hidden_layers * 4 * 77 * 77 * config.hidden_size
    context = torch.zeros(2, 77, config.hidden_size)
    sample = torch.zeros(2, 4, latent, latent)
    return {
        # the prompt and the negative prompt, batch 1 each
        "text_encoder": 2 * (flops_without_attention(encoder, ids) + text_attention),
        "unet_step": flops_with_analytic_attention(unet, sample, 999, context),
        "vae_decoder": flops_with_analytic_attention(vae.decoder, sample[:1]),
    }


def flops_without_attention(module, *args):
    """FlopCounterMode's count of module(*args) with SDPA a stand-in computing nothing."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def no_attention(query, key, value, *_, **__):
        return query.new_zeros(*query.shape[:-1], value.shape[-1])

    real = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = no_attention
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            module(*args)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    return counter.get_total_flops()


def flops_with_analytic_attention(module, *args):
    """flops_without_attention plus 4·b·n·m·inner for each diffusers Attention call in it (n
    query positions, m key positions, inner = heads · head dim)."""
    from diffusers.models.attention_processor import Attention

    attention = []

    def record(attn, args, kwargs, _):
        x = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        n = x.shape[1] if x.ndim == 3 else x.shape[2] * x.shape[3]  # [b, n, c] or [b, c, h, w]
        m = n if context is None else context.shape[1]
        attention.append(4 * x.shape[0] * n * m * attn.inner_dim)

    handles = [
        m.register_forward_hook(record, with_kwargs=True)
        for m in module.modules()
        if isinstance(m, Attention)
    ]
    try:
        flops = flops_without_attention(module, *args)
    finally:
        for handle in handles:
            handle.remove()
    assert attention, "the module has attention"
    return flops + sum(attention)


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
        # one diffusers side by default; FLOPs counted for both text encoders' calls
        assert list(entry["results"]) == ["diffusers", "onnxruntime"]
        assert "speedup_over_bf16" not in entry
        assert all(f > 0 for f in entry["flops"].values())
        assert_roofline_use(entry, results["roofline"])
    rows = format_table(results).splitlines()
    for name in models:  # a row per side, the backend's with its speedups
        assert sum(row.startswith(f"| {name} | diffusers |") for row in rows) == 1
        (row,) = [row for row in rows if row.startswith(f"| {name} | onnxruntime |")]
        assert row.count("×)") == 3
    # every row has the header's cells; the U-Net cell is the achieved rate and its shares
    assert {row.count("|") for row in rows} == {rows[0].count("|")}
    use = results["models"]["sdxl-mid"]["utilization"]["onnxruntime"]
    fraction = use["peak_fraction"]["unet_step"]
    bf16_fraction = use["bf16_peak_fraction"]["unet_step"]
    shares = f"({fraction:.0%} of fp32, {bf16_fraction:.0%} of bf16)"
    (row,) = [row for row in rows if row.startswith("| sdxl-mid | onnxruntime |")]
    assert f"| {use['achieved_tflops']['unet_step']:.3g} {shares} |" in row


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


def test_every_side_has_a_number_format():
    """Each side's achieved rate is read against the peak of the format its matmuls run in."""
    from fewstep.benchmarks.roofline import FORMATS

    sides = set(pipeline_bench.BENCH_BACKENDS) | set(pipeline_bench.BASELINES)
    assert sides <= set(pipeline_bench.SIDE_FORMATS)
    assert set(pipeline_bench.SIDE_FORMATS.values()) <= set(FORMATS)
    assert pipeline_bench.SIDE_FORMATS["openvino-bf16"] == "bf16"
    assert pipeline_bench.SIDE_FORMATS["diffusers-bf16"] == "bf16"


def test_sd15_is_benched_with_both_baselines_and_no_cfg(monkeypatch, tmp_path):
    """sd15 builds SD 1.5's full layout at 512², with the bf16 baseline and the 4-step no-CFG
    run; mid builds the same layout at its reduced size."""
    from fewstep.benchmarks import sd15_model

    built = []

    def build(path, size):
        built.append((path, size))
        return path

    monkeypatch.setattr(sd15_model, "make_sd15_model", build)
    sd15 = pipeline_bench.BENCH_MODELS["sd15"]
    assert sd15.build(tmp_path / "sd15") == tmp_path / "sd15"
    assert pipeline_bench.BENCH_MODELS["mid"].build(tmp_path / "mid") == tmp_path / "mid"
    assert built == [(tmp_path / "sd15", "full"), (tmp_path / "mid", "mid")]
    assert sd15.image_size == 512 and sd15.baselines == ("diffusers", "diffusers-bf16")
    assert sd15.nocfg_steps == (4,)


@pytest.mark.parametrize(
    ("field", "value"),
    [("baselines", ("diffusers-bf16",)), ("baselines", ("diffusers", "tf")), ("nocfg_steps", (0,))],
)
def test_bad_model_fields_are_refused_before_anything_is_built(monkeypatch, tmp_path, field, value):
    bad = dataclasses.replace(pipeline_bench.BENCH_MODELS["tiny"], **{field: value})
    monkeypatch.setitem(pipeline_bench.BENCH_MODELS, "tiny", bad)
    with pytest.raises(ValueError, match=rf"BENCH_MODELS\['tiny'\]\.{field} must .* got"):
        run_bench(["tiny"], [1], 1, tmp_path / "w", None, backends=["onnxruntime"])
    assert not (tmp_path / "w").exists()


def _sdpa_cases():
    import torch

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g) for n in (5, 7, 7))
    keep = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    keep[..., 0] = True  # no fully masked row
    return {
        "plain": ((q, k, v), {}),
        "scale": ((q, k, v), {"scale": 0.3}),
        "bool mask": ((q, k, v), {"attn_mask": keep}),
        "float mask": ((q, k, v), {"attn_mask": torch.randn(5, 7, generator=g)}),
        "causal, n < m": ((q, k, v), {"is_causal": True}),
        "causal square": ((k, k, v), {"is_causal": True}),
        "grouped heads": ((q, k[:, :2], v[:, :2]), {"enable_gqa": True}),
    }


@pytest.mark.parametrize("case", list(_sdpa_cases()))
def test_math_attention_is_torchs_sdpa(case):
    import torch

    args, kwargs = _sdpa_cases()[case]
    expected = torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)
    torch.testing.assert_close(pipeline_bench.math_attention(*args, **kwargs), expected)


def test_counted_attention_flops_are_analytic():
    """A conv and a diffusers self-attention block: FlopCounterMode counts 0 for CPU SDPA, the
    swap counts its two products, 4·b·h·n·m·d, and the total is the analytic count."""
    import torch
    from diffusers.models.attention_processor import Attention

    b, c, h, w, heads, head_dim = 2, 16, 4, 6, 2, 8
    conv = torch.nn.Conv2d(c, c, 3, padding=1)
    attn = Attention(c, heads=heads, dim_head=head_dim)
    inner, n = heads * head_dim, h * w

    def block(x):
        y = conv(x).flatten(2).transpose(1, 2)  # [b, n, c]
        return attn(y)

    x = torch.randn(b, c, h, w)
    conv_flops = 2 * b * c * n * c * 9
    projections = 3 * 2 * b * n * c * inner + 2 * b * n * inner * c  # q, k, v; out
    sdpa = 4 * b * heads * n * n * head_dim
    flops = pipeline_bench.count_stage_flops({"block": [conv, attn]}, lambda: block(x))
    assert flops == {"block": conv_flops + projections + sdpa}
    assert flops_without_attention(block, x) == conv_flops + projections  # what torch counts
    with pipeline_bench.counted_attention():  # and the swap computes the same thing
        swapped = block(x)
    torch.testing.assert_close(swapped, block(x))
    assert torch.nn.functional.scaled_dot_product_attention is not pipeline_bench.math_attention


def test_counted_text_encoder_keeps_its_causal_mask(tiny_model):
    """CLIP's text encoder through the swap: the same output (its causal mask honoured) and its
    attention counted, 4·b·n·n·hidden per layer."""
    import torch
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(tiny_model("sd1") / "text_encoder")
    ids = torch.randint(
        0, encoder.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        expected = encoder(ids).last_hidden_state
        with pipeline_bench.counted_attention():
            torch.testing.assert_close(encoder(ids).last_hidden_state, expected)
        flops = pipeline_bench.count_stage_flops({"text": [encoder]}, lambda: encoder(ids))
    config = encoder.config
    attention = config.num_hidden_layers * 4 * 2 * 77 * 77 * config.hidden_size
    assert flops["text"] == flops_without_attention(encoder, ids) + attention


def test_the_int8_side_runs_the_quantized_package(tmp_path):
    """openvino-int8 runs a package quantized in the workdir; its image is further from fp32
    diffusers' than the fp32 side's (PSNR), which is as exact as the parity tests ask."""
    pytest.importorskip("nncf")
    work = tmp_path / "work"
    results = run_bench(["tiny"], [1], 1, work, None, backends=["onnxruntime", "openvino-int8"])
    manifest = json.loads((work / "tiny-int8" / "fewstep.json").read_text())
    assert manifest["graphs"]["unet"]["precision"] == "int8"
    entry = results["models"]["tiny"]
    assert entry["utilization"]["openvino-int8"]["number_format"] == "int8"
    psnr = entry["image_psnr_db"]
    assert psnr["onnxruntime"] > 60  # a max error under 1e-3 on 0..1
    assert psnr["openvino-int8"] < psnr["onnxruntime"]


def test_psnr_of_a_known_difference():
    diff = np.full((4, 4, 3), 0.1)  # mse 0.01 on a peak of 1: 20 dB
    assert pipeline_bench.psnr_db(diff) == pytest.approx(20.0)
    assert pipeline_bench.psnr_db(np.zeros(3)) == float("inf")
