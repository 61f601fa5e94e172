"""fewstep.kernels against fp64 references, in Triton's interpreter (TRITON_INTERPRET=1, conftest).

Accuracy rule (conftest's `assert_matches_ref`): with ref64 the fp64 computation on the same
(exactly upcast) inputs, a kernel passes when

    max|kernel − ref64| <= 2 · max|torch_same_precision − ref64| + floor(dtype)

where torch_same_precision is the plain torch op run in the kernel's dtype.
Shapes are SD shapes scaled down to keep the interpreter's grids small (it
costs about a millisecond per program), plus odd ones.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import triton

import fewstep.kernels._interpreter as kernel_interpreter
import fewstep.kernels.ops as kernel_ops
from fewstep.kernels import (
    attention,
    attention_fallback_reason,
    attention_op,
    attention_ref,
    geglu,
    geglu_fallback_reason,
    geglu_op,
    geglu_ref,
    group_norm,
    group_norm_fallback_reason,
    group_norm_op,
    group_norm_ref,
    layer_norm,
    layer_norm_fallback_reason,
    layer_norm_op,
    layer_norm_ref,
)
from fewstep.kernels.attention import head_dim_blocks

# the module (fewstep.kernels.group_norm is also the function's name in the package)
group_norm_module = importlib.import_module("fewstep.kernels.group_norm")

# The interpreter evaluates masked-off lanes too (x = 0 there, so SiLU's exp overflows
# after normalization by a large mean; NaN inputs make NaN arithmetic): numpy warns,
# the lanes are never stored.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

REPO = Path(__file__).resolve().parents[1]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def randn(*shape: int, gen: torch.Generator, dtype: torch.dtype, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen) * scale + shift).to(dtype)


# GroupNorm ------------------------------------------------------------------

GROUP_NORM_CASES = [
    # (shape, groups, channels_last)
    pytest.param((2, 320, 16, 16), 32, False, id="sd15-down0-scaled"),  # (2, 320, 64, 64) at 512²
    pytest.param((1, 320, 16, 16), 32, True, id="sd15-down0-scaled-channels_last"),
    pytest.param((1, 1280, 4, 4), 32, False, id="sd15-mid-scaled"),  # 40 channels per group
    pytest.param((1, 1280, 4, 4), 32, True, id="sd15-mid-scaled-channels_last"),  # 2 per program
    pytest.param((1, 128, 32, 32), 32, True, id="vae-up3-scaled-channels_last"),  # 4 per group
    pytest.param((1, 64, 7, 9), 32, False, id="odd-7x9-batch1"),
    pytest.param((1, 64, 7, 9), 32, True, id="odd-7x9-channels_last"),
    pytest.param((2, 96, 20), 3, False, id="3d-ncl"),
    pytest.param((1, 96, 5, 6), 1, False, id="one-group-96-channels"),  # > BLOCK_C: channel loop
    pytest.param((1, 256, 5, 6), 2, True, id="channels_last-128-per-group"),  # channel loop too
    pytest.param((1, 96, 5, 6), 4, True, id="channels_last-24-per-group"),  # padded, 4 per program
]


def _group_norm_inputs(shape, channels_last, dtype, seed=0, scale=2.0, shift=0.5):
    gen = torch.Generator().manual_seed(seed)
    x = randn(*shape, gen=gen, dtype=dtype, scale=scale, shift=shift)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = randn(shape[1], gen=gen, dtype=dtype, shift=1.0)
    bias = randn(shape[1], gen=gen, dtype=dtype)
    return x, weight, bias


def _group_norm_torch(x, groups, weight, bias, activation):
    """The same-precision torch op that sets the tolerance, run on NCHW-contiguous x.

    torch's CPU channels_last GroupNorm computes the variance as E[x²] − E[x]²:
    at mean 300, std 1 in fp32 it is off by 0.42 where the NCHW path is off by
    1e-4 (test_group_norm_split_statistics_large_mean), which would make the
    tolerance meaningless. The NCHW path is torch's best in that precision.
    """
    y = F.group_norm(x.contiguous(), groups, weight, bias)
    return F.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "groups", "channels_last"), GROUP_NORM_CASES)
def test_group_norm_silu_matches_fp64(assert_matches_ref, shape, groups, channels_last, dtype):
    x, weight, bias = _group_norm_inputs(shape, channels_last, dtype)
    got = group_norm(x, groups, weight, bias, activation="silu")
    ref64 = group_norm_ref(x.double(), groups, weight.double(), bias.double(), activation="silu")
    expected = _group_norm_torch(x, groups, weight, bias, "silu")
    assert got.stride() == x.stride()  # output keeps x's layout
    assert_matches_ref(got, expected, ref64, f"group_norm {shape} {dtype}")


def test_grid_sync_is_cut_until_its_whole_grid_fits():
    """SD1.5's down0 GroupNorm on an H100: 64 group blocks × split 9. What fits depends on the
    kernel compiled for each launch (here: more registers once the split is cut)."""
    fit = group_norm_module.fit_grid_sync
    plan = group_norm_module.plan_launch((2, 320, 64, 64), 32, 1, 2048, 132)
    replan = functools.partial(group_norm_module.plan_launch, (2, 320, 64, 64), 32, 1, 2048, 132)
    assert (plan.blocks, plan.split) == (64, 8)
    # fits as it is
    assert fit(plan, lambda p: 64 * 8, replan, can_cut=True, requested=False) == (plan, True)
    # cut to 4, where the new launch's kernel holds less: cut again, to 3
    seen = []

    def shrinking(p):
        seen.append(p.split)
        return 64 * 4 if p.split == 8 else 64 * 3

    fitted, synced = fit(plan, shrinking, replan, can_cut=True, requested=False)
    assert seen == [8, 4, 3] and fitted.split == 3 and synced
    # a split of 1 would do no grid sync's work: two launches instead, unless requested
    assert fit(plan, lambda p: 64, replan, can_cut=True, requested=False) == (plan, False)
    fitted, synced = fit(plan, lambda p: 64, replan, can_cut=True, requested=True)
    assert fitted.split == 1 and synced
    # cut to 4, whose kernel then fits only one program per block: the cut plan, two launches
    fitted, synced = fit(plan, lambda p: 64 * (4 if p.split == 8 else 1), replan, True, False)
    assert fitted.split == 4 and not synced
    # the caller's own split is not cut
    assert fit(plan, lambda p: 64 * 4, replan, can_cut=False, requested=False) == (plan, False)
    with pytest.raises(ValueError, match="do not fit on the GPU at once"):
        fit(plan, lambda p: 64 * 4, replan, can_cut=False, requested=True)


@pytest.mark.parametrize(
    ("one_launch_offset", "works"),
    [(0.0, True), (0.5, False), (None, False)],
    ids=["agrees", "differs", "raises"],
)
def test_grid_sync_is_checked_once_per_device_before_the_default_uses_it(
    monkeypatch, caplog, one_launch_offset, works
):
    """A grid sync that fails its first-use check (a refused cooperative launch, a barrier
    that does not hold) leaves the default in two launches, with one warning."""
    monkeypatch.setattr(group_norm_module, "_grid_sync_ok", {})
    calls = []

    def fake_group_norm(x, groups, *args, one_launch, **kwargs):
        calls.append(one_launch)
        if one_launch_offset is None and one_launch:
            raise RuntimeError("cooperative launch too large")
        return x + (one_launch_offset if one_launch else 0.0)

    monkeypatch.setattr(group_norm_module, "group_norm", fake_group_norm)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="fewstep.kernels"):
        assert group_norm_module.grid_sync_works(cpu) is works
        assert group_norm_module.grid_sync_works(cpu) is works  # cached: no second check
    assert calls == ([True, False] if one_launch_offset is not None else [True])
    warnings = [r.getMessage() for r in caplog.records if "two launches" in r.getMessage()]
    assert len(warnings) == (0 if works else 1)
    if one_launch_offset is None:
        assert "cooperative launch too large" in warnings[0]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_of_a_channel_slice(assert_matches_ref, channels_last):
    """x not dense (channels 16..79 of a wider tensor): y is allocated dense, with other
    strides than x's, and the kernel must write it by its own."""
    wide, weight, bias = _group_norm_inputs((2, 96, 5, 7), channels_last, torch.float32)
    x = wide[:, 16:80]
    got = group_norm(x, 32, weight[:64], bias[:64], activation="silu")
    ref64 = group_norm_ref(
        x.double(), 32, weight[:64].double(), bias[:64].double(), activation="silu"
    )
    expected = _group_norm_torch(x, 32, weight[:64], bias[:64], "silu")
    assert_matches_ref(got, expected, ref64, "group_norm of a channel slice")


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_plain_no_affine(assert_matches_ref, dtype):
    x, _, _ = _group_norm_inputs((2, 64, 6, 10), False, dtype)
    got = group_norm(x, 32)
    ref64 = group_norm_ref(x.double(), 32)
    assert_matches_ref(got, F.group_norm(x, 32), ref64, f"group_norm no affine {dtype}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_group_norm_split_statistics_large_mean(assert_matches_ref, dtype, channels_last):
    """Several programs and tiles per group, merged (Chan et al.), on data with mean ≫ std.

    A mean of 300 with unit std: E[x²] − E[x]² in fp32 would lose ~1e-2 of the
    variance to cancellation; the merged two-pass statistics must not.
    """
    # 8 channels per group; tile=1024·gpp → [gpp, 8, 128] tiles, 960 positions → 8 tiles
    # per group; split 3 → 3, 3 and 2 tiles per program.
    shape = (1, 64, 24, 40)
    x, weight, bias = _group_norm_inputs(
        shape, channels_last, dtype, seed=1, scale=1.0, shift=300.0
    )
    ref64 = group_norm_ref(x.double(), 8, weight.double(), bias.double(), activation="silu")
    expected = _group_norm_torch(x, 8, weight, bias, "silu")
    for gpp in (1, 4):  # one group per program, and 4 (the channels_last form)
        got = group_norm(
            x, 8, weight, bias, activation="silu", split=3, tile=1024 * gpp, groups_per_program=gpp
        )
        assert_matches_ref(got, expected, ref64, f"group_norm split {dtype}, {gpp} groups")
    single = group_norm(x, 8, weight, bias, activation="silu", split=1)
    assert_matches_ref(single, expected, ref64, f"group_norm unsplit {dtype}")
    # the grid sync's code (partials, barrier, merge) with one program per group block: the
    # most the interpreter, which runs programs one after another, can check of it
    synced = group_norm(x, 8, weight, bias, activation="silu", split=1, one_launch=True)
    assert_matches_ref(synced, expected, ref64, f"group_norm grid sync {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_adds_the_input_bias_first(assert_matches_ref, dtype, channels_last):
    """A ResNet block's time embedding [N, C], added inside the kernel: against torch adding it
    in the same precision, then GroupNorm + SiLU."""
    x, weight, bias = _group_norm_inputs((2, 320, 6, 10), channels_last, dtype, seed=2)
    temb = randn(2, 320, gen=torch.Generator().manual_seed(3), dtype=dtype, scale=3.0)
    ref64 = group_norm_ref(
        x.double(), 32, weight.double(), bias.double(), activation="silu", input_bias=temb.double()
    )
    expected = _group_norm_torch(x + temb[:, :, None, None], 32, weight, bias, "silu")
    for knobs in ({}, {"split": 3, "tile": 1024}, {"one_launch": True}):
        got = group_norm(x, 32, weight, bias, activation="silu", input_bias=temb, **knobs)
        assert_matches_ref(got, expected, ref64, f"group_norm + input bias {dtype} {knobs}")
    with pytest.raises(ValueError, match=r"input_bias must have shape \(2, 320\)"):
        group_norm(x, 32, weight, bias, input_bias=temb[:, :, None, None])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_channel_blocks(assert_matches_ref, channels_last):
    """Tiles of 2 channels (a power of 2 that divides SD's 10: no masked lane), 1, and 16
    (the default's padded block), with and without a split."""
    x, weight, bias = _group_norm_inputs((1, 40, 6, 10), channels_last, torch.float16, seed=4)
    ref64 = group_norm_ref(x.double(), 4, weight.double(), bias.double(), activation="silu")
    expected = _group_norm_torch(x, 4, weight, bias, "silu")
    for block, split in ((2, None), (2, 3), (1, 2), (16, 3)):
        got = group_norm(
            x, 4, weight, bias, activation="silu", channel_block=block, split=split, tile=1024
        )
        assert_matches_ref(got, expected, ref64, f"group_norm, {block}-channel tiles")
    with pytest.raises(ValueError, match="channel_block must be a power of 2"):
        group_norm(x, 4, weight, bias, channel_block=6)


def test_group_norm_barrier_leaves_its_words_ready_for_the_next_call():
    """Each grid sync flips the top bit of its groups' barrier words and nothing else, so
    the words need no reset between calls (or CUDA graph replays)."""
    x, weight, bias = _group_norm_inputs((2, 64, 5, 6), False, torch.float32)
    words = group_norm_module._barrier_words(x.device, 16)
    words.zero_()
    flipped = torch.full((16,), -(2**31), dtype=torch.int32)  # 0x80000000 as int32
    untouched = words[16:].clone()
    for expected in (flipped, torch.zeros(16, dtype=torch.int32), flipped):
        group_norm(x, 8, weight, bias, one_launch=True)  # 2 · 8 groups, one program each
        assert torch.equal(words[:16], expected)
        assert torch.equal(words[16:], untouched)


def test_channels_last_programs_take_rows_of_whole_groups():
    per_program = group_norm_module.default_groups_per_program
    # SD's GroupNorm(32) at 320, 640, 1280 channels (U-Net) and 128, 512 (VAE)
    assert [per_program(32, c // 32, c) for c in (320, 640, 1280, 128, 512)] == [8, 4, 2, 32, 8]
    assert per_program(32, 10, 1) == 1  # NCHW: a group's channels are planes already
    assert per_program(6, 10, 60) == 2  # a power of 2 that divides the groups
    assert per_program(32, 200, 6400) == 1


def test_launch_plans_for_sd_shapes_on_an_h100():
    plan = group_norm_module.plan_launch
    h100 = 132  # SMs
    # (groups per program, group blocks, split, BLOCK_C, BLOCK_S, spatial per program)
    down0 = plan((2, 320, 64, 64), 32, 1, 2048, h100)
    assert dataclasses.astuple(down0) == (1, 64, 8, 16, 128, 512)  # 512 programs
    down0_cl = plan((2, 320, 64, 64), 32, 320, 2048, h100)
    assert dataclasses.astuple(down0_cl) == (8, 8, 64, 16, 16, 64)  # merges 8 · 64 partials
    # the VAE's largest: 32 groups per program would leave one block split 512 ways, each
    # program merging 16384 partials; the default halves it to 4 groups per program
    vae_cl = plan((1, 128, 512, 512), 32, 128, 2048, h100)
    assert dataclasses.astuple(vae_cl) == (4, 8, 64, 4, 128, 4096)
    assert dataclasses.astuple(plan((1, 128, 512, 512), 32, 128, 2048, h100, 64, 32)) == (
        32,
        1,
        64,
        4,
        16,
        4096,  # an explicit groups_per_program is kept
    )
    assert plan((2, 320, 64, 64), 32, 320, 16384, None).split == 1  # the interpreter


@pytest.mark.parametrize("stride_s", [1, 0], ids=["nchw", "channels_last"])
def test_launch_plans_cover_every_position_once(stride_s):
    for shape, groups in (
        ((2, 320, 64, 64), 32),
        ((2, 1280, 8, 8), 32),
        ((8, 512, 128, 128), 32),
        ((1, 96, 7, 9), 3),
        ((1, 64, 1, 1), 32),
    ):
        for sms, split in ((132, None), (132, 5), (None, None), (16, None)):
            p = group_norm_module.plan_launch(shape, groups, stride_s or shape[1], 2048, sms, split)
            hw = math.prod(shape[2:])
            assert p.blocks * p.groups_per_program == shape[0] * groups
            assert p.s_per_prog % p.block_s == 0
            assert (p.split - 1) * p.s_per_prog < hw <= p.split * p.s_per_prog  # none idle
            assert p.groups_per_program * p.split <= 512 or p.groups_per_program == 1


def test_resident_programs_takes_the_tightest_limit():
    h100 = SimpleNamespace(
        multi_processor_count=132,
        regs_per_multiprocessor=65536,
        max_threads_per_multi_processor=2048,
        shared_memory_per_multiprocessor=233472,
    )
    resident = group_norm_module.resident_programs
    assert resident(40, 0, 4, h100) == 132 * 12  # registers: 65536 // (1280 · 4)
    assert resident(255, 0, 8, h100) == 132 * 1  # 255 → 256 per thread: one 8-warp program
    assert resident(16, 0, 4, h100) == 132 * 16  # threads: 2048 // 128
    assert resident(16, 100_000, 4, h100) == 132 * 2  # shared memory
    assert resident(8, 0, 1, h100) == 132 * 32  # at most 32 programs per SM


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_nan_propagates(assert_matches_ref, channels_last):
    x, weight, bias = _group_norm_inputs((1, 64, 7, 9), channels_last, torch.float16)
    x[0, 5, 2, 3] = float("nan")  # group 2 (channels 4, 5) becomes all NaN in torch
    got = group_norm(x, 32, weight, bias, activation="silu")
    expected = _group_norm_torch(x, 32, weight, bias, "silu")
    assert torch.isnan(expected[0, 4:6]).all() and not torch.isnan(expected[0, 6:]).any()
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    ref64 = group_norm_ref(x.double(), 32, weight.double(), bias.double(), activation="silu")
    assert_matches_ref(got, expected, ref64, "group_norm with NaN")


def test_comparison_fails_on_nan_and_lists_mismatches(assert_matches_ref):
    """The checker itself: a NaN (or a wrong value) where the reference is finite must fail."""
    x, weight, bias = _group_norm_inputs((1, 64, 7, 9), False, torch.float32)
    ref64 = group_norm_ref(x.double(), 32, weight.double(), bias.double())
    expected = F.group_norm(x, 32, weight, bias)
    poisoned = expected.clone()
    poisoned[0, 3, 1, 1] = float("nan")
    with pytest.raises(AssertionError, match=r"\(0, 3, 1, 1\): got nan"):
        assert_matches_ref(poisoned, expected, ref64, "poisoned")
    off = expected.clone()
    off[0, 0, 0, 0] += 1e-3
    with pytest.raises(AssertionError, match="first mismatches"):
        assert_matches_ref(off, expected, ref64, "off by 1e-3")


def _poison_allocations(monkeypatch):
    """torch.empty / empty_like / empty_strided return NaN-filled memory for float dtypes."""
    originals = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}

    def poisoned(name):
        def alloc(*args, **kwargs):
            t = originals[name](*args, **kwargs)
            if t.is_floating_point() and t.device.type != "meta":
                t.fill_(float("nan"))
            return t

        return alloc

    for name in originals:
        monkeypatch.setattr(torch, name, poisoned(name))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_writes_every_output(monkeypatch, channels_last):
    x, weight, bias = _group_norm_inputs((1, 64, 7, 9), channels_last, torch.float32)
    _poison_allocations(monkeypatch)
    got = group_norm(x, 8, weight, bias, activation="silu", split=2, tile=128)  # [8, 16] tiles
    assert not torch.isnan(got).any()
    got = group_norm(x, 8, weight, bias, activation="silu", tile=128, one_launch=True)
    assert not torch.isnan(got).any()
    got = group_norm_op(x, 32, weight, bias, 1e-5, "silu")
    assert not torch.isnan(got).any()


def test_group_norm_launches_one_form_per_call(assert_matches_ref, monkeypatch):
    """Which kernels a call launches, on which grid, in which mode: split 1 the forward
    kernel's one pass; a split the statistics kernel, then the forward kernel merging its
    partials; one_launch the forward kernel's grid sync, as a cooperative launch."""
    launches = []

    class Spy:
        def __init__(self, label, kernel):
            self.label, self.kernel = label, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                cooperative = kwargs.get("launch_cooperative_grid", False)
                launches.append((self.label, grid, kwargs.get("MODE"), cooperative))
                return self.kernel[grid](*args, **kwargs)

            return launch

    for name, label in (("_group_norm_stats_kernel", "stats"), ("_group_norm_fwd_kernel", "fwd")):
        monkeypatch.setattr(group_norm_module, name, Spy(label, getattr(group_norm_module, name)))
    x, weight, bias = _group_norm_inputs((2, 16, 16, 16), False, torch.float32)
    ref64 = group_norm_ref(x.double(), 8, weight.double(), bias.double(), activation="silu")
    expected = _group_norm_torch(x, 8, weight, bias, "silu")
    forms = [  # 2 · 8 groups, one per group block; tile 64: 2 slices of 128 positions
        ({}, [("fwd", (16, 1), 1, False)]),
        ({"split": 2, "tile": 64}, [("stats", (16, 2), None, False), ("fwd", (16, 2), 0, False)]),
        ({"one_launch": True}, [("fwd", (16, 1), 2, True)]),
    ]
    for knobs, want in forms:
        launches.clear()
        got = group_norm(x, 8, weight, bias, activation="silu", **knobs)
        assert launches == want, knobs
        assert_matches_ref(got, expected, ref64, f"group_norm {knobs}")


# Attention ------------------------------------------------------------------

ATTENTION_CASES = [
    # (B, H, L_q, L_kv, D); q, k, v as diffusers makes them: [B, L, H, D] viewed as [B, H, L, D]
    pytest.param(2, 2, 256, 256, 40, id="sd15-down0-self-d40-scaled"),  # (2, 8, 4096, 40)
    pytest.param(2, 2, 256, 77, 40, id="sd15-down0-cross-d40-77keys"),
    pytest.param(1, 2, 64, 64, 80, id="sd15-down1-self-d80-scaled"),  # (2, 8, 1024, 80)
    pytest.param(1, 2, 63, 77, 160, id="sd15-down2-cross-d160-63queries"),  # (2, 8, 256, 160)
    pytest.param(1, 1, 200, 200, 64, id="sd2-self-d64-200tokens"),  # tails in q and k blocks
    pytest.param(1, 3, 1, 77, 40, id="one-query-77keys"),
    pytest.param(1, 2, 40, 40, 96, id="d96-two-blocks-unpadded"),
    pytest.param(1, 2, 40, 77, 24, id="d24-one-padded-block"),
    pytest.param(1, 2, 33, 33, 8, id="d8-below-a-dot"),
]


def _attention_inputs(b, h, l_q, l_kv, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = randn(b, l_q, h, d, gen=gen, dtype=dtype).transpose(1, 2)
    k = randn(b, l_kv, h, d, gen=gen, dtype=dtype).transpose(1, 2)
    v = randn(b, l_kv, h, d, gen=gen, dtype=dtype).transpose(1, 2)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "h", "l_q", "l_kv", "d"), ATTENTION_CASES)
def test_attention_matches_fp64(assert_matches_ref, b, h, l_q, l_kv, d, dtype):
    q, k, v = _attention_inputs(b, h, l_q, l_kv, d, dtype)
    got = attention(q, k, v)
    ref64 = attention_ref(q.double(), k.double(), v.double())
    expected = F.scaled_dot_product_attention(q, k, v)
    assert got.stride() == q.stride()  # output in q's [B, L, H, D] memory layout
    assert_matches_ref(got, expected, ref64, f"attention {(b, h, l_q, l_kv, d)} {dtype}")


def test_head_dim_blocks_cover_the_head_dim_with_fewer_padded_lanes():
    sd = {d: head_dim_blocks(d) for d in (40, 64, 80, 160)}
    assert sd == {40: (32, 16), 64: (64, 0), 80: (64, 16), 160: (128, 32)}
    for d in range(1, 257):
        main, rest = head_dim_blocks(d)
        padded = head_dim_blocks(d, pad=True)
        assert padded == (max(16, triton.next_power_of_2(d)), 0)
        assert main + rest >= d and main + rest <= padded[0]
        for block in (main, rest):
            assert block == 0 or (block >= 16 and block & (block - 1) == 0)
        assert rest == 0 or main <= d  # only the rest block is ever masked


@pytest.mark.parametrize("d", [40, 80, 160])
def test_attention_padded_head_dim_agrees_with_two_blocks(assert_matches_ref, d):
    """The benchmark's baseline (one padded block) and the default (two blocks) both match."""
    q, k, v = _attention_inputs(1, 2, 48, 77, d, torch.float16, seed=5)
    ref64 = attention_ref(q.double(), k.double(), v.double())
    expected = F.scaled_dot_product_attention(q, k, v)
    for pad in (False, True):
        got = attention(q, k, v, pad_head_dim=pad)
        assert_matches_ref(got, expected, ref64, f"attention d={d} pad_head_dim={pad}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_attention_contiguous_inputs_and_scale(assert_matches_ref, dtype):
    q, k, v = (t.contiguous() for t in _attention_inputs(1, 2, 96, 96, 80, dtype, seed=3))
    got = attention(q, k, v, scale=0.3)
    ref64 = attention_ref(q.double(), k.double(), v.double(), scale=0.3)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert got.is_contiguous()
    assert_matches_ref(got, expected, ref64, f"attention scale=0.3 {dtype}")


def test_attention_nan_propagates(assert_matches_ref):
    q, k, v = _attention_inputs(1, 2, 40, 77, 40, torch.float16)
    q[0, 0, 3, 7] = float("nan")  # one query row of head 0
    k[0, 1, 50, 0] = float("nan")  # one key of head 1: every row of head 1
    got = attention(q, k, v)
    expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.isnan(expected[0, 0, 3]).all() and torch.isnan(expected[0, 1]).all()
    assert not torch.isnan(expected[0, 0, 4:]).any()
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    ref64 = attention_ref(q.double(), k.double(), v.double())
    assert_matches_ref(got, expected, ref64, "attention with NaN")


def test_attention_writes_every_output(monkeypatch):
    q, k, v = _attention_inputs(1, 2, 63, 77, 80, torch.float32)
    _poison_allocations(monkeypatch)
    assert not torch.isnan(attention(q, k, v)).any()
    assert not torch.isnan(attention_op(q, k, v)).any()
    assert not torch.isnan(attention(q.contiguous(), k, v)).any()


# GEGLU ----------------------------------------------------------------------

GEGLU_CASES = [
    # x's shape [B, L, 2·I]: a feed-forward's projection output
    pytest.param((2, 64, 2 * 80), id="sd15-down0-scaled"),  # (2, 4096, 2 * 1280)
    pytest.param((1, 77, 2 * 24), id="odd-rows-and-width"),
    pytest.param((3, 2 * 300), id="2d-wider-than-a-tile"),
]


def _geglu_input(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 2).to(dtype)  # gates well past ±3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GEGLU_CASES)
def test_geglu_matches_fp64(assert_matches_ref, shape, dtype):
    x = _geglu_input(shape, dtype)
    h, g = x.chunk(2, dim=-1)
    torch_out = h * F.gelu(g)  # diffusers' GEGLU in x's precision
    got = geglu(x)
    assert got.is_contiguous() and got.shape == torch_out.shape
    assert_matches_ref(got, torch_out, geglu_ref(x.double()), f"geglu {shape} {dtype}")


def test_geglu_strided_rows_nan_and_every_output(assert_matches_ref, monkeypatch):
    wide = _geglu_input((2, 9, 2 * 48 + 16), torch.float32)
    x = wide[..., 8 : 8 + 2 * 48]  # rows strided past their width
    x[1, 3, 5] = float("nan")  # an h: its output is NaN, the others are not
    _poison_allocations(monkeypatch)
    got = geglu(x)
    expected = geglu_ref(x.double())
    assert torch.isnan(got[1, 3, 5]) and torch.isnan(got).sum() == 1
    assert_matches_ref(got, geglu_ref(x), expected, "geglu of strided rows")
    with pytest.raises(ValueError, match="last dim must be even"):
        geglu(torch.randn(2, 7))


# LayerNorm ------------------------------------------------------------------

LAYER_NORM_CASES = [
    # x's shape [B, L, C]: a transformer block's tokens
    pytest.param((2, 64, 320), True, id="sd15-down0-scaled"),  # (2, 4096, 320)
    pytest.param((1, 77, 40), True, id="odd-rows-and-width"),
    pytest.param((3, 5, 24), False, id="no-affine"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "affine"), LAYER_NORM_CASES)
def test_layer_norm_matches_fp64(assert_matches_ref, shape, affine, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3 + 5).to(dtype)  # |mean| > std: no cancellation
    w = (torch.randn(shape[-1], generator=gen) + 1).to(dtype) if affine else None
    b = torch.randn(shape[-1], generator=gen).to(dtype) if affine else None
    got = layer_norm(x, w, b)
    torch_out = F.layer_norm(x, (shape[-1],), w, b)
    assert got.is_contiguous() and got.shape == x.shape
    w64, b64 = (None if t is None else t.double() for t in (w, b))
    ref64 = layer_norm_ref(x.double(), w64, b64)
    assert_matches_ref(got, torch_out, ref64, f"layer_norm {shape} {dtype}")


def test_layer_norm_strided_rows_nan_and_every_output(assert_matches_ref, monkeypatch):
    wide = torch.randn(2, 9, 64 + 8, generator=torch.Generator().manual_seed(1))
    x = wide[..., 4 : 4 + 64]  # rows strided past their width
    x[1, 3, 5] = float("nan")  # poisons its row only
    _poison_allocations(monkeypatch)
    got = layer_norm(x, torch.ones(64), torch.zeros(64))
    assert torch.isnan(got[1, 3]).all() and torch.isnan(got).sum() == 64
    assert_matches_ref(got, F.layer_norm(x, (64,)), layer_norm_ref(x.double()), "strided rows")
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        layer_norm(x, torch.ones(63))


# Custom ops, guard and fallback ----------------------------------------------


@pytest.fixture
def fresh_fallback_log(monkeypatch):
    monkeypatch.setattr(kernel_ops, "_logged_reasons", set())


def _forbid_kernels(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton kernel ran; the fallback was expected")

    for name in ("group_norm", "attention", "geglu", "layer_norm"):
        monkeypatch.setattr(kernel_ops, name, boom)


def test_ops_run_the_kernels_when_supported(monkeypatch):
    x, weight, bias = _group_norm_inputs((1, 64, 7, 9), True, torch.float16)
    calls = []
    real = kernel_ops.group_norm
    monkeypatch.setattr(kernel_ops, "group_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert group_norm_fallback_reason(x, 32, weight, bias) is None
    got = group_norm_op(x, 32, weight, bias, 1e-5, "silu")
    assert calls and torch.equal(got, group_norm(x, 32, weight, bias, activation="silu"))
    q, k, v = _attention_inputs(1, 2, 16, 77, 40, torch.float16)
    assert attention_fallback_reason(q, k, v) is None
    assert torch.equal(torch.ops.fewstep.attention(q, k, v), attention(q, k, v))


def test_disable_env_falls_back_to_torch(monkeypatch, fresh_fallback_log, caplog):
    monkeypatch.setenv("FEWSTEP_DISABLE_KERNELS", "1")
    _forbid_kernels(monkeypatch)
    x, weight, bias = _group_norm_inputs((1, 64, 7, 9), True, torch.float32)
    assert "FEWSTEP_DISABLE_KERNELS" in group_norm_fallback_reason(x, 32, weight, bias)
    with caplog.at_level(logging.WARNING, logger="fewstep.kernels"):
        for _ in range(2):
            got = group_norm_op(x, 32, weight, bias, 1e-5, "silu")
    assert torch.equal(got, F.silu(F.group_norm(x, 32, weight, bias)))
    assert got.stride() == x.stride()
    assert len([r for r in caplog.records if "FEWSTEP_DISABLE_KERNELS" in r.getMessage()]) == 1
    temb = torch.randn(1, 64)  # added as diffusers adds it, in x's dtype: the same numbers
    got = group_norm_op(x, 32, weight, bias, 1e-5, "silu", temb)
    assert torch.equal(got, F.silu(F.group_norm(x + temb[:, :, None, None], 32, weight, bias)))
    assert got.stride() == x.stride()
    q, k, v = _attention_inputs(1, 2, 16, 77, 40, torch.float32)
    got = attention_op(q, k, v)
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v))
    assert got.stride() == q.stride()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("float64", "dtype torch.float64"),
        ("transposed-spatial", "do not collapse"),
        ("no-cpu-kernels", "device type cpu"),
    ],
)
def test_group_norm_unsupported_inputs_fall_back(monkeypatch, fresh_fallback_log, case, reason):
    x, weight, bias = _group_norm_inputs((1, 64, 8, 9), False, torch.float32)
    if case == "float64":
        x, weight, bias = x.double(), weight.double(), bias.double()
    elif case == "transposed-spatial":
        x = x.transpose(2, 3)  # strides (576, 72, 1, 9): no single spatial stride
    else:
        monkeypatch.setattr(kernel_interpreter, "KERNEL_DEVICES", ("cuda",))
    assert reason in group_norm_fallback_reason(x, 32, weight, bias)
    _forbid_kernels(monkeypatch)
    got = group_norm_op(x, 32, weight, bias, 1e-5, "silu")
    torch.testing.assert_close(got, F.silu(F.group_norm(x, 32, weight, bias)), rtol=0, atol=0)
    assert got.stride() == torch.empty_like(x).stride()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("head-dim-320", "head dim > 256"),
        ("strided-head-dim", "non-unit stride"),
        ("negative-scale", "scale <= 0"),
    ],
)
def test_attention_unsupported_inputs_fall_back(monkeypatch, fresh_fallback_log, case, reason):
    scale = -0.2 if case == "negative-scale" else None
    if case == "head-dim-320":
        q, k, v = _attention_inputs(1, 1, 8, 8, 320, torch.float32)
    elif case == "strided-head-dim":
        q, k, v = (t[..., ::2] for t in _attention_inputs(1, 2, 8, 77, 80, torch.float32))
    else:
        q, k, v = _attention_inputs(1, 2, 8, 77, 40, torch.float32)
        with pytest.raises(ValueError, match="scale must be > 0"):
            attention(q, k, v, scale)
    assert reason in attention_fallback_reason(q, k, v, scale)
    _forbid_kernels(monkeypatch)
    got = attention_op(q, k, v, scale)
    expected = F.scaled_dot_product_attention(q, k, v, scale=scale)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_ops_reject_bad_arguments():
    x = torch.randn(1, 64, 4, 4)
    with pytest.raises(ValueError, match="num_groups must be positive and divide the 64"):
        group_norm_op(x, 24)
    with pytest.raises(ValueError, match="activation must be one of"):
        group_norm_op(x, 32, None, None, 1e-5, "gelu")
    with pytest.raises(ValueError, match="weight must have shape"):
        group_norm_op(x, 32, torch.ones(32))
    for knob, message in (
        ({"split": 0}, "split must be"),
        ({"warps": 3}, "warps must be"),
        ({"split": 2, "one_launch": True}, "needs a CUDA GPU"),
        ({"groups_per_program": 3}, "power of 2 dividing num_groups=32"),
        ({"groups_per_program": 64}, "power of 2 dividing num_groups=32"),
    ):
        with pytest.raises(ValueError, match=message):
            group_norm(x, 32, **knob)
    q = torch.randn(1, 2, 8, 40)
    with pytest.raises(ValueError, match="must agree"):
        attention_op(q, torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64))


