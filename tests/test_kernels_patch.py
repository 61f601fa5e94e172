"""fewstep.kernels.patch on diffusers' tiny U-Nets and VAE, in Triton's interpreter (conftest).

References: the same module unpatched (diffusers' own GroupNorm, SiLU and AttnProcessor2_0)
in the same precision and in fp64. The accuracy rule is the kernels' (conftest's
`assert_matches_ref`), applied to the whole module: max|patched − ref64| <=
2 · max|unpatched − ref64| + floor, where ref64 is the unpatched module in fp64 on the same
(exactly upcast) inputs. Counts are checked against the modules the model has, counted here
without the patcher's own rules.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import fewstep.kernels.ops as kernel_ops  # noqa: E402
from fewstep.kernels import (  # noqa: E402
    KERNEL_NAMES,
    FewstepAttnProcessor,
    PatchReport,
    is_patched,
    patch,
    unpatch,
)
from fewstep.kernels.patch import REWRITES, SWITCHES  # noqa: E402

pytestmark = [
    # The interpreter evaluates masked-off lanes too (see test_kernels.py).
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


def expected_counts(module: torch.nn.Module) -> dict[str, int]:
    """What the model has: GroupNorm→SiLU pairs, other GroupNorms, attention modules, ResNet
    blocks with two pairs and no up- or downsampling, transformers on continuous inputs,
    GEGLU activations, LayerNorms over one dim, upsamplers that convolve."""
    pairs = blocks = transformers = geglus = layer_norms = upsamples = pointwise = 0
    for m in module.modules():
        if type(m).__name__ == "ResnetBlock2D":
            pairs += 1 + (m.time_embedding_norm != "scale_shift")
            plain = m.upsample is None and m.downsample is None
            blocks += m.time_embedding_norm != "scale_shift" and plain
        if isinstance(getattr(m, "conv_norm_out", None), torch.nn.GroupNorm):
            pairs += 1
        transformers += type(m).__name__ == "Transformer2DModel" and m.is_input_continuous
        geglus += type(m).__name__ == "GEGLU"
        layer_norms += type(m) is torch.nn.LayerNorm and len(m.normalized_shape) == 1
        upsamples += type(m).__name__ == "Upsample2D" and m.use_conv and m.interpolate
        pointwise += type(m) is torch.nn.Conv2d and m.kernel_size == (1, 1) and m.groups == 1
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in module.modules())
    attention = sum(type(m).__name__ == "Attention" for m in module.modules())
    return {
        "group_norm_silu": pairs,
        "group_norm": norms - pairs,
        "attention": attention,
        "resnet_blocks": blocks,
        "transformer_outputs": transformers,
        "geglu": geglus,
        "layer_norm": layer_norms,
        "upsample_conv": upsamples,
        "pointwise_conv": pointwise,
    }


def run_vae_decoder(module, z):
    with torch.inference_mode():
        return module.decode(z, return_dict=False)[0]


@pytest.mark.parametrize(
    ("family", "dtype", "channels_last"),
    [
        pytest.param("sd1", torch.float32, False, id="sd1-fp32"),
        pytest.param("sd2", torch.float16, True, id="sd2-linear-proj-fp16-channels_last"),
    ],
)
def test_patched_unet_matches_unpatched(
    tiny_modules, assert_matches_ref, kernel_calls, family, dtype, channels_last
):
    module64 = tiny_modules.load(family, "unet", torch.float64)
    ref64 = tiny_modules.run_unet(module64, tiny_modules.unet_inputs(module64, 1, torch.float64))
    module = tiny_modules.load(family, "unet", dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    module = module.to(memory_format=memory_format)
    sample, t, hidden = tiny_modules.unet_inputs(module, 1, dtype)
    inputs = (sample.contiguous(memory_format=memory_format), t, hidden)
    unpatched = tiny_modules.run_unet(module, inputs)
    counts = expected_counts(module)

    patched_module, report = patch(module)
    assert patched_module is module and is_patched(module)
    got = tiny_modules.run_unet(module, inputs)

    assert vars(report) == counts and report.resnet_blocks > 0 and report.transformer_outputs > 0
    # Every swapped op ran the Triton kernel, none fell back to torch.
    assert kernel_calls["group_norm"] == report.group_norm_silu + report.group_norm
    assert kernel_calls["attention"] == report.attention
    assert kernel_calls["geglu"] == report.geglu > 0
    assert kernel_calls["layer_norm"] == report.layer_norm > 0
    assert kernel_calls["input_bias"] == report.resnet_blocks  # each block's time embedding
    # blocks whose conv2 bias joins a shortcut convolution's are among them
    assert any(type(m).__name__ == "FusedResnetBlock" and m.conv_shortcut for m in module.modules())
    assert_matches_ref(got, unpatched, ref64, f"{family} U-Net {dtype}")


def test_patched_vae_decoder_matches_unpatched(tiny_modules, assert_matches_ref, kernel_calls):
    module = tiny_modules.load("sd1", "vae")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref64 = run_vae_decoder(tiny_modules.load("sd1", "vae", torch.float64), z.double())
    unpatched = run_vae_decoder(module, z)
    counts = expected_counts(module)
    decoder_counts = expected_counts(module.decoder)  # what decode() runs
    _, report = patch(module)
    got = run_vae_decoder(module, z)
    assert vars(report) == counts and report.resnet_blocks > 0
    # no time embedding in a VAE, but each block's conv1 bias is added inside norm2's kernel
    assert kernel_calls["input_bias"] == decoder_counts["resnet_blocks"] > 0
    assert kernel_calls["group_norm"] == sum(
        decoder_counts[k] for k in ("group_norm_silu", "group_norm")
    )
    assert kernel_calls["attention"] == decoder_counts["attention"]
    assert_matches_ref(got, unpatched, ref64, "sd1 VAE decoder fp32")


def test_patch_is_idempotent_and_unpatch_restores(tiny_modules):
    module = tiny_modules.load("sd1", "unet")
    keys = list(module.state_dict())
    types = {name: type(m) for name, m in module.named_modules()}
    processors = {name: type(p) for name, p in module.attn_processors.items()}
    inputs = tiny_modules.unet_inputs(module, 1, torch.float32)
    before = tiny_modules.run_unet(module, inputs)

    _, first = patch(module)
    _, second = patch(module)
    assert first.total > 0 and second.total == 0
    # Same weights under the same names: state dicts and LoRA folding see no difference.
    assert list(module.state_dict()) == keys
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in module.modules())
    assert all(isinstance(p, FewstepAttnProcessor) for p in module.attn_processors.values())

    unpatch(module)
    assert not is_patched(module)
    assert {name: type(m) for name, m in module.named_modules()} == types
    assert {name: type(p) for name, p in module.attn_processors.items()} == processors
    assert torch.equal(tiny_modules.run_unet(module, inputs), before)


def test_patched_ops_fall_back_to_torch_when_disabled(tiny_modules, kernel_calls, monkeypatch):
    module = tiny_modules.load("sd1", "unet")
    inputs = tiny_modules.unet_inputs(module, 2, torch.float32)
    expected = tiny_modules.run_unet(module, inputs)
    patch(module)
    monkeypatch.setenv(kernel_ops.DISABLE_ENV, "1")
    got = tiny_modules.run_unet(module, inputs)
    assert kernel_calls == {"group_norm": 0, "attention": 0, "geglu": 0, "layer_norm": 0}
    # The fallback runs torch's own ops in diffusers' order: the same numbers.
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_dropped_passes_change_no_value_and_keep_the_layout(
    tiny_modules, assert_matches_ref, channels_last
):
    """passes only (no kernels): attention without its division by 1, transformer outputs in
    their residual's layout. NCHW: diffusers' numbers bit for bit. channels_last stays so,
    and differs only by the rounding of torch's kernels on the other layout (the fp64 rule)."""
    module = tiny_modules.load("sd2", "unet")  # linear projections: the other output path
    module64 = tiny_modules.load("sd2", "unet", torch.float64)
    ref64 = tiny_modules.run_unet(module64, tiny_modules.unet_inputs(module64, 2, torch.float64))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    module = module.to(memory_format=memory_format)
    sample, t, hidden = tiny_modules.unet_inputs(module, 2, torch.float32)
    inputs = (sample.contiguous(memory_format=memory_format), t, hidden)
    expected = tiny_modules.run_unet(module, inputs)
    outputs = []
    for m in module.modules():
        if type(m).__name__ == "Transformer2DModel":
            m.register_forward_hook(lambda _m, _args, out: outputs.append(out[0]))

    kernels = dict(
        group_norm=False, geglu=False, layer_norm=False, upsample_conv=False, pointwise_conv=False
    )
    _, report = patch(module, attention=False, **kernels)
    assert report.group_norm == report.group_norm_silu == report.geglu == report.layer_norm == 0
    assert report.attention == expected_counts(module)["attention"]
    assert not any(p.kernel for p in module.attn_processors.values())
    outputs.clear()
    got = tiny_modules.run_unet(module, inputs)
    if channels_last:
        assert_matches_ref(got, expected, ref64, "sd2 U-Net channels_last, passes dropped")
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert outputs and all(o.is_contiguous(memory_format=memory_format) for o in outputs)


