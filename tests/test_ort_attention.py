"""The onnxruntime backend's attention fusion (fewstep.backends.ort_attention): every exported
attention of the tiny U-Nets and VAEs becomes one MultiHeadAttention node, outputs stay within
float32 rounding of the graphs as written, and anything off the pattern is left alone."""

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from fewstep.backends.ort import OnnxRuntimeBackend  # noqa: E402
from fewstep.backends.ort_attention import fuse_attention  # noqa: E402
from fewstep.onnx_proto import read_onnx_index  # noqa: E402


def _softmax_count(path):
    return sum(n.op_type == "Softmax" for n in read_onnx_index(path).nodes)


def _unet_inputs(backend, batch=2, size=8, seed=0):
    rng = np.random.default_rng(seed)
    dims = {i.name: i.shape for i in backend._session("unet").get_inputs()}
    feed = {
        "sample": rng.standard_normal((batch, 4, size, size)).astype(np.float32),
        "timestep": np.array(500, dtype=np.int64),
        "encoder_hidden_states": rng.standard_normal(
            (batch, 77, dims["encoder_hidden_states"][2])
        ).astype(np.float32),
    }
    if "timestep_cond" in dims:
        feed["timestep_cond"] = rng.standard_normal((batch, dims["timestep_cond"][1])).astype(
            np.float32
        )
    return feed


@pytest.mark.parametrize("family", ["sd1", "sd2", "lcm"])
def test_every_attention_is_fused_and_outputs_match(tiny_package, family):
    package = tiny_package(family)
    fused = OnnxRuntimeBackend(package)
    plain = OnnxRuntimeBackend(package, fuse_attention=False)
    assert plain.fused_attention == {}
    for graph in ("unet", "vae_decoder"):
        assert fused.fused_attention[graph] == _softmax_count(package / graph / "model.onnx") > 0
    feed = _unet_inputs(fused)
    expected = plain.run("unet", **feed)["out_sample"]
    actual = fused.run("unet", **feed)["out_sample"]
    # float32 rounding: the scores are summed in another order (online softmax)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    latent = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    expected = plain.run("vae_decoder", latent_sample=latent)["sample"]
    actual = fused.run("vae_decoder", latent_sample=latent)["sample"]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_fused_graph_is_valid_onnx_without_the_score_matmuls(tiny_package):
    path = tiny_package("sd1") / "unet" / "model.onnx"
    model, count = fuse_attention(path.read_bytes())
    proto = onnx.load_from_string(model)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MultiHeadAttention") == count > 0 and "Softmax" not in ops
    assert {o.domain: o.version for o in proto.opset_import}["com.microsoft"] == 1
    heads = {a.i for n in proto.graph.node if n.domain == "com.microsoft" for a in n.attribute}
    assert heads <= {1, 2, 4, 8}  # the tiny U-Net's head counts, read from the graph
    # no dangling inputs: every node input is produced, an initializer or a graph input
    known = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer}
    for node in proto.graph.node:
        assert all(not name or name in known for name in node.input), node.name
        known.update(node.output)


def test_text_encoder_and_fp16_graphs_are_left_alone(tiny_model, tiny_package, tmp_path):
    from fewstep.export import export_package

    text = tiny_package("sd1") / "text_encoder" / "model.onnx"
    raw = text.read_bytes()
    assert fuse_attention(raw) == (raw, 0)  # causal-masked attention: not the pattern
    # the CPU kernel is fused for float32 projections only
    fp16 = export_package(tiny_model("sd1"), tmp_path / "fp16", dtype="fp16", progress=False)
    assert OnnxRuntimeBackend(fp16).fused_attention == {"unet": 0, "vae_decoder": 0}