def test_kernels_called_directly_name_a_device_they_cannot_run_on(monkeypatch):
    # A CPU tensor without the interpreter: a ValueError naming the fix, not Triton's
    # "0 active drivers" from inside the launch.
    monkeypatch.setattr(kernel_interpreter, "INTERPRETED", False)
    monkeypatch.setattr(kernel_interpreter, "KERNEL_DEVICES", ("cuda",))
    with pytest.raises(ValueError, match=r"x: device type cpu .*TRITON_INTERPRET=1"):
        group_norm(torch.randn(1, 64, 4, 4), 32)
    q = torch.randn(1, 2, 8, 40)
    with pytest.raises(ValueError, match=r"q: device type cpu .*TRITON_INTERPRET=1"):
        attention(q, q, q)


def test_fake_impls_promise_the_real_layouts():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, weight, bias = _group_norm_inputs((1, 64, 7, 9), True, torch.float16)
    q, k, v = _attention_inputs(1, 2, 16, 77, 40, torch.float16)
    real_gn = group_norm_op(x, 32, weight, bias, 1e-5, "silu")
    real_attn = attention_op(q, k, v)
    with FakeTensorMode() as mode:
        fx, fw, fb, fq, fk, fv = (mode.from_tensor(t) for t in (x, weight, bias, q, k, v))
        fake_gn = group_norm_op(fx, 32, fw, fb, 1e-5, "silu")
        fake_attn = attention_op(fq, fk, fv)
    for fake, real in ((fake_gn, real_gn), (fake_attn, real_attn)):
        assert (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype)


