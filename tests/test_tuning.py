"""fewstep.kernels.tuning: per shape, the faster of a kernel and torch's op.

On the CPU nothing can be timed, so tests that need choices replace the device timer with
one that reads a table: it runs the candidate and looks at which implementation ran (a spy
on the kernels' launchers), then returns that implementation's made-up time. The ops must
then run exactly the chosen implementation: the same output, bit for bit, as calling it
directly. The real timer is checked on a GPU (marked `gpu`).
"""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import fewstep.kernels.ops as kernel_ops  # noqa: E402
from fewstep.kernels import tuning  # noqa: E402
from fewstep.kernels.patch import (  # noqa: E402
    FewstepAttnProcessor,
    FusedGEGLU,
    FusedGroupNorm,
    FusedLayerNorm,
    FusedUpsampleConv,
    PointwiseConv,
    patch,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

CPU = torch.device("cpu")
FUSED_OPS = (FusedGroupNorm, FusedGEGLU, FusedLayerNorm, FusedUpsampleConv, PointwiseConv)


def label(candidate: str) -> str:
    """What the timing spy sees a candidate run: a kernel launch, or torch's op."""
    return "torch" if candidate == "sdpa" else candidate


@pytest.fixture(autouse=True)
def no_choices():
    tuning.clear()
    yield
    tuning.clear()


@pytest.fixture
def timed_by_table(monkeypatch):
    """{implementation: ms}; the timer runs the candidate and charges what ran: "kernel"
    (with its launch knob, e.g. "kernel-two-launch") or "torch". Returns (table, timed
    implementations in order)."""
    table: dict[str, float] = {}
    timed: list[str] = []
    launched: list[str] = []
    for name in ("group_norm", "attention", "geglu", "layer_norm"):
        launcher = getattr(kernel_ops, name)

        def spy(*args, _launcher=launcher, **kwargs):
            one_launch = kwargs.get("one_launch")
            launched.append({None: "kernel", False: "kernel-two-launch"}.get(one_launch, "k?"))
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(kernel_ops, name, spy)

    def fake_time(fn, device):
        launched.clear()
        fn()
        what = launched[0] if launched else "torch"
        timed.append(what)
        return table[what]

    monkeypatch.setattr(tuning, "can_time", lambda device: True)
    monkeypatch.setattr(tuning, "device_time_ms", fake_time)
    return table, timed


@pytest.fixture
def timed_by_name(monkeypatch):
    """{candidate: ms}: a timer that charges each candidate its entry (after running it, as
    the real one does). Returns (table, names timed in order)."""
    table: dict[str, float] = {}
    timed: list[str] = []

    def fake_time(fn, device):
        fn()
        timed.append(fn.__name__)
        return table[fn.__name__]

    monkeypatch.setattr(tuning, "can_time", lambda device: True)
    monkeypatch.setattr(tuning, "device_time_ms", fake_time)
    return table, timed


def returning(name: str, value):
    """A candidate named `name` that returns `value` (a tensor) or raises it (an error)."""

    def candidate():
        if isinstance(value, Exception):
            raise value
        return value

    candidate.__name__ = name
    return candidate


def test_choose_times_each_candidate_once_per_key_and_keeps_the_fastest(timed_by_name):
    table, timed = timed_by_name
    table.update(a=3.0, b=1.0, c=2.0)
    candidates = {name: returning(name, torch.ones(3)) for name in ("a", "b", "c")}
    x = torch.empty(2, 3, 4, 5)
    k1 = tuning.signature(x, 32, None)
    k2 = tuning.signature(x.to(memory_format=torch.channels_last), 32, None)
    assert k1 != k2  # strides are part of the key

    assert tuning.choose("op", k1, candidates, CPU, reference="a") == "b"
    assert timed == ["a", "b", "c"]
    assert tuning.choose("op", k1, candidates, CPU, reference="a") == "b"  # stored
    assert timed == ["a", "b", "c"]
    table["b"] = 5.0
    assert tuning.choose("op", k2, candidates, CPU, reference="a") == "c"  # timed anew
    row = {"op": "op", "shapes": [[2, 3, 4, 5], 32, None], "dtype": "float32", "failed": {}}
    assert tuning.choices() == [
        {**row, "layout": "dense", "chosen": "b", "ms": {"a": 3.0, "b": 1.0, "c": 2.0}},
        {**row, "layout": "strided", "chosen": "c", "ms": {"a": 3.0, "b": 5.0, "c": 2.0}},
    ]


def test_where_nothing_can_be_timed_the_first_candidate_runs_and_nothing_is_stored(monkeypatch):
    def must_not_time(fn, device):
        raise AssertionError("timed where nothing can be")

    monkeypatch.setattr(tuning, "device_time_ms", must_not_time)
    assert not tuning.can_time(CPU)  # the interpreter's CPU tensors
    candidates = {"first": must_not_time, "second": must_not_time}  # nothing runs either
    assert tuning.choose("op", (1,), candidates, CPU, reference="second") == "first"
    assert tuning.choices() == []


def test_a_candidate_that_fails_or_disagrees_is_not_chosen(timed_by_name, caplog):
    table, _ = timed_by_name
    table.update(kernel=1.0, nan=1.0, shifted=1.0, torch=2.0)
    expected = torch.tensor([1.0, -2.0, 3.0])
    candidates = {
        "kernel": returning("kernel", RuntimeError("out of resources")),
        "nan": returning("nan", torch.tensor([1.0, float("nan"), 3.0])),
        "shifted": returning("shifted", expected + 0.1),  # 3.3% of max|y|: not rounding
        "torch": returning("torch", expected),
    }
    key = tuning.signature(expected)
    with caplog.at_level(logging.WARNING, logger="fewstep.kernels"):
        assert tuning.choose("op", key, candidates, CPU, reference="torch") == "torch"
    (choice,) = tuning.choices()
    assert choice["ms"] == {"torch": 2.0}
    assert choice["failed"]["kernel"] == "RuntimeError: out of resources"
    assert choice["failed"]["nan"].startswith("Disagrees: differs by nan")
    assert choice["failed"]["shifted"].startswith("Disagrees: differs by 0.1 where 0.0469")
    assert "shifted is not chosen" in caplog.text  # a disagreement is worth a warning
    assert "kernel is not chosen" not in caplog.text  # a candidate that cannot run is not
    # within rounding (16 ulps of TF32, as fp32 may be multiplied in) it is
    tuning.clear()
    candidates["shifted"] = returning("shifted", expected + 0.04)
    assert tuning.choose("op", key, candidates, CPU, reference="torch") == "shifted"
    # the reference itself failing is the op failing
    with pytest.raises(RuntimeError, match="out of resources"):
        tuning.choose("op", (2,), {"kernel": candidates["kernel"]}, CPU, reference="kernel")


def _group_norm_case():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 6, 5, generator=gen).to(memory_format=torch.channels_last)
    w, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    bias = torch.randn(2, 64, generator=gen)
    direct = {
        "kernel": lambda: kernel_ops.group_norm(x, 32, w, b, 1e-5, "silu", input_bias=bias),
        "kernel-two-launch": lambda: kernel_ops.group_norm(
            x, 32, w, b, 1e-5, "silu", input_bias=bias, one_launch=False
        ),
        "torch": lambda: kernel_ops._group_norm_torch(x, 32, w, b, 1e-5, "silu", bias),
    }
    return (lambda: kernel_ops.group_norm_op(x, 32, w, b, 1e-5, "silu", bias, True)), direct