def _attention_model(extra_consumer: bool):
    """One self-attention block as the exporter writes it, built with onnx.helper."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b, s, heads, d = 1, 16, 2, 4
    c = heads * d
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, c)).astype(np.float32), n)
        for n in ("wq", "wk", "wv")
    ]
    inits += [
        numpy_helper.from_array(np.array(v, dtype=np.int64), n)
        for n, v in (("b", [b]), ("s", [s]), ("minus1", [-1]), ("h", [heads]), ("d", [d]))
    ]
    inits.append(numpy_helper.from_array(np.array([b, s, c], dtype=np.int64), "out_shape"))

    def const(name, value, dtype):
        return helper.make_node(
            "Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype=dtype))
        )

    nodes = [helper.make_node("MatMul", ["x", w], [w + "_out"]) for w in ("wq", "wk", "wv")]
    nodes += [const("heads", [heads], np.int64), const("one", [1.0], np.float32)]
    for w in ("wq", "wk", "wv"):
        nodes.append(
            helper.make_node("Concat", ["b", "minus1", "heads", "d"], [w + "_shape"], axis=0)
        )
        nodes.append(helper.make_node("Reshape", [w + "_out", w + "_shape"], [w + "_4d"]))
    nodes += [
        helper.make_node("Transpose", ["wq_4d"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["wk_4d"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["wv_4d"], ["v"], perm=[0, 2, 1, 3]),
        helper.make_node("Shape", ["q"], ["q_shape"]),
        helper.make_node("Slice", ["q_shape", "minus1", "s"], ["d_dim"]),
        helper.make_node("Cast", ["d_dim"], ["d_float"], to=TensorProto.FLOAT),
        helper.make_node("Sqrt", ["d_float"], ["sqrt_d"]),
        helper.make_node("Div", ["one", "sqrt_d"], ["scale"]),
        helper.make_node("Cast", ["scale"], ["scale_f"], to=TensorProto.FLOAT),
        helper.make_node("Sqrt", ["scale_f"], ["root_q"]),
        helper.make_node("Sqrt", ["scale_f"], ["root_k"]),
        helper.make_node("Mul", ["q", "root_q"], ["q_scaled"]),
        helper.make_node("Mul", ["kt", "root_k"], ["k_scaled"]),
        helper.make_node("MatMul", ["q_scaled", "k_scaled"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["o4"]),
        helper.make_node("Transpose", ["o4"], ["o_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o_t", "out_shape"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, s, c])]
    if extra_consumer:  # the probabilities are also a graph output: must not be fused away
        outputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, s, c])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString(), rng.standard_normal((b, s, c)).astype(np.float32)


def test_hand_built_attention_fuses_to_the_same_output():
    model, x = _attention_model(extra_consumer=False)
    fused, count = fuse_attention(model)
    assert count == 1
    run = [
        ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
        for m in (model, fused)
    ]
    np.testing.assert_allclose(run[1], run[0], rtol=0, atol=1e-5 * np.abs(run[0]).max())


def test_an_intermediate_read_elsewhere_blocks_the_fusion():
    model, _ = _attention_model(extra_consumer=True)
    assert fuse_attention(model) == (model, 0)


def test_fusion_with_weights_in_external_data(tiny_package, tmp_path):
    """Big U-Nets keep their weights in model.onnx_data; the fused graph is handed to
    onnxruntime as bytes and must still find them."""
    import shutil

    package = tmp_path / "package"
    shutil.copytree(tiny_package("sd1"), package)
    unet = package / "unet" / "model.onnx"
    model = onnx.load(str(unet))
    onnx.save_model(
        model, str(unet), save_as_external_data=True, location="model.onnx_data", size_threshold=0
    )
    assert (package / "unet" / "model.onnx_data").stat().st_size > unet.stat().st_size
    fused = OnnxRuntimeBackend(package, providers=["CPUExecutionProvider"])
    plain = OnnxRuntimeBackend(package, fuse_attention=False)
    assert fused.fused_attention["unet"] > 0
    feed = _unet_inputs(fused, batch=1, size=16)
    expected = plain.run("unet", **feed)["out_sample"]
    actual = fused.run("unet", **feed)["out_sample"]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