def test_opcheck_group_norm():
    x, weight, bias = _group_norm_inputs((1, 16, 4, 5), True, torch.float32)
    torch.library.opcheck(group_norm_op, (x, 4, weight, bias, 1e-5, "silu"))
    torch.library.opcheck(group_norm_op, (x.contiguous(), 4, None, None, 1e-6, None))
    torch.library.opcheck(group_norm_op, (x, 4, weight, bias, 1e-5, "silu", torch.randn(1, 16)))


@pytest.mark.parametrize(
    ("case", "reason"),
    [("float64", "dtype torch.float64"), ("disabled", "disabled by FEWSTEP_DISABLE_KERNELS")],
)
def test_geglu_op_runs_the_kernel_or_falls_back_to_diffusers_math(
    monkeypatch, fresh_fallback_log, case, reason
):
    x = _geglu_input((2, 5, 2 * 24), torch.float32)
    assert geglu_fallback_reason(x) is None
    torch.testing.assert_close(geglu_op(x), geglu(x), rtol=0, atol=0)
    if case == "float64":
        x = x.double()
    else:
        monkeypatch.setenv(kernel_ops.DISABLE_ENV, "1")
    assert reason in geglu_fallback_reason(x)
    _forbid_kernels(monkeypatch)
    h, g = x.chunk(2, dim=-1)
    torch.testing.assert_close(geglu_op(x), h * F.gelu(g), rtol=0, atol=0)


