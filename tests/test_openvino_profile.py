"""The OpenVINO per-layer profile adds up and groups the layers by what they compute."""

import pytest

pytest.importorskip("openvino")

from fewstep.benchmarks.openvino_profile import (  # noqa: E402
    MATRIX_TYPES,
    parse_property,
    parse_shape,
    profile_graph,
)

SHAPES = {"sample": (2, 4, 8, 8), "timestep": (), "encoder_hidden_states": (2, 77, 32)}


def test_a_unet_profile_adds_up(tiny_package):
    result = profile_graph(tiny_package("sd1") / "unet" / "model.onnx", SHAPES, "fp32", 2)
    by_type = result["by_type_ms"]
    assert result["call_ms"] == pytest.approx(sum(by_type.values()))
    assert result["matrix_ms"] == pytest.approx(
        sum(ms for t, ms in by_type.items() if t in MATRIX_TYPES)
    )
    assert result["matrix_ms"] > 0 and "Convolution" in by_type
    shares = ("matrix_share", "fused_subgraph_share", "other_share")
    assert sum(result[k] for k in shares) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="precision"):
        profile_graph(tiny_package("sd1") / "unet" / "model.onnx", SHAPES, "int4")


def test_shapes_parse_and_bad_ones_are_named():
    assert parse_shape("sample=2,4,64,64") == ("sample", (2, 4, 64, 64))
    assert parse_shape("timestep=") == ("timestep", ())
    for bad in ("sample", "=2,4", "sample=2,x"):
        with pytest.raises(ValueError, match="shape"):
            parse_shape(bad)


def test_compile_properties_reach_openvino_and_the_result(tiny_package):
    path = tiny_package("sd1") / "unet" / "model.onnx"
    result = profile_graph(path, SHAPES, "fp32", 1, {"SNIPPETS_MODE": "DISABLE"})
    assert result["compile_properties"]["SNIPPETS_MODE"] == "DISABLE"
    assert "Subgraph" not in result["by_type_ms"]  # OpenVINO fused nothing itself
    assert parse_property("SNIPPETS_MODE=DISABLE") == ("SNIPPETS_MODE", "DISABLE")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_property("SNIPPETS_MODE")