def _attention_case():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 20, 40, generator=gen)
    k, v = torch.randn(2, 2, 3, 77, 40, generator=gen)
    direct = {
        "kernel": lambda: kernel_ops.attention(q, k, v, None),
        "sdpa": lambda: kernel_ops._attention_torch(q, k, v, None),
    }
    return (lambda: kernel_ops.attention_op(q, k, v, None, True)), direct


def _geglu_case():
    x = torch.randn(2, 9, 96, generator=torch.Generator().manual_seed(0))
    direct = {"kernel": lambda: kernel_ops.geglu(x), "torch": lambda: kernel_ops._geglu_torch(x)}
    return (lambda: kernel_ops.geglu_op(x, True)), direct


def _layer_norm_case():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 40, generator=gen)
    w, b = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    direct = {
        "kernel": lambda: kernel_ops.layer_norm(x, w, b, 1e-5),
        "torch": lambda: kernel_ops._layer_norm_torch(x, w, b, 1e-5),
    }
    return (lambda: kernel_ops.layer_norm_op(x, w, b, 1e-5, True)), direct


CASES = {
    "group_norm": _group_norm_case,
    "attention": _attention_case,
    "geglu": _geglu_case,
    "layer_norm": _layer_norm_case,
}


@pytest.mark.parametrize("op", list(CASES))
def test_a_tuned_op_runs_the_fastest_implementation_for_its_shape(timed_by_table, op):
    table, timed = timed_by_table
    tuned, direct = CASES[op]()
    for fastest in direct:  # each implementation the fastest in turn
        tuning.clear()
        table.update({label(name): 1.0 if name == fastest else 2.0 for name in direct})
        got = tuned()
        assert sorted(timed) == sorted(map(label, direct))  # each candidate timed once
        timed.clear()
        tuned()
        assert timed == []  # the choice is kept for this shape
        assert tuning.choices()[0]["chosen"] == fastest
        expected = direct[fastest]()
        assert got.stride() == expected.stride()
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_tuned_attention_without_the_kernel_chooses_among_sdpa(timed_by_table, monkeypatch):
    """A head dim the kernel does not take (the VAE's 512) is still tuned, among SDPA's
    ways; FEWSTEP_DISABLE_KERNELS=1 is torch's own dispatch, untuned."""
    table, timed = timed_by_table
    table["torch"] = 1.0
    q = torch.randn(1, 1, 16, 300, generator=torch.Generator().manual_seed(0))
    got = kernel_ops.attention_op(q, q, q, None, True)
    assert timed == ["torch"]  # on the CPU SDPA's own dispatch is its only way
    (choice,) = tuning.choices()
    assert set(choice["ms"]) == {"sdpa"}
    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q, q, q))
    tuning.clear()
    monkeypatch.setenv("FEWSTEP_DISABLE_KERNELS", "1")
    kernel_ops.attention_op(q[..., :40], q[..., :40], q[..., :40], None, True)
    assert tuning.choices() == []