def test_layer_norm_op_runs_the_kernel_or_falls_back_to_torch(monkeypatch, fresh_fallback_log):
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(2))
    w, b = torch.rand(48) + 0.5, torch.randn(48)
    assert layer_norm_fallback_reason(x, w, b) is None
    torch.testing.assert_close(layer_norm_op(x, w, b), layer_norm(x, w, b), rtol=0, atol=0)
    assert "rows wider than" in layer_norm_fallback_reason(torch.randn(2, 8193))
    assert "weight is not contiguous" in layer_norm_fallback_reason(x, torch.rand(96)[::2], b)
    monkeypatch.setenv(kernel_ops.DISABLE_ENV, "1")
    _forbid_kernels(monkeypatch)
    torch.testing.assert_close(
        layer_norm_op(x, w, b, 1e-6), F.layer_norm(x, (48,), w, b, 1e-6), rtol=0, atol=0
    )


def test_opcheck_layer_norm():
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(3))
    torch.library.opcheck(layer_norm_op, (x, torch.rand(32), torch.randn(32), 1e-5))
    torch.library.opcheck(layer_norm_op, (x, None, None, 1e-6))


def test_opcheck_geglu():
    torch.library.opcheck(geglu_op, (_geglu_input((2, 3, 2 * 16), torch.float32),))


