"""fewstep.export: packages of the tiny families against diffusers/transformers, onnxruntime
and the manifest; single-file sources; atomic writes; argument checks; fp16.

The fp32 packages come from conftest's session-scoped `tiny_package` (shared with the
pipeline tests). References are the diffusers/transformers modules loaded from the source
folder and called through their own APIs, not through fewstep's wrapper modules.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fewstep.atomic_folder as atomic_folder
import fewstep.export.onnx_io as onnx_io
import fewstep.export.package_writer as package_writer
import fewstep.export.verify as verify
from fewstep.export import DTYPES, VerificationError, export_package
from fewstep.package import hash_package_files, read_manifest, verify_package

FAMILIES = ("sd1", "sd2", "lcm", "turbo")
GRAPHS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
# Tiny models (fewstep.export.testing): U-Net latents must be multiples of 2, the VAE scales by 8.
UNET_MULTIPLE, VAE_SCALE = 2, 8


def _tmp_siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-"))


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


class TorchReference:
    """The source's own modules, called through diffusers/transformers APIs, in `dtype`."""

    def __init__(self, folder: Path, dtype=torch.float32):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        self.dtype = dtype
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").to(dtype).eval()
        self.vae = AutoencoderKL.from_pretrained(folder / "vae").to(dtype).eval()
        self.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").to(dtype).eval()

    @torch.no_grad()
    def run(self, graph: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs as float32 arrays; float inputs in `dtype` (timestep in float32)."""
        t = {k: torch.from_numpy(np.asarray(v)).to(self.dtype) for k, v in feed.items()}
        if graph == "text_encoder":
            out = self.text_encoder(torch.from_numpy(feed["input_ids"]))
            outs = [out.last_hidden_state, out.pooler_output]
        elif graph == "unet":
            out = self.unet(
                t["sample"],
                torch.from_numpy(feed["timestep"]).float(),
                t["encoder_hidden_states"],
                timestep_cond=t.get("timestep_cond"),
            )
            outs = [out.sample]
        elif graph == "vae_decoder":
            outs = [self.vae.decode(t["latent_sample"]).sample]
        else:
            dist = self.vae.encode(t["sample"]).latent_dist
            outs = [torch.cat([dist.mean, dist.logvar], dim=1)]
        return [o.float().numpy() for o in outs]


def _inputs(pkg: Path, graph: str, batch: int, height: int, width: int, seed: int) -> dict:
    """Random inputs for a graph at latent height x width, from the graph's declared inputs."""
    rng = np.random.default_rng(seed)
    sizes = {
        "batch": batch,
        "sequence": 20 if graph == "text_encoder" else 154,  # two 77-token chunks
        "height": height,
        "width": width,
        "image_height": height * VAE_SCALE,
        "image_width": width * VAE_SCALE,
    }
    feed = {}
    for value in onnx.load(str(pkg / graph / "model.onnx"), load_external_data=False).graph.input:
        tensor_type = value.type.tensor_type
        shape = [sizes[d.dim_param] if d.dim_param else d.dim_value for d in tensor_type.shape.dim]
        if value.name == "input_ids":
            vocab = json.loads((pkg / "text_encoder" / "config.json").read_text())["vocab_size"]
            feed[value.name] = rng.integers(0, vocab, size=shape, dtype=np.int64)
        elif value.name == "timestep":
            feed[value.name] = np.asarray(rng.uniform(0, 999), dtype=np.float32)
        else:
            dtype = np.float16 if tensor_type.elem_type == onnx.TensorProto.FLOAT16 else np.float32
            feed[value.name] = rng.standard_normal(size=shape).astype(dtype)
    return feed


@pytest.fixture(scope="module")
def references(tiny_model):
    cache: dict[str, TorchReference] = {}

    def get(family: str) -> TorchReference:
        if family not in cache:
            cache[family] = TorchReference(tiny_model(family))
        return cache[family]

    return get


# ---------------------------------------------------------------------------------------------
# fp32 packages of every family
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_manifest_records_model_errors_and_hashes(family, tiny_package, tiny_model):
    pkg = tiny_package(family)
    manifest = read_manifest(pkg)
    verify_package(pkg)  # every hash in the manifest matches its file
    assert set(manifest["files"]) == set(hash_package_files(pkg))
    for path in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "tokenizer/tokenizer.json"):  # fmt: skip
        assert path in manifest["files"], path
    for graph in GRAPHS:
        assert f"{graph}/model.onnx" in manifest["files"]
        entry = manifest["graphs"][graph]
        assert entry["precision"] == "fp32"
        assert 0 <= entry["max_rel_error"] <= 1e-4, (graph, entry)
        assert entry["max_abs_error"] >= 0
    expected = {
        "sd1": ("sd1", "epsilon", None, 50, 7.5),
        "sd2": ("sd2", "v_prediction", None, 50, 7.5),
        "lcm": ("sd1", "epsilon", 32, 4, 8.5),
        "turbo": ("sd2", "epsilon", None, 1, 0.0),
    }[family]
    got = tuple(
        manifest[k]
        for k in ("family", "prediction_type", "guidance_embedding_dim",
                  "default_num_inference_steps", "default_guidance_scale")
    )  # fmt: skip
    assert got == expected
    assert manifest["precision"] == "fp32" and manifest["opset"] == 18
    assert manifest["latent_channels"] == 4 and manifest["vae_scale_factor"] == VAE_SCALE
    assert manifest["vae_scaling_factor"] == pytest.approx(0.18215)
    assert manifest["source"] == {"path": str(tiny_model(family).resolve()), "kind": "diffusers"}
    assert manifest["loras"] == []
    assert set(manifest["versions"]) >= {"fewstep", "torch", "diffusers", "onnx", "onnxruntime"}
    # Each graph folder carries its component's diffusers/transformers config.
    src = tiny_model(family)
    assert set(manifest["graphs"]) == set(GRAPHS)  # no text_encoder_2 outside SDXL
    for graph in GRAPHS:
        component = package_writer.GRAPH_CONFIGS[graph]
        assert (pkg / graph / "config.json").read_bytes() == (
            src / component / "config.json"
        ).read_bytes()
    assert (pkg / "model_index.json").read_bytes() == (src / "model_index.json").read_bytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_io_names_dtypes_and_dynamic_axes(family, tiny_package):
    pkg = tiny_package(family)

    def io(graph):
        model = onnx.load(str(pkg / graph / "model.onnx"), load_external_data=False)

        def describe(values):
            return {
                v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in values
            }

        types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
        return describe(model.graph.input), describe(model.graph.output), types

    inputs, outputs, types = io("text_encoder")
    assert list(inputs) == ["input_ids"] and types["input_ids"] == onnx.TensorProto.INT64
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert outputs == {
        "last_hidden_state": ["batch", "sequence", 32],
        "pooler_output": ["batch", 32],
    }

    inputs, outputs, types = io("unet")
    expected = {
        "sample": ["batch", 4, "height", "width"],
        "timestep": [],  # a float scalar, as in optimum's layout
        "encoder_hidden_states": ["batch", "sequence", 32],
    }
    if family == "lcm":
        expected["timestep_cond"] = ["batch", 32]
    assert list(inputs) == list(expected) and inputs == expected
    assert all(t == onnx.TensorProto.FLOAT for t in types.values())
    assert outputs == {"out_sample": ["batch", 4, "height", "width"]}

    inputs, outputs, _ = io("vae_decoder")
    assert inputs == {"latent_sample": ["batch", 4, "height", "width"]}
    assert outputs == {"sample": ["batch", 3, "image_height", "image_width"]}

    inputs, outputs, _ = io("vae_encoder")
    assert inputs == {"sample": ["batch", 3, "image_height", "image_width"]}
    assert outputs == {"latent_parameters": ["batch", 8, "height", "width"]}

    # The manifest records the same I/O.
    manifest = read_manifest(pkg)
    assert [i["name"] for i in manifest["graphs"]["unet"]["inputs"]] == list(expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("graph", GRAPHS)
def test_graph_matches_torch_at_another_batch_and_size(family, graph, tiny_package, references):
    """Batch 3 and a 6x2 latent: neither the traced shape nor the verification's (2, 4x6)."""
    pkg = tiny_package(family)
    feed = _inputs(pkg, graph, batch=3, height=3 * UNET_MULTIPLE, width=UNET_MULTIPLE, seed=7)
    got = _session(pkg / graph / "model.onnx").run(None, feed)
    ref = references(family).run(graph, feed)
    for g, r in zip(got, ref, strict=True):
        assert _rel_error(g, r) <= 1e-4, graph


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_tokenizer_json_matches_transformers(family, tiny_package, tiny_model):
    """sd1 sources have no tokenizer.json (the export writes it); sd2 ones ship it (copied)."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    had_json = (tiny_model(family) / "tokenizer" / "tokenizer.json").exists()
    assert had_json == (family == "sd2")
    ours = Tokenizer.from_file(str(tiny_package(family) / "tokenizer" / "tokenizer.json"))
    ref = CLIPTokenizer.from_pretrained(tiny_model(family) / "tokenizer")
    for prompt in ["a red circle", "A Photo of an astronaut riding a horse on Mars!!", "  ünï\tx"]:
        assert ours.encode(prompt).ids == ref(prompt).input_ids


# ---------------------------------------------------------------------------------------------
# Single-file checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])  # OpenAI CLIP and OpenCLIP key layouts
def test_single_file_export_matches_folder_export(
    family, tiny_model, tiny_package, tmp_path, save_single_file
):
    ckpt = save_single_file(tiny_model(family), tmp_path / "model.safetensors")
    pkg = export_package(ckpt, tmp_path / "pkg", config=tiny_model(family), progress=False)
    folder_pkg = tiny_package(family)
    manifest = read_manifest(pkg)
    assert manifest["source"]["kind"] == "single_file"
    model_index = json.loads((pkg / "model_index.json").read_text())
    assert model_index["unet"] == ["diffusers", "UNet2DConditionModel"]
    for graph in GRAPHS:
        feed = _inputs(pkg, graph, batch=2, height=2, width=4, seed=3)
        got = _session(pkg / graph / "model.onnx").run(None, feed)
        ref = _session(folder_pkg / graph / "model.onnx").run(None, feed)
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_array_equal(g, r, err_msg=graph)


def test_single_file_of_lcm_is_refused(tiny_model, tmp_path):
    ckpt = tmp_path / "lcm.safetensors"
    ckpt.write_bytes(b"unused: the config is checked first")
    with pytest.raises(NotImplementedError, match="time_cond_proj_dim"):
        export_package(ckpt, tmp_path / "pkg", config=tiny_model("lcm"), progress=False)


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def _plant_killed_export(out: Path) -> Path:
    """What an export killed by SIGKILL leaves next to `out`: a work folder whose lock is free
    (tests/test_atomic_folder.py kills real writers)."""
    work = out.parent / f".{out.name}.tmp-killed00"
    (work / atomic_folder.CONTENT_NAME / "unet").mkdir(parents=True)
    (work / atomic_folder.CONTENT_NAME / "unet" / "model.onnx").write_bytes(b"partial")
    (work / atomic_folder.LOCK_NAME).touch()
    return work


def test_failure_mid_export_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    """...not even the folder of an earlier export to `out` that was killed."""
    real_export = package_writer.export_graph

    def export_graph(spec, *args, **kwargs):
        if spec.name == "unet":
            raise RuntimeError("injected failure exporting unet")
        return real_export(spec, *args, **kwargs)

    monkeypatch.setattr(package_writer, "export_graph", export_graph)
    out = tmp_path / "pkg"
    killed = _plant_killed_export(out)
    assert _tmp_siblings(out) == [killed.name]
    with pytest.raises(RuntimeError, match="injected failure"):
        export_package(tiny_model("sd1"), out, progress=False)
    assert not out.exists()
    assert _tmp_siblings(out) == []


def test_failed_verification_names_the_graph_and_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "FP32_MAX_REL_ERROR", -1.0)  # no graph can pass
    out = tmp_path / "pkg"
    with pytest.raises(VerificationError, match=r"text_encoder \(fp32\).*max rel error"):
        export_package(tiny_model("sd1"), out, progress=False)
    assert not out.exists()
    assert _tmp_siblings(out) == []


def test_non_empty_out_is_refused_and_kept(tiny_model, tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"out must be a new or empty folder.*pkg"):
        export_package(tiny_model("sd1"), out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_external_data_into_empty_out_without_verification(
    tiny_model, tiny_package, tmp_path, monkeypatch, capsys
):
    """Weights over the threshold go to one model.onnx_data per graph (optimum's layout)."""
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    out = tmp_path / "pkg"
    out.mkdir()  # an empty folder is a fine target
    export_package(tiny_model("sd1"), out, progress=True, verify=False)
    stderr = capsys.readouterr().err
    for stage in ("load", "export text_encoder", "export unet", "export vae_decoder",
                  "export vae_encoder", "write"):  # fmt: skip
        assert f"] {stage} done in" in stderr, stage
    assert "verify" not in stderr
    manifest = verify_package(out)
    for graph in GRAPHS:
        lora_map = ["lora_map.json"] if graph in ("text_encoder", "unet") else []
        assert sorted(p.name for p in (out / graph).iterdir()) == [
            "config.json",
            *lora_map,
            "model.onnx",
            "model.onnx_data",
        ]
        assert f"{graph}/model.onnx_data" in manifest["files"]
        assert manifest["graphs"][graph]["max_rel_error"] is None  # not measured
        model = onnx.load(str(out / graph / "model.onnx"), load_external_data=False)
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        # Same graph as the embedded-weights export: same outputs.
        feed = _inputs(out, graph, batch=2, height=4, width=2, seed=11)
        got = _session(out / graph / "model.onnx").run(None, feed)
        ref = _session(tiny_package("sd1") / graph / "model.onnx").run(None, feed)
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_array_equal(g, r, err_msg=graph)


# ---------------------------------------------------------------------------------------------
# Argument checks: before anything is loaded
# ---------------------------------------------------------------------------------------------


class _RunsOnUnpickle:
    """Unpickling this creates a marker file: proof that a loader ran the pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the source was loaded before the arguments were checked")

    monkeypatch.setattr(package_writer, "load_source", fail)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".CKPT"])
def test_pickle_checkpoint_is_refused_unread(suffix, tmp_path, no_loading):
    marker = tmp_path / "unpickled"
    ckpt = tmp_path / f"model{suffix}"
    ckpt.write_bytes(pickle.dumps({"state_dict": _RunsOnUnpickle(marker)}))
    with pytest.raises(ValueError, match=r"pickle.*runs code.*safetensors"):
        export_package(ckpt, tmp_path / "pkg", config=tmp_path, dtype="bogus", progress=False)
    assert not marker.exists()
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(src="missing-folder"), "src does not exist: '.*missing-folder'"),
        (dict(dtype="bf16"), r"dtype must be one of \('fp32', 'fp16'\), got 'bf16'"),
        (dict(opset=16), r"opset must be an int in \[17, 20\], got 16"),
        (dict(opset=21), r"opset must be an int in \[17, 20\], got 21"),
        (dict(opset="18"), r"opset must be an int in \[17, 20\], got '18'"),
        (dict(src="model.safetensors"), "src does not exist"),
    ],
)
def test_bad_arguments_fail_before_loading(change, match, tiny_model, tmp_path, no_loading):
    kwargs = dict(src=tiny_model("sd1"), out=tmp_path / "pkg", progress=False)
    if "src" in change:
        change = dict(src=tmp_path / change["src"])
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        export_package(**kwargs)
    assert not (tmp_path / "pkg").exists()


def test_single_file_needs_config(tmp_path, no_loading):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    with pytest.raises(ValueError, match="config is required for a single-file checkpoint"):
        export_package(ckpt, tmp_path / "pkg", progress=False)


def test_unsupported_sources_are_named(tiny_model, tmp_path, no_loading):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_model("sd1"), src)
    index = json.loads((src / "model_index.json").read_text())
    encoder_2 = ["transformers", "CLIPTextModelWithProjection"]
    (src / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": encoder_2}))
    with pytest.raises(NotImplementedError, match="text_encoder_2 but the unet config has no"):
        export_package(src, tmp_path / "pkg", progress=False)
    (src / "model_index.json").write_text(json.dumps(index))
    weights = src / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ValueError, match=r"unet has no \.safetensors weights"):
        export_package(src, tmp_path / "pkg", progress=False)


def _edit_json(path: Path, **changes) -> dict:
    """Rewrite a JSON file with `changes` (None removes a key); returns the original."""
    original = json.loads(path.read_text())
    edited = {**original, **changes}
    path.write_text(json.dumps({k: v for k, v in edited.items() if v is not None}))
    return original


@pytest.mark.parametrize(
    "file, changes, error, match",
    [
        ("model_index.json", dict(text_encoder=[None, None]), NotImplementedError, "refiner"),
        ("model_index.json", dict(tokenizer_2=None, text_encoder_2=None), NotImplementedError,
         "needs text_encoder and text_encoder_2"),
        ("model_index.json", dict(requires_aesthetics_score=True), NotImplementedError,
         "requires_aesthetics_score"),
        ("unet/config.json", dict(addition_embed_type="text_image"), NotImplementedError,
         "addition_embed_type='text_image' is not supported"),
        ("unet/config.json", dict(cross_attention_dim=95), ValueError,
         r"cross_attention_dim \(95\) must be text_encoder hidden_size \+ text_encoder_2 "
         r"hidden_size \(32 \+ 64\)"),
        ("unet/config.json", dict(projection_class_embeddings_input_dim=87), ValueError,
         r"projection_class_embeddings_input_dim \(87\) must be 6 x addition_time_embed_dim "
         r"\(8\) \+ text_encoder_2 projection_dim \(40\)"),
        ("text_encoder_2/config.json", dict(projection_dim=None), ValueError,
         r"text_encoder_2 projection_dim \(None\)"),
    ],
)  # fmt: skip
def test_sdxl_sources_it_cannot_run_are_named(
    file, changes, error, match, tiny_model, tmp_path, no_loading
):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_model("sdxl"), src)
    _edit_json(src / file, **changes)
    with pytest.raises(error, match=match):
        export_package(src, tmp_path / "pkg", progress=False)
    assert not (tmp_path / "pkg").exists()


def test_sdxl_single_files_and_bad_loras_are_refused_before_loading(
    tiny_model, tmp_path, no_loading
):
    ckpt = tmp_path / "sdxl.safetensors"
    ckpt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="sdxl.safetensors' is not a readable safetensors file"):
        export_package(ckpt, tmp_path / "pkg", config=tiny_model("sdxl"), progress=False)
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="lora.safetensors' is not a readable safetensors file"):
        export_package(tiny_model("sdxl"), tmp_path / "pkg", loras=[(lora, 1.0)], progress=False)
    assert not (tmp_path / "pkg").exists()


def test_weights_in_files_per_tensor_are_streamed_into_one_data_file(
    tiny_package, tmp_path, monkeypatch
):
    """What torch writes for a graph past 2 GiB (one file per tensor) becomes one
    model.onnx_data, page-aligned, without any tensor being loaded as an ONNX tensor."""
    source = tiny_package("sd1") / "unet" / "model.onnx"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    onnx.save_model(
        onnx.load(str(source)),
        str(scratch / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    assert len(list(scratch.iterdir())) > 20  # torch's layout: a file per tensor
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD_BYTES", 1 << 16)  # the graph's past it

    def loaded(*args, **kwargs):
        raise AssertionError("a tensor was loaded into memory")

    monkeypatch.setattr(onnx, "load_external_data_for_model", loaded)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_tensor", loaded)
    out = tmp_path / "out"
    out.mkdir()
    onnx_io.write_graph(scratch / "model.onnx", out / "model.onnx")
    monkeypatch.undo()

    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx_data"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) > 20
    for tensor in external:
        info = {e.key: e.value for e in tensor.external_data}
        assert info["location"] == "model.onnx_data" and int(info["offset"]) % 4096 == 0
    feed = _inputs(tiny_package("sd1"), "unet", batch=2, height=2, width=4, seed=1)
    got = _session(out / "model.onnx").run(None, feed)
    ref = _session(source).run(None, feed)
    np.testing.assert_array_equal(got[0], ref[0])


def test_lora_map_holds_one_initializer_at_a_time(tiny_model, tiny_package):
    """Matching weights to initializers keeps digests, not values: memory beyond the graph's
    index stays within a few tensors, not the whole graph's weights (10 GB for SDXL's U-Net)."""
    import tracemalloc

    from diffusers import UNet2DConditionModel

    from fewstep.export.graphs import UNetGraph
    from fewstep.export.lora_map import match_initializers
    from fewstep.onnx_proto import read_onnx_index

    path = tiny_package("sd1") / "unet" / "model.onnx"
    module = UNetGraph(UNet2DConditionModel.from_pretrained(tiny_model("sd1") / "unet"))
    tracemalloc.start()
    try:
        index = read_onnx_index(path)  # what match_initializers reads first
        index_peak = tracemalloc.get_traced_memory()[1]
        sizes = [loc.nbytes for loc in index.initializers.values() if len(loc.shape) >= 2]
        del index
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        weights, unmapped = match_initializers("unet", module, path)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert max(sizes) * 4 < sum(sizes)  # a test that can tell the two apart
    assert peak < index_peak + 4 * max(sizes), (peak, index_peak, max(sizes), sum(sizes))
    stored = json.loads((path.parent / "lora_map.json").read_text())
    assert sorted(weights) == sorted(stored["weights"]) and unmapped == stored["unmapped"]


# ---------------------------------------------------------------------------------------------
# fp16
# ---------------------------------------------------------------------------------------------


def test_fp16_package_runs_in_onnxruntime(tiny_model, tmp_path, references, capsys):
    """fp16 graphs run on onnxruntime's CPU with finite outputs, no further from the fp32 model
    than diffusers' own fp16 modules are (2x torch's fp16 error plus a floor)."""
    assert DTYPES == ("fp32", "fp16")
    pkg = export_package(tiny_model("lcm"), tmp_path / "pkg", dtype="fp16", progress=True)
    stderr = capsys.readouterr().err
    for graph in GRAPHS:
        assert f"verify {graph} (fp16): max abs error" in stderr
    torch_fp16 = TorchReference(tiny_model("lcm"), dtype=torch.float16)
    manifest = read_manifest(pkg)
    assert manifest["precision"] == "fp16"
    for graph in GRAPHS:
        entry = manifest["graphs"][graph]
        assert entry["precision"] == "fp16"  # tiny SD-family VAEs stay fp16 (no SDXL upcast)
        dtypes = {t["name"]: t["dtype"] for t in entry["inputs"] + entry["outputs"]}
        for name, dtype in dtypes.items():
            want = {"input_ids": "int64", "timestep": "float32"}.get(name, "float16")
            assert dtype == want, (graph, name)
        # Recorded against the fp32 model: finite, and above fp32's error (fp16 rounding).
        assert 1e-4 < entry["max_rel_error"] < np.inf, (graph, entry)
        feed = _inputs(pkg, graph, batch=3, height=6, width=2, seed=5)
        got = _session(pkg / graph / "model.onnx").run(None, feed)
        ref = references("lcm").run(graph, feed)
        ref_fp16 = torch_fp16.run(graph, feed)
        for g, r, r16 in zip(got, ref, ref_fp16, strict=True):
            assert g.dtype == np.float16 and np.isfinite(g).all()
            err_onnx, err_torch = _rel_error(g, r), _rel_error(r16, r)
            assert err_onnx <= 2 * err_torch + 1e-4, (graph, err_onnx, err_torch)