def test_patch_with_tune_tunes_every_swapped_op_and_matches_diffusers(
    tiny_modules, assert_matches_ref, timed_by_table
):
    table, _ = timed_by_table
    table.update({"kernel": 1.0, "kernel-two-launch": 2.0, "torch": 3.0})
    module64 = tiny_modules.load("sd1", "unet", torch.float64)
    ref64 = tiny_modules.run_unet(module64, tiny_modules.unet_inputs(module64, 1, torch.float64))
    module = tiny_modules.load("sd1", "unet").to(memory_format=torch.channels_last)
    sample, t, hidden = tiny_modules.unet_inputs(module, 1, torch.float32)
    inputs = (sample.contiguous(memory_format=torch.channels_last), t, hidden)
    unpatched = tiny_modules.run_unet(module, inputs)

    patch(module, tune=True)
    fused = [m for m in module.modules() if type(m) in FUSED_OPS]
    processors = [m.processor for m in module.modules() if type(m).__name__ == "Attention"]
    assert {type(m) for m in fused} == set(FUSED_OPS) and all(m.tune for m in fused)
    assert processors and all(isinstance(p, FewstepAttnProcessor) and p.tune for p in processors)
    got = tiny_modules.run_unet(module, inputs)

    chosen = {c["op"]: c["chosen"] for c in tuning.choices()}
    ops = {"group_norm", "attention", "geglu", "layer_norm", "upsample_conv", "pointwise_conv"}
    assert set(chosen) == ops
    assert {chosen[op] for op in ("group_norm", "attention", "geglu", "layer_norm")} == {"kernel"}
    assert_matches_ref(got, unpatched, ref64, "tuned sd1 U-Net fp32")


def test_a_tuned_unet_compiles_in_one_graph(tiny_modules):
    """Under torch.compile's tracing a tuned module keeps one path (the first candidate's
    where the choice is made in Python: the upsamplers' and 1×1 convolutions'): no graph
    break."""
    module = tiny_modules.load("sd1", "unet").to(memory_format=torch.channels_last)
    patch(module, tune=True)
    sample, t, hidden = tiny_modules.unet_inputs(module, 1, torch.float32)
    inputs = (sample.contiguous(memory_format=torch.channels_last), t, hidden)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(
        tiny_modules.run_unet(compiled, inputs), tiny_modules.run_unet(module, inputs)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_time_tells_a_slow_matmul_from_a_fast_one():
    """The real timer: device time in a CUDA graph, outside any capture of the caller's; the
    same product in fp32 (no tensor cores) and in fp16, which agree to rounding."""
    device = torch.device("cuda")
    a, b = (torch.randn(2048, 2048, device=device, dtype=torch.float16) / 32 for _ in range(2))
    candidates = {"fp32": lambda: (a.float() @ b.float()).half(), "fp16": lambda: a @ b}
    assert tuning.can_time(device)
    ms = {name: tuning.device_time_ms(fn, device) for name, fn in candidates.items()}
    assert 0 < ms["fp16"] < ms["fp32"]
    assert tuning.choose("matmul", (0,), candidates, device, reference="fp32") == "fp16"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # inside a capture: untimed, the first candidate
        assert not tuning.can_time(device)
        assert tuning.choose("matmul", (1,), candidates, device, reference="fp32") == "fp32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tuned_attention_times_each_sdpa_backend_and_the_kernel(assert_matches_ref):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = torch.randn(3, 2, 8, 1024, 40, generator=gen, device="cuda").half()
    got = kernel_ops.attention_op(q, k, v, None, True)
    (choice,) = tuning.choices()
    ways = {"sdpa", "sdpa-math", "kernel", *kernel_ops.SDPA_BACKENDS}  # scores: 64 MiB
    assert set(choice["ms"]) | set(choice["failed"]) == ways
    assert choice["chosen"] == min(choice["ms"], key=choice["ms"].get)
    ref64 = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    same_precision = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert_matches_ref(got, same_precision, ref64, "tuned attention fp16")