def test_opcheck_attention():
    q, k, v = _attention_inputs(1, 2, 16, 77, 40, torch.float32)
    torch.library.opcheck(attention_op, (q, k, v, None))
    torch.library.opcheck(attention_op, (q.contiguous(), k, v, 0.25))


def test_compile_sees_through_the_ops():
    x, weight, bias = _group_norm_inputs((1, 16, 4, 5), True, torch.float32)
    q, k, v = _attention_inputs(1, 2, 16, 77, 40, torch.float32)

    ff = _geglu_input((1, 8, 2 * 16), torch.float32)

    def block(x, q, k, v, ff):
        gn = group_norm_op(x, 4, weight, bias, 1e-5, "silu") * 2
        return gn, attention_op(q, k, v) + 1, geglu_op(ff) - 1, layer_norm_op(ff) * 3

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)  # no graph break
    for got, expected in zip(compiled(x, q, k, v, ff), block(x, q, k, v, ff), strict=True):
        assert torch.equal(got, expected)


# Benchmark harness -------------------------------------------------------------


def test_kernels_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernels_bench.py"), "--output", str(out)]
        + ["--warmup", "0", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["interpreter"] is True and result["group_norm"] and result["attention"]
    for case in result["group_norm"]:
        assert case["kernel_gb_per_s"] > 0 and case["torch_ms"]["p50"] > 0
        assert case["max_abs_diff_vs_torch"] < 1e-4
    for case in result["attention"]:
        assert case["kernel_tflop_per_s"] > 0 and case["max_abs_diff_vs_torch"] < 1e-4


# Compiles for real GPUs (no GPU needed) ------------------------------------------

_COMPILE_FOR_GPU = r"""
import itertools, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fewstep.kernels._interpreter import INTERPRETED
from fewstep.kernels.attention import GPU_CONFIGS, _attention_fwd_kernel
from fewstep.kernels.geglu import _GPU_TILE, _geglu_kernel
from fewstep.kernels.layer_norm import _GPU_TILE as LN_TILE, _layer_norm_kernel
from fewstep.kernels.group_norm import _TILE_GPU, _group_norm_fwd_kernel, _group_norm_stats_kernel
from fewstep.kernels.group_norm import default_groups_per_program

assert not INTERPRETED
SHARED_LIMIT = {80: 166912, 90: 232448}  # max shared memory per block, bytes (A100, H100)

def build(fn, dtype, consts, cc, aligned=(), **options):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = {"partial_ptr": "*fp32", "sem_ptr": "*i32"}.get(name, "*" + dtype)
        else:
            sig[name] = "fp32" if name in ("eps", "qk_scale") else "i32"
    # aligned: name prefixes of the integer arguments that a launch on SD's shapes finds
    # divisible by 16 and specializes (strides of H·D = 320, 640, 1280 elements; 64² pixels),
    # pointers too
    def divisible(name):
        specialized = name.endswith("_ptr") or name.startswith(aligned)
        return aligned and name not in consts and specialized
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if divisible(name)}
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", cc, 32),
                            options=options)
    assert kernel.metadata.shared <= SHARED_LIMIT[cc], (fn.__name__, dtype, consts, cc)
    return kernel.asm["ptx"]

def key_loop(ptx):  # the PTX between the longest loop's label and its backward branch
    labels = {m.group(1): m.start() for m in re.finditer(r"^(\$L__\w+):", ptx, re.M)}
    branches = re.finditer(r"bra(?:\.uni)?\s+(\$L__\w+);", ptx)
    loops = [(labels[m.group(1)], m.start()) for m in branches
             if labels.get(m.group(1), len(ptx)) < m.start()]
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return ptx[start:end]

for cc, dtype in itertools.product((80, 90), ("fp16", "bf16", "fp32")):
    size = 4 if dtype == "fp32" else 2
    # SD's head dims (40, 80, 160) as two blocks, and each bucket's one padded block
    blocks = {64: [(32, 16), (64, 0)], 128: [(64, 16), (128, 0)], 256: [(128, 32), (256, 0)]}
    for (elem, lanes), configs in GPU_CONFIGS.items():
        # the first config must fit an A100; the autotuner skips the others where they don't
        for i, (bm, bn, warps, stages) in enumerate(configs if cc == 90 else configs[:1]):
            for (block_d, block_dr), even in itertools.product(blocks[lanes], (True, False)):
                # uneven: 8 lanes short of the blocks, as SD's 40 in 32 + 16
                head_dim = block_d + block_dr - (0 if even else 8)
                consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DR=block_dr,
                              D=head_dim, INTERPRETER_BF16=False,
                              DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                              EVEN_N=even, EVEN_D=even)
                if elem == size:
                    ptx = build(_attention_fwd_kernel, dtype, consts, cc, aligned=("stride",),
                                num_warps=warps, num_stages=stages)
                    # pipelined (stages > 1), K and V blocks reach shared memory by
                    # asynchronous copies, masked lanes too: no load waits in the key loop
                    loop = key_loop(ptx)
                    assert stages == 1 or ("cp.async" in loop and "ld.global" not in loop), consts
    # (groups per program, channels): NCHW's one group, channels_last's rows of groups, with
    # SD's 10 channels per group and the unit stride a launch specializes
    for (block_g, block_c), affine, silu in (((1, 16), True, True), ((8, 16), False, False)):
        unit = ("stride_xs", "stride_ys") if block_g == 1 else ("stride_xc", "stride_yc")
        tile = dict(BLOCK_G=block_g, BLOCK_C=block_c, BLOCK_S=_TILE_GPU // (block_g * block_c),
                    HAS_INPUT_BIAS=affine, CPG=10, STAGES=3, **{name: 1 for name in unit})
        stats_tile = {k: v for k, v in tile.items() if k not in ("stride_ys", "stride_yc")}
        aligned = ("stride", "HW", "S_PER_PROG")
        build(_group_norm_stats_kernel, dtype, stats_tile, cc, aligned=aligned, num_warps=4)
        # modes: from partials, one pass, grid sync (a cooperative launch)
        for mode, warps in ((0, 4), (1, 4), (1, 8), (2, 4), (2, 8)):
            consts = dict(HAS_WEIGHT=affine, HAS_BIAS=affine, SILU=silu, INTERPRETER_BF16=False,
                          BLOCK_SPLIT=16, MODE=mode, MAX_POLLS=1 << 16, **tile)
            ptx = build(_group_norm_fwd_kernel, dtype, consts, cc, aligned=aligned,
                        num_warps=warps, launch_cooperative_grid=mode == 2)
            # a group's channels are a constant: y goes out in vectors (channels_last: of a
            # group's 10 channels, 2 at a time), never one 16-bit element per store
            assert dtype == "fp32" or not re.search(r"st\.global[\w:.]*\.b16", ptx), consts
            assert "cp.async" in key_loop(ptx), consts  # x's tiles are loaded ahead of use
            if mode == 2:  # the barrier: one arrival per program (an atomic under a predicate:
                # one thread's), released on arriving, acquired on polling
                arrivals = re.findall(r"(@%p\d+ )?atom\.global\.gpu\.release\.add\.u32", ptx)
                assert len(arrivals) == 1 and all(arrivals), arrivals
                assert re.search(r"@%p\d+ (ld|atom)\.global\.gpu\.acquire", ptx)
    # SD's other channels per group (U-Net 40; VAE 4, 8, 16), with the tiles plan_launch
    # gives them (whole groups; channels_last rows of 128 channels), fp16 on sm_90
    for cpg, layout in itertools.product((40, 4, 8, 16), ("nchw", "channels_last")):
        if (cc, dtype) != (90, "fp16"):
            continue
        block_c = min(triton.next_power_of_2(cpg), 64)
        block_g = default_groups_per_program(32, cpg, 1 if layout == "nchw" else 32 * cpg)
        unit = ("stride_xs", "stride_ys") if layout == "nchw" else ("stride_xc", "stride_yc")
        for mode in (0, 2):
            consts = dict(HAS_WEIGHT=True, HAS_BIAS=True, SILU=True, INTERPRETER_BF16=False,
                          HAS_INPUT_BIAS=False, BLOCK_SPLIT=16, MODE=mode, MAX_POLLS=1 << 16,
                          BLOCK_G=block_g, BLOCK_C=block_c,
                          BLOCK_S=max(16, _TILE_GPU // (block_g * block_c)), CPG=cpg, STAGES=3,
                          **{name: 1 for name in unit})
            ptx = build(_group_norm_fwd_kernel, dtype, consts, cc,
                        aligned=("stride", "HW", "S_PER_PROG"), num_warps=4,
                        launch_cooperative_grid=mode == 2)
            assert not re.search(r"st\.global[\w:.]*\.b16", ptx), consts
    # GEGLU on SD's widths: 16-byte vectors in and out (no 16-bit access left)
    block_m, block_i, warps = _GPU_TILE
    consts = dict(BLOCK_M=block_m, BLOCK_I=block_i, INTERPRETER_BF16=False)
    ptx = build(_geglu_kernel, dtype, consts, cc, aligned=("inner", "stride"), num_warps=warps)
    assert dtype == "fp32" or not re.search(r"(ld|st)\.global[\w:.]*\.b16", ptx), ptx[-2000:]
    # LayerNorm on SD's widths: whole rows, 16-byte vectors in and out
    for width in (320, 640, 1280):
        block_n = triton.next_power_of_2(width)
        consts = dict(N=width, HAS_WEIGHT=True, HAS_BIAS=True, INTERPRETER_BF16=False,
                      BLOCK_M=max(1, LN_TILE // block_n), BLOCK_N=block_n)
        ptx = build(_layer_norm_kernel, dtype, consts, cc, aligned=("stride",), num_warps=4)
        assert dtype == "fp32" or not re.search(r"(ld|st)\.global[\w:.]*\.b16", ptx), width
print("compiled")
"""


@pytest.mark.slow  # ~1 min on 2 cores: every launch config through ptxas for sm_80 and sm_90
def test_kernels_compile_for_gpus():
    """Catches what the interpreter cannot: GPU-only type and layout errors, shared memory."""
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_GPU],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