def test_a_later_patch_puts_sdpa_processors_on_the_kernel_and_unpatch_undoes_both(tiny_modules):
    module = tiny_modules.load("sd1", "unet")
    original = {name: type(p) for name, p in module.attn_processors.items()}
    _, first = patch(module, group_norm=False, attention=False)
    _, second = patch(module, group_norm=False, attention=True)
    assert first.attention == second.attention > 0 and second.transformer_outputs == 0
    assert all(p.kernel for p in module.attn_processors.values())
    unpatch(module)
    assert {name: type(p) for name, p in module.attn_processors.items()} == original
    assert not any("_get_output_for_continuous_inputs" in vars(m) for m in module.modules())


def test_names_switches_and_report_come_from_the_rewrite_table():
    """One table: PatchReport has a count per rewrite (a dataclass: reports serialize it with
    dataclasses.asdict), patch() a keyword per switch, KERNEL_NAMES the switches that swap
    in a kernel, and the torch backend offers the same kernels."""
    from fewstep.backends import torch_backend

    names = [r.name for r in REWRITES]
    assert [f.name for f in dataclasses.fields(PatchReport)] == names
    assert dataclasses.asdict(PatchReport()) == dict.fromkeys(names, 0)
    assert PatchReport(geglu=2, attention=3).total == 5
    assert set(SWITCHES) == {switch for r in REWRITES for switch in r.switches}
    assert [switch for switch in SWITCHES if switch != "passes"] == list(KERNEL_NAMES)
    assert torch_backend.KERNEL_NAMES == KERNEL_NAMES
    module = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.LayerNorm(4))
    _, report = patch(module, **dict.fromkeys(SWITCHES, False))
    assert report.total == 0 and not is_patched(module)


