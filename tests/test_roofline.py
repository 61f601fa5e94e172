"""fewstep.benchmarks.roofline on small sizes: what it records, the peak it takes, the input it
refuses, and that its OpenVINO int8 graph is a real int8 matmul."""

import numpy as np
import pytest

from fewstep.benchmarks import roofline

SMALL = {"n": 64, "copy_bytes": 1 << 20}


def test_measures_every_format_and_library():
    pytest.importorskip("torch")
    pytest.importorskip("openvino")
    result = roofline.measure_roofline(**SMALL)
    assert result["matmul_size"] == 64 and result["copy_bytes"] == 1 << 20
    assert result["memory_bandwidth_gbs"] > 0
    assert set(result["cpu_flags"]) <= set(roofline.CPU_FLAGS)
    rates = result["matmul_tflops"]
    assert list(rates) == list(roofline.FORMATS)
    for fmt, by_library in rates.items():
        skipped = {key for key in result.get("skipped", {}) if key.endswith(f"/{fmt}")}
        assert set(by_library) | {key.split("/")[0] for key in skipped} == set(roofline.LIBRARIES)
        assert all(rate > 0 for rate in by_library.values())
        assert result["peak_tflops"][fmt] == max(by_library.values())


def test_peak_is_the_best_library_and_a_failing_one_is_skipped(monkeypatch):
    rates = {"a": {"fp32": 1.0, "bf16": 4.0}, "b": {"fp32": 3.0, "bf16": 2.0}}

    def failing(fmt, n):
        raise RuntimeError(f"no {fmt} here\nsecond line")

    libraries = {name: (lambda fmt, n, r=r: r[fmt]) for name, r in rates.items()}
    monkeypatch.setattr(roofline, "LIBRARIES", libraries | {"c": failing})
    result = roofline.measure_roofline(("fp32", "bf16"), **SMALL)
    assert result["matmul_tflops"] == {"fp32": {"a": 1.0, "b": 3.0}, "bf16": {"a": 4.0, "b": 2.0}}
    assert result["peak_tflops"] == {"fp32": 3.0, "bf16": 4.0}
    assert result["skipped"] == {"c/fp32": "no fp32 here", "c/bf16": "no bf16 here"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"formats": ("fp16",)}, r"formats must be among \('fp32', 'bf16', 'int8'\), got 'fp16'"),
        ({"n": 0}, "n must be >= 1, got 0"),
        ({"copy_bytes": 4}, "copy_bytes must be >= 8, got 4"),
    ],
)
def test_bad_arguments_are_refused_before_measuring(monkeypatch, kwargs, message):
    def measured(*_):
        raise AssertionError("measured")

    monkeypatch.setattr(roofline, "LIBRARIES", {"x": measured})
    monkeypatch.setattr(roofline, "memory_bandwidth_gbs", measured)
    with pytest.raises(ValueError, match=message):
        roofline.measure_roofline(**({"n": 64} | kwargs))


def test_openvino_int8_graph_is_an_int8_matmul():
    """The quantized graph runs its product in int8 and computes x @ W within the error its
    per-tensor quantization allows (the weight's step 1/32, the input's 0.05), not exactly."""
    pytest.importorskip("openvino")
    n = 256
    compiled = roofline.openvino_matmul("int8", n)
    assert set(roofline.matmul_runtime_precisions(compiled)) <= {"i8", "u8"}
    x = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    weight = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)  # the graph's
    y = compiled.create_infer_request().infer({0: x})[0]
    exact = x @ weight
    relative = np.linalg.norm(y - exact) / np.linalg.norm(exact)
    # rounding to a step s errs uniformly, variance s²/12, on unit-variance x and W
    expected = np.sqrt((1 / 32) ** 2 / 12 + 0.05**2 / 12)
    assert expected / 2 < relative < 2 * expected


def test_openvino_fp32_graph_is_exact_and_a_format_it_would_not_run_is_refused(monkeypatch):
    pytest.importorskip("openvino")
    n = 64
    compiled = roofline.openvino_matmul("fp32", n)
    assert roofline.matmul_runtime_precisions(compiled) == ["f32"]
    x = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    weight = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    y = compiled.create_infer_request().infer({0: x})[0]
    np.testing.assert_allclose(y, x @ weight, rtol=1e-4, atol=1e-4)
    # a product OpenVINO would run in f32 is no int8 rate
    monkeypatch.setattr(roofline, "matmul_runtime_precisions", lambda _: ["f32"])
    with pytest.raises(RuntimeError, match=r"OpenVINO runs the int8 matmul in \['f32'\]"):
        roofline.openvino_matmul("int8", n)