def test_kernels_argument_swaps_what_the_kernel_keywords_do(tiny_modules):
    by_name = tiny_modules.load("sd1", "unet")
    by_keyword = tiny_modules.load("sd1", "unet")
    _, named = patch(by_name, kernels=("attention", "geglu"))
    off = dict.fromkeys(("group_norm", "layer_norm", "upsample_conv", "pointwise_conv"), False)
    _, keywords = patch(by_keyword, **off)
    assert vars(named) == vars(keywords)
    assert named.geglu > 0 and named.transformer_outputs > 0 and named.group_norm == 0
    assert [type(m) for m in by_name.modules()] == [type(m) for m in by_keyword.modules()]
    assert all(p.kernel for p in by_name.attn_processors.values())


@pytest.mark.parametrize(
    ("kwargs", "given", "allowed"),
    [
        ({"group_nrom": False}, "group_nrom", SWITCHES),
        ({"kernels": ["group_norm", "flash"]}, "flash", KERNEL_NAMES),
        ({"kernels": "group_norm"}, "'group_norm'", KERNEL_NAMES),  # a name, not a list
        ({"kernels": ["passes"]}, "passes", KERNEL_NAMES),  # a switch, not a kernel
        ({"kernels": ["attention"], "geglu": False}, "geglu", None),  # said twice
    ],
)
def test_patch_rejects_unknown_switches_and_kernels_before_swapping(kwargs, given, allowed):
    module = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.SiLU())
    with pytest.raises(ValueError) as error:
        patch(module, **kwargs)
    assert given in str(error.value) and (allowed is None or str(allowed) in str(error.value))
    assert not is_patched(module) and type(module[0]) is torch.nn.GroupNorm


def test_patched_unet_compiles_in_one_graph(tiny_modules):
    """torch.compile sees through every swap (custom ops, FusedResnetBlock, the processor,
    the transformers' output method): no graph break, the same numbers as eager."""
    module = tiny_modules.load("sd1", "unet").to(memory_format=torch.channels_last)
    patch(module)
    sample, t, hidden = tiny_modules.unet_inputs(module, 1, torch.float32)
    inputs = (sample.contiguous(memory_format=torch.channels_last), t, hidden)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(
        tiny_modules.run_unet(compiled, inputs), tiny_modules.run_unet(module, inputs)
    )


@pytest.mark.parametrize("size", [(5, 7), (1, 1), (8, 8)])
def test_upsample_conv_is_one_transposed_convolution(size):
    """diffusers' Upsample2D (nearest ×2, then 3×3 conv with padding 1) against its fusion, in
    fp64 (the same map: equal to rounding) and fp32; an output_size other than ×2 takes
    diffusers' path; an in-place weight update is seen (the fused weight is made per call)."""
    from diffusers.models.upsampling import Upsample2D

    from fewstep.kernels.patch import FusedUpsampleConv

    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        upsample = Upsample2D(6, use_conv=True, out_channels=4).to(dtype).eval()
        fused = FusedUpsampleConv(upsample)
        x = torch.randn(2, 6, *size, dtype=dtype)
        with torch.inference_mode():
            expected = upsample(x)
            torch.testing.assert_close(fused(x), expected, rtol=0, atol=tol)
            odd = (2 * size[0] + 1, 2 * size[1] + 1)
            torch.testing.assert_close(fused(x, odd), upsample(x, odd), rtol=0, atol=0)
            upsample.conv.weight.mul_(2)  # as a LoRA fold would, in place
            torch.testing.assert_close(fused(x), upsample(x), rtol=0, atol=2 * tol)


def test_pointwise_conv_is_a_matrix_product_on_channels_last():
    """A 1×1 convolution as [N·H·W, C_in] × [C_in, C_out] over channels_last memory: the
    same map (fp64: equal to rounding), output in channels_last as cuDNN's; NCHW inputs run
    the convolution itself; a bias given in place of its own (a ResNet block's conv2 bias
    joined to its shortcut's) and an in-place weight update are seen."""
    from fewstep.kernels.patch import PointwiseConv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 1).double()
    fused = PointwiseConv(conv)
    x = torch.randn(2, 6, 7, 3, dtype=torch.float64)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = fused(x_cl)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, conv(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(fused(x), conv(x), rtol=0, atol=0)  # NCHW: the convolution
        extra = torch.randn(5, dtype=torch.float64)
        want = torch.nn.functional.conv2d(x, conv.weight, conv.bias + extra)
        torch.testing.assert_close(fused.project(x_cl, conv.bias + extra), want, rtol=0, atol=1e-12)
        conv.weight.mul_(2)  # as a LoRA fold would, in place
        torch.testing.assert_close(fused(x_cl), conv(x), rtol=0, atol=1e-12)
    assert dict(fused.named_parameters()).keys() == dict(conv.named_parameters()).keys()
