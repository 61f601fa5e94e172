"""fewstep.lora against diffusers and against folds written out by hand.

LoRAs are made by peft (`inject_adapter_in_model`, random A and non-zero random B) on the tiny
models' U-Net attention projections, a 3×3 conv (ResNet conv1) and a 1×1 conv (SD1 proj_in) or
linear (SD2 proj_in), and on the text encoder's attention and MLP; saved by diffusers'
`save_lora_weights` (PEFT layout, alphas in the metadata) and by a kohya writer here
(`lora_unet_…`/`lora_te_text_model_…`, `.lora_down/.lora_up/.alpha`). References:

- images: diffusers' `load_lora_weights` + `fuse_lora(lora_scale=…)`, or `set_adapters` with
  two adapters, on the same latents; fewstep runs the ONNX package with the LoRAs folded at
  load and after `fewstep lora apply`.
- text encoder: a fold written out here (W + s · alpha/r · B @ A into the torch module), since
  diffusers drops kohya text-encoder attention keys when the file also has MLP keys (they come
  out as `to_q_lora`, reported UNEXPECTED by transformers 5); the image reference uses the
  diffusers U-Net fold plus this text-encoder fold, and checks that every text-encoder weight
  diffusers did fold agrees with it.
- properties: unfold restores bit-identical weights and outputs; A→B→A equals A; every error is
  raised before anything changes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from safetensors.numpy import save_file  # noqa: E402

from fewstep.cli import main as cli_main  # noqa: E402
from fewstep.lora import (  # noqa: E402
    apply_loras_to_package,
    fold_lora_torch,
    lora_initializers,
    parse_lora_arg,
    plan_fold,
    read_lora,
    unfold_lora_torch,
)
from fewstep.lora.onnx_package import derive_lora_map, read_lora_map  # noqa: E402
from fewstep.onnx_proto import read_onnx_index  # noqa: E402
from fewstep.package import hash_package_files, read_manifest, verify_package  # noqa: E402
from fewstep.pipeline import Pipeline  # noqa: E402

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# No out_proj: diffusers then reads a kohya file's text-encoder keys as its newer layout and
# drops the attention ones (the trap in the module docstring); sd2's LoRA covers out_proj.
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "fc1", "fc2"]
PROMPT, NEGATIVE = "a red cat", "ugly"
STEPS, GUIDANCE = 3, 7.5


# ---------------------------------------------------------------------------------------------
# LoRAs made by peft, written in both layouts
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoraDef:
    """A LoRA as peft made it: {component: {module: (A [r, …], B [out, r, …], alpha/r)}}."""

    layers: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]]
    configs: dict[str, dict]  # peft LoraConfig.to_dict() per component


def make_lora(folder: Path, seed: int, unet_targets, te_targets, r, alpha, **patterns) -> LoraDef:
    """patterns (rank_pattern, alpha_pattern) apply to the U-Net."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer as PeftLoraLayer
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    models = {"unet": diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")}
    targets = {"unet": unet_targets}
    if te_targets:
        models["text_encoder"] = CLIPTextModel.from_pretrained(folder / "text_encoder")
        targets["text_encoder"] = te_targets
    layers, configs = {}, {}
    for component, model in models.items():
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=targets[component],
            init_lora_weights=False,  # random A and random, non-zero B
            **(patterns if component == "unet" else {}),
        )
        inject_adapter_in_model(config, model, adapter_name="x")
        layers[component] = {
            name: (
                module.lora_A["x"].weight.detach().numpy().copy(),
                0.5 * module.lora_B["x"].weight.detach().numpy(),
                float(module.scaling["x"]),
            )
            for name, module in model.named_modules()
            if isinstance(module, PeftLoraLayer) and "x" in module.lora_A
        }
        configs[component] = config.to_dict()
    return LoraDef(layers, configs)


def save_peft(lora: LoraDef, path: Path) -> Path:
    """diffusers' own writer: `unet.<module>.lora_A.weight`, alphas in the metadata."""
    layers = {
        c: {
            f"{m}.lora_{ab}.weight": torch.from_numpy(w)
            for m, (a, b, _) in mods.items()
            for ab, w in (("A", a), ("B", b))
        }
        for c, mods in lora.layers.items()
    }
    diffusers.StableDiffusionPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers.get("text_encoder"),
        unet_lora_adapter_metadata=lora.configs["unet"],
        text_encoder_lora_adapter_metadata=lora.configs.get("text_encoder"),
        weight_name=path.name,
    )
    return path


def save_kohya(lora: LoraDef, path: Path) -> Path:
    """kohya sd-scripts' layout: `lora_unet_<module_with_underscores>`, text encoder keys
    under transformers' old `text_model.` prefix, alpha per module (= scaling · rank)."""
    tensors = {}
    for component, modules in lora.layers.items():
        for module, (a, b, scaling) in modules.items():
            if component == "unet":
                name = "lora_unet_" + module.replace(".", "_")
            else:
                name = "lora_te_text_model_" + module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = a
            tensors[f"{name}.lora_up.weight"] = b
            tensors[f"{name}.alpha"] = np.array(scaling * a.shape[0], dtype=np.float32)
    save_file(tensors, str(path))
    return path


def hand_fold(state: dict[str, torch.Tensor], modules, scale: float) -> None:
    """W ← W + scale · (alpha / r) · B @ A, written out here (conv: reshape)."""
    for module, (a, b, scaling) in modules.items():
        w = state[f"{module}.weight"]
        up = torch.from_numpy(b).reshape(b.shape[0], -1)
        down = torch.from_numpy(a).reshape(a.shape[0], -1)
        w += (scale * scaling * (up @ down)).reshape(w.shape)


@pytest.fixture(scope="module")
def sd1(tiny_model, tiny_package, tmp_path_factory):
    folder, package = tiny_model("sd1"), tiny_package("sd1")
    tmp = tmp_path_factory.mktemp("loras")
    a = make_lora(
        folder,
        seed=1,
        unet_targets=[*UNET_ATTENTION, "conv1", "proj_in"],
        te_targets=TE_TARGETS,
        r=4,
        alpha=2.0,
        rank_pattern={"to_v": 2},  # alpha stays 2 everywhere: see `b`
    )
    # Per-module alphas. diffusers 0.42 ignores them in kohya U-Net files (its alpha_pattern
    # keeps the `…processor.to_q_lora.down.weight` names; peft warns "did not match any
    # targeted module") and folds every module with the most common alpha, so `b` meets
    # diffusers as PEFT only, and its kohya file is checked against the PEFT one.
    b = make_lora(
        folder, seed=2, unet_targets=["to_q", "to_v", "ff.net.0.proj", "ff.net.2"],
        te_targets=None, r=8, alpha=4.0, alpha_pattern={"ff.net.2": 16.0},
    )  # fmt: skip
    return {
        "folder": folder,
        "package": package,
        "a": a,
        "b": b,
        "a_peft": save_peft(a, tmp / "a_peft.safetensors"),
        "a_kohya": save_kohya(a, tmp / "a_kohya.safetensors"),
        "b_peft": save_peft(b, tmp / "b_peft.safetensors"),
        "b_kohya": save_kohya(b, tmp / "b_kohya.safetensors"),
        "tmp": tmp,
    }


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def run_ours(parity, pipe: Pipeline, latents: np.ndarray) -> np.ndarray:
    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=64,
        width=64,
        latents=latents,
        generator=parity.noise(5),
        scheduler="ddim",
        output_type="np",
    ).images


def run_diffusers(pipe, latents: np.ndarray) -> np.ndarray:
    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=64,
        width=64,
        latents=torch.from_numpy(latents.copy()),
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).images


def set_text_encoder_by_hand(pipe, pristine: dict, loras: list[tuple[LoraDef, float]]) -> int:
    """Make the reference text encoder pristine + the hand fold; returns how many of its LoRA
    weights diffusers had left unfolded (the kohya key trap), after checking the others."""
    expected = {k: v.clone() for k, v in pristine.items()}
    for lora, scale in loras:
        hand_fold(expected, lora.layers.get("text_encoder", {}), scale)
    dropped = 0
    state = pipe.text_encoder.state_dict()
    with torch.no_grad():
        for name, want in expected.items():
            got = state[name]
            if torch.equal(got, pristine[name]) and not torch.equal(want, pristine[name]):
                dropped += 1
            else:
                assert (got - want).abs().max() <= 1e-5, name
            got.copy_(want)
    return dropped


def diffusers_fused(
    parity, family: str, folder: Path, files: list[tuple[Path, float]], loras
) -> tuple:
    pipe = parity.load_diffusers(folder, family, "ddim")
    pristine = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    for i, (path, scale) in enumerate(files):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        pipe.fuse_lora(lora_scale=scale, adapter_names=[f"l{i}"])
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    dropped = set_text_encoder_by_hand(pipe, pristine, loras)
    return pipe, dropped


def latents_for(seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 8, 8), dtype=np.float32)


def assert_images_close(parity, got: np.ndarray, expected: np.ndarray, base: np.ndarray) -> float:
    assert float(expected.std()) > 1e-3, "reference image is flat: the test would prove nothing"
    effect = float(np.abs(expected - base).max())
    assert effect > 50 * parity.tolerance, f"the LoRA barely changes the image ({effect:.2e})"
    err = np.abs(got - expected)
    assert err.max() <= parity.tolerance, (
        f"max abs difference {err.max():.2e} at {np.unravel_index(err.argmax(), err.shape)}"
    )
    return float(err.max())


# ---------------------------------------------------------------------------------------------
# Parity with diffusers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,scale", [("peft", 1.0), ("kohya", 0.7)])
def test_image_matches_diffusers_fuse_lora(sd1, layout, scale, parity):
    lora_file = sd1[f"a_{layout}"]
    latents = latents_for()
    reference, dropped = diffusers_fused(
        parity, "sd1", sd1["folder"], [(lora_file, scale)], [(sd1["a"], scale)]
    )  # noqa: E501
    print(f"diffusers left {dropped} text-encoder LoRA weights of the {layout} file unfolded")
    expected = run_diffusers(reference, latents)
    base = run_ours(parity, Pipeline.from_pretrained(sd1["package"]), latents)

    at_load = run_ours(
        parity, Pipeline.from_pretrained(sd1["package"], loras=[(lora_file, scale)]), latents
    )
    err = assert_images_close(parity, at_load, expected, base)
    print(f"sd1 {layout} fuse_lora({scale}): max abs error {err:.2e}")

    out = sd1["tmp"] / f"applied-{layout}"
    assert cli_main(["lora", "apply", str(sd1["package"]), "--lora", f"{lora_file}:{scale}",
                     "--out", str(out)]) == 0  # fmt: skip
    applied = run_ours(parity, Pipeline.from_pretrained(out), latents)
    assert np.array_equal(applied, at_load), "lora apply and the load-time fold differ"


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_two_adapters_match_diffusers_set_adapters(sd1, parity):
    from transformers import CLIPTextModel

    weights = (0.8, -0.6)
    files = [(sd1["a_kohya"], "a"), (sd1["b_peft"], "b")]
    latents = latents_for(11)
    pipe = parity.load_diffusers(sd1["folder"], "sd1", "ddim")
    for path, name in files:
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(["a", "b"], list(weights))
    # the text encoder by hand (the kohya trap, see the module docstring)
    pipe.text_encoder = CLIPTextModel.from_pretrained(sd1["folder"] / "text_encoder").eval()
    with torch.no_grad():
        hand_fold(pipe.text_encoder.state_dict(), sd1["a"].layers["text_encoder"], weights[0])
    expected = run_diffusers(pipe, latents)  # unfused: x @ W + w · s · B(A(x))
    base = run_ours(parity, Pipeline.from_pretrained(sd1["package"]), latents)
    ours = Pipeline.from_pretrained(
        sd1["package"], loras=[(files[0][0], weights[0]), (files[1][0], weights[1])]
    )
    err = assert_images_close(parity, run_ours(parity, ours, latents), expected, base)
    print(f"sd1 set_adapters{weights}: max abs error {err:.2e}")


def test_sd2_image_matches_diffusers(tiny_model, tiny_package, tmp_path, parity):
    """SD2: linear proj_in/proj_out (MatMul, stored transposed) and OpenCLIP text encoder."""
    folder, package = tiny_model("sd2"), tiny_package("sd2")
    lora = make_lora(
        folder, seed=3, unet_targets=[*UNET_ATTENTION, "proj_in", "conv2"],
        te_targets=["q_proj", "out_proj", "fc2"], r=4, alpha=4.0,
    )  # fmt: skip
    path = save_peft(lora, tmp_path / "sd2.safetensors")
    latents = latents_for(5)
    reference, dropped = diffusers_fused(parity, "sd2", folder, [(path, 0.9)], [(lora, 0.9)])
    assert dropped == 0
    expected = run_diffusers(reference, latents)
    base = run_ours(parity, Pipeline.from_pretrained(package), latents)
    got = run_ours(parity, Pipeline.from_pretrained(package, loras=[(path, 0.9)]), latents)
    err = assert_images_close(parity, got, expected, base)
    print(f"sd2 peft fuse_lora(0.9): max abs error {err:.2e}")


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_text_encoder_matches_hand_fold(sd1, layout):
    from transformers import CLIPTextModel

    scale = 1.3
    te = CLIPTextModel.from_pretrained(sd1["folder"] / "text_encoder").eval()
    with torch.no_grad():
        hand_fold(te.state_dict(), sd1["a"].layers["text_encoder"], scale)
        ids = torch.from_numpy(np.random.default_rng(0).integers(0, 300, (2, 77)))
        expected = te(input_ids=ids).last_hidden_state.numpy()
    pipe = Pipeline.from_pretrained(sd1["package"], loras=[(sd1[f"a_{layout}"], scale)])
    got = pipe.backend.run("text_encoder", input_ids=ids.numpy())["last_hidden_state"]
    base = Pipeline.from_pretrained(sd1["package"]).backend.run(
        "text_encoder", input_ids=ids.numpy()
    )["last_hidden_state"]
    assert np.abs(base - expected).max() > 1e-2
    err = float(np.abs(got - expected).max())
    print(f"text encoder {layout} vs hand fold: max abs error {err:.2e}")
    assert err <= 1e-5 * max(1.0, float(np.abs(expected).max()))


def test_export_with_loras_matches_load_time_fold(sd1, tmp_path, parity):
    loras = [(sd1["a_kohya"], 0.7), (sd1["b_peft"], 0.5)]
    out = tmp_path / "exported"
    args = ["export", str(sd1["folder"]), str(out)]
    for path, scale in loras:
        args += ["--lora", f"{path}:{scale}"]
    assert cli_main(args) == 0
    manifest = verify_package(out)
    assert [(e["name"], e["scale"], e["folded_at"]) for e in manifest["loras"]] == [
        ("a_kohya.safetensors", 0.7, "export"),
        ("b_peft.safetensors", 0.5, "export"),
    ]
    assert manifest["loras"][0]["sha256"] == read_lora(sd1["a_kohya"]).sha256
    latents = latents_for(3)
    exported = run_ours(parity, Pipeline.from_pretrained(out), latents)
    at_load = run_ours(parity, Pipeline.from_pretrained(sd1["package"], loras=loras), latents)
    # torch folds in torch, the load-time fold in numpy: float32 rounding apart
    assert np.abs(exported - at_load).max() <= 1e-4


def test_lora_apply_writes_a_new_package_and_leaves_the_old_one(sd1, tmp_path):
    package = sd1["package"]
    before = hash_package_files(package)
    out = tmp_path / "applied"
    apply_loras_to_package(package, [(sd1["a_peft"], 0.5)], out)
    assert hash_package_files(package) == before
    manifest = verify_package(out)
    assert manifest["loras"][-1]["name"] == "a_peft.safetensors"
    assert manifest["loras"][-1]["scale"] == 0.5
    # Only the LoRA's initializers changed, byte for byte.
    changed = lora_initializers(package, [(sd1["a_peft"], 0.5)])
    for graph in ("unet", "text_encoder"):
        old = read_onnx_index(package / graph / "model.onnx").initializers
        new = read_onnx_index(out / graph / "model.onnx").initializers
        assert old.keys() == new.keys()
        for name in old:
            same = np.array_equal(old[name].read(), new[name].read())
            assert same != (name in changed[graph]), name
    assert (out / "vae_decoder" / "model.onnx").read_bytes() == (
        package / "vae_decoder" / "model.onnx"
    ).read_bytes()
    # Applying on top stacks; the manifest lists both.
    again = tmp_path / "applied-twice"
    apply_loras_to_package(out, [(sd1["b_kohya"], 1.0)], again)
    assert [e["name"] for e in read_manifest(again)["loras"]] == [
        "a_peft.safetensors",
        "b_kohya.safetensors",
    ]


def test_folder_sharing_its_weights_folds_the_same(sd1, tmp_path, parity):
    """A diffusers folder that is also its package (fewstep.export.shared_weights): the
    weights, transposed ones included, are read from and written to the safetensors files."""
    from fewstep.export.shared_weights import combine_with_diffusers_folder

    shared = tmp_path / "shared"
    combine_with_diffusers_folder(sd1["package"], sd1["folder"], shared)
    before = hash_package_files(shared)
    loras, latents = [(sd1["a_peft"], 0.8)], latents_for()
    base = run_ours(parity, Pipeline.from_pretrained(sd1["package"]), latents)
    expected = run_ours(parity, Pipeline.from_pretrained(sd1["package"], loras=loras), latents)
    at_load = run_ours(parity, Pipeline.from_pretrained(shared, loras=loras), latents)
    assert_images_close(parity, at_load, expected, base)
    applied = tmp_path / "applied"
    apply_loras_to_package(shared, loras, applied)
    assert hash_package_files(shared) == before
    assert np.array_equal(run_ours(parity, Pipeline.from_pretrained(applied), latents), at_load)
    # the copy is a diffusers folder with the LoRA folded in, as diffusers folds it
    reference, _ = diffusers_fused(
        parity, "sd1", sd1["folder"], [(sd1["a_peft"], 0.8)], [(sd1["a"], 0.8)]
    )
    folded = diffusers.UNet2DConditionModel.from_pretrained(applied / "unet").state_dict()
    for name, want in reference.unet.state_dict().items():
        assert (folded[name] - want).abs().max() <= 1e-5, name


# ---------------------------------------------------------------------------------------------
# Formats and name mapping
# ---------------------------------------------------------------------------------------------


def _deltas(loras, weights) -> dict:
    return {(f.component, f.weight): f.delta() for f in plan_fold(loras, weights)}


def _variant(src: Path, dst: Path, rename) -> Path:
    """src's tensors under new key names, without its metadata (so without alphas)."""
    from safetensors import safe_open

    with safe_open(str(src), "numpy") as f:
        tensors = {rename(k): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(dst))
    return dst


def test_layouts_give_the_same_fold(sd1, tmp_path):
    """kohya, PEFT, and the older diffusers layouts of one LoRA resolve to the same deltas."""
    package = sd1["package"]
    graphs = {g: {n: s for n, s in _shapes(package, g).items()} for g in ("unet", "text_encoder")}
    for name in ("a", "b"):  # b has per-module alphas
        reference = _deltas([(read_lora(sd1[f"{name}_peft"]), 1.0)], graphs)
        assert len(reference) == sum(len(v) for v in sd1[name].layers.values())
        kohya = _deltas([(read_lora(sd1[f"{name}_kohya"]), 1.0)], graphs)
        assert reference.keys() == kohya.keys()
        for key in reference:
            np.testing.assert_allclose(kohya[key], reference[key], rtol=1e-6, atol=1e-7)

    # diffusers' older attention-processor layout, U-Net only, without the unet. prefix
    def processor(key: str) -> str:
        key = key.removeprefix("unet.")
        for proj, old in (
            ("to_out.0", "to_out"),
            ("to_q", "to_q"),
            ("to_k", "to_k"),
            ("to_v", "to_v"),
        ):  # noqa: E501
            for ab, role in (("A", "down"), ("B", "up")):
                suffix = f".{proj}.lora_{ab}.weight"
                if key.endswith(suffix) and ".attn" in key:
                    return key.removesuffix(suffix) + f".processor.{old}_lora.{role}.weight"
        return key.replace(".lora_A.weight", ".lora.down.weight").replace(
            ".lora_B.weight", ".lora.up.weight"
        )

    # a: r 4 (to_v 2), alpha 2; the older layout has no alphas (alpha = rank): scale 0.5
    a_ref = _deltas([(read_lora(sd1["a_peft"]), 1.0)], graphs)
    old = _variant(sd1["a_peft"], tmp_path / "a_old.safetensors", processor)
    a_old = _deltas([(read_lora(old), 0.5)], graphs)
    assert a_old.keys() == a_ref.keys()
    for key in a_ref:
        if key[1].endswith("to_v.weight"):  # rank 2 with alpha 2: scale 1 in a, 0.5 here
            np.testing.assert_allclose(a_old[key], 0.5 * a_ref[key], rtol=1e-6)
        else:
            np.testing.assert_array_equal(a_old[key], a_ref[key])

    # PEFT's save_pretrained layout: base_model.model.<module>, alpha in adapter_config.json
    peft_dir = tmp_path / "peft_adapter"
    peft_dir.mkdir()
    raw = _variant(
        sd1["b_peft"],
        peft_dir / "adapter_model.safetensors",
        lambda k: "base_model.model." + k.removeprefix("unet."),
    )
    config = {"r": 8, "lora_alpha": 4.0, "alpha_pattern": {"ff.net.2": 16.0}}
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    b_ref = _deltas([(read_lora(sd1["b_peft"]), 1.0)], graphs)
    b_raw = _deltas([(read_lora(raw), 1.0)], graphs)
    assert b_raw.keys() == b_ref.keys()
    for key in b_ref:
        np.testing.assert_array_equal(b_raw[key], b_ref[key])


def _shapes(package: Path, graph: str) -> dict:
    from fewstep.lora.onnx_package import GraphWeights

    return GraphWeights(package / graph, graph).shapes()


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_export_map_equals_map_derived_from_the_graph(tiny_package, family):
    package = tiny_package(family)
    for graph in ("unet", "text_encoder"):
        recorded = read_lora_map(package / graph / "lora_map.json")
        derived = derive_lora_map(graph, read_onnx_index(package / graph / "model.onnx"))
        assert recorded == derived
        assert json.loads((package / graph / "lora_map.json").read_text())["unmapped"] == []
        transposed = [n for n, m in recorded.items() if m.transposed]
        assert any("attn1.to_q" in n or "self_attn.q_proj" in n for n in transposed)


def test_package_without_map_folds_the_same(sd1, tmp_path):
    """optimum-style packages have no lora_map.json: the map is read off the graph."""
    import shutil

    package = tmp_path / "no-map"
    shutil.copytree(sd1["package"], package)
    for graph in ("unet", "text_encoder"):
        (package / graph / "lora_map.json").unlink()
    (package / "fewstep.json").unlink()
    loras = [(sd1["a_kohya"], 0.7)]
    with_map = lora_initializers(sd1["package"], loras)
    without = lora_initializers(package, loras)
    assert with_map.keys() == without.keys()
    for graph in with_map:
        assert with_map[graph].keys() == without[graph].keys()
        for name, value in with_map[graph].items():
            assert np.array_equal(value, without[graph][name])


def test_shared_initializer_is_refused(sd1, tmp_path):
    """torch.onnx stores equal weights once; folding into one of them would change both."""
    import shutil

    package = tmp_path / "shared"
    shutil.copytree(sd1["package"], package)
    map_path = package / "unet" / "lora_map.json"
    data = json.loads(map_path.read_text())
    prefix = "down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    data["weights"][prefix + "to_k.weight"] = data["weights"][prefix + "to_q.weight"]
    map_path.write_text(json.dumps(data))
    match = r"attn1\.to_[qk]\.weight shares ONNX initializer .* with .*attn1\.to_[qk]\.weight"
    with pytest.raises(ValueError, match=match):
        lora_initializers(package, [(sd1["a_peft"], 1.0)])


def test_bf16_lora_file(sd1, tmp_path):
    from safetensors.torch import save_file as save_torch

    a, b, _ = next(iter(sd1["a"].layers["unet"].items()))[1]
    module = next(iter(sd1["a"].layers["unet"]))
    name = "lora_unet_" + module.replace(".", "_")
    a16, b16 = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
    save_torch(
        {f"{name}.lora_down.weight": a16, f"{name}.lora_up.weight": b16},
        str(tmp_path / "bf16.safetensors"),
    )
    save_file(
        {
            f"{name}.lora_down.weight": a16.float().numpy(),
            f"{name}.lora_up.weight": b16.float().numpy(),
        },  # noqa: E501
        str(tmp_path / "fp32.safetensors"),
    )
    got = read_lora(tmp_path / "bf16.safetensors").layers[0]
    want = read_lora(tmp_path / "fp32.safetensors").layers[0]
    assert np.array_equal(got.down, want.down) and np.array_equal(got.up, want.up)


def test_linear_lora_folds_into_1x1_conv():
    weights = {"unet": {"down_blocks.0.attentions.0.proj_in.weight": (6, 5, 1, 1)}}
    rng = np.random.default_rng(0)
    down, up = (
        rng.standard_normal((3, 5), dtype=np.float32),
        rng.standard_normal((6, 3), dtype=np.float32),
    )  # noqa: E501
    layers = []
    for d, u in ((down, up), (down[:, :, None, None], up[:, :, None, None])):
        layers.append(_file_with({"lora_unet_down_blocks_0_attentions_0_proj_in": (d, u, 3.0)}))
    linear, conv = (plan_fold([(f, 1.0)], weights)[0].delta() for f in layers)
    np.testing.assert_array_equal(linear, conv)
    np.testing.assert_allclose(conv[:, :, 0, 0], up @ down, rtol=1e-6)


def _file_with(modules: dict, tmp: Path | None = None):
    """A kohya LoraFile from {name: (down, up, alpha)} (written to a temporary file)."""
    return read_lora(_write_kohya(modules, tmp))


def _write_kohya(modules: dict, tmp: Path | None = None) -> Path:
    import tempfile

    tensors = {}
    for name, (down, up, alpha) in modules.items():
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
    folder = Path(tempfile.mkdtemp(dir=tmp))
    save_file(tensors, str(folder / "lora.safetensors"))
    return folder / "lora.safetensors"


def test_underscore_names_resolved_against_real_names():
    weights = {"unet": {"a_b.c.weight": (2, 2), "a.b_c.weight": (2, 2), "a.b.d.weight": (2, 2)}}
    one = np.ones((1, 2), dtype=np.float32)
    ok = _file_with({"lora_unet_a_b_d": (one, one.T, None)})
    assert plan_fold([(ok, 1.0)], weights)[0].weight == "a.b.d.weight"
    ambiguous = _file_with({"lora_unet_a_b_c": (one, one.T, None)})
    with pytest.raises(ValueError, match=r"ambiguous.*a_b\.c\.weight and a\.b_c\.weight"):
        plan_fold([(ambiguous, 1.0)], weights)


def test_alpha_defaults_to_rank_and_scale_multiplies():
    weights = {"unet": {"x.weight": (4, 3)}}
    rng = np.random.default_rng(1)
    down, up = (
        rng.standard_normal((2, 3), dtype=np.float32),
        rng.standard_normal((4, 2), dtype=np.float32),
    )  # noqa: E501
    no_alpha = plan_fold([(_file_with({"lora_unet_x": (down, up, None)}), 0.5)], weights)
    alpha_1 = plan_fold([(_file_with({"lora_unet_x": (down, up, 1.0)}), 0.5)], weights)
    np.testing.assert_allclose(no_alpha[0].delta(), 0.5 * up @ down, rtol=1e-6)
    np.testing.assert_allclose(alpha_1[0].delta(), 0.5 * 0.5 * up @ down, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Exact unfold
# ---------------------------------------------------------------------------------------------


def _load_torch(folder: Path) -> dict:
    from transformers import CLIPTextModel

    return {
        "unet": diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
    }


def _snapshot(modules: dict) -> dict:
    return {(c, k): v.clone() for c, m in modules.items() for k, v in m.state_dict().items()}


def _identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torch_unfold_is_exact_and_swaps_do_not_blend(sd1):
    modules = _load_torch(sd1["folder"])
    pristine = _snapshot(modules)
    pointers = {(c, n): p.data_ptr() for c, m in modules.items() for n, p in m.named_parameters()}
    a, b = [(sd1["a_kohya"], 0.9)], [(sd1["b_peft"], 1.1), (sd1["a_peft"], -0.3)]

    folds = fold_lora_torch(modules, a)
    assert len(folds) == sum(len(v) for v in sd1["a"].layers.values())
    folded_a = _snapshot(modules)
    assert not _identical(folded_a, pristine)
    # the fold is the hand-written one
    expected = {k: v.clone() for k, v in pristine.items()}
    for component in ("unet", "text_encoder"):
        state = {n: expected[(component, n)] for c, n in expected if c == component}
        hand_fold(state, sd1["a"].layers[component], 0.9)
    for key in expected:
        assert (folded_a[key] - expected[key]).abs().max() <= 1e-6, key

    unfold_lora_torch(modules)
    assert _identical(_snapshot(modules), pristine)
    fold_lora_torch(modules, b)
    unfold_lora_torch(modules)
    fold_lora_torch(modules, a)
    assert _identical(_snapshot(modules), folded_a)
    fold_lora_torch(modules, b)  # B straight over A: set, not add
    fold_lora_torch(modules, a)
    assert _identical(_snapshot(modules), folded_a)
    unfold_lora_torch(modules)
    assert _identical(_snapshot(modules), pristine)
    # in place: CUDA graphs captured on these tensors stay valid
    assert pointers == {
        (c, n): p.data_ptr() for c, m in modules.items() for n, p in m.named_parameters()
    }


def test_onnx_fold_unfold_is_exact(sd1, parity):
    package = sd1["package"]
    before = hash_package_files(package)
    latents = latents_for(2)
    base = run_ours(parity, Pipeline.from_pretrained(package), latents)
    a1 = run_ours(parity, Pipeline.from_pretrained(package, loras=[(sd1["a_peft"], 0.8)]), latents)
    run_ours(parity, Pipeline.from_pretrained(package, loras=[(sd1["b_kohya"], 1.0)]), latents)
    a2 = run_ours(parity, Pipeline.from_pretrained(package, loras=[(sd1["a_peft"], 0.8)]), latents)
    again = run_ours(parity, Pipeline.from_pretrained(package), latents)
    assert np.array_equal(a1, a2)
    assert np.array_equal(base, again)
    assert not np.array_equal(base, a1)
    assert hash_package_files(package) == before


# ---------------------------------------------------------------------------------------------
# Errors, each before anything changes
# ---------------------------------------------------------------------------------------------


def _raises_everywhere(sd1, loras, match, tmp_path):
    """The error from the torch fold (weights untouched), the ONNX fold and lora apply (no
    output folder)."""
    modules = _load_torch(sd1["folder"])
    pristine = _snapshot(modules)
    with pytest.raises(ValueError, match=match):
        fold_lora_torch(modules, loras)
    assert _identical(_snapshot(modules), pristine)
    with pytest.raises(ValueError, match=match):
        Pipeline.from_pretrained(sd1["package"], loras=loras)
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=match):
        apply_loras_to_package(sd1["package"], loras, out)
    assert not out.exists() and not list(tmp_path.glob(".never.tmp-*"))


def _good_layer(sd1) -> dict:
    module, (a, b, scaling) = next(iter(sd1["a"].layers["unet"].items()))
    return {"lora_unet_" + module.replace(".", "_"): (a, b, scaling * a.shape[0])}


def test_error_missing_file(sd1, tmp_path):
    _raises_everywhere(sd1, [(tmp_path / "nope.safetensors", 1.0)], "LoRA file not found", tmp_path)
    assert (
        cli_main(
            [
                "lora",
                "apply",
                str(sd1["package"]),
                "--lora",
                str(tmp_path / "x.safetensors"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )  # noqa: E501


def test_error_unknown_format(sd1, tmp_path):
    path = tmp_path / "not_lora.safetensors"
    save_file({"down_blocks.0.weight": np.ones((2, 2), np.float32)}, str(path))
    _raises_everywhere(
        sd1, [(path, 1.0)], r"unknown LoRA format.*'down_blocks\.0\.weight'", tmp_path
    )  # noqa: E501
    dora = tmp_path / "dora.safetensors"
    save_file({"lora_unet_x.dora_scale": np.ones((2, 1), np.float32)}, str(dora))
    with pytest.raises(ValueError, match="DoRA"):
        read_lora(dora)


def test_error_keys_that_match_no_weight(sd1, tmp_path):
    one = np.ones((1, 32), np.float32)
    path = _write_kohya(
        {
            **_good_layer(sd1),
            "lora_unet_down_blocks_7_attentions_0_proj_in": (one, one.T, 1.0),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1": (one, one.T, 1.0),
        },
        tmp_path,
    )
    match = (  # both listed, in any order
        r"2 LoRA keys match no weight(?=[\s\S]*lora_unet_down_blocks_7_attentions_0_proj_in)"
        r"(?=[\s\S]*lora_te2_text_model_encoder_layers_0_mlp_fc1)"
    )
    _raises_everywhere(sd1, [(path, 1.0)], match, tmp_path)


def test_error_shape_mismatch(sd1, tmp_path):
    down, up = np.ones((2, 32), np.float32), np.ones((48, 2), np.float32)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = _write_kohya({**_good_layer(sd1), key: (down, up, 2.0)}, tmp_path)
    match = rf"{key}\.lora_down\.weight: down \[2, 32\] and up \[48, 2\] give \[48, 32\], but unet\..*to_q\.weight is \[32, 32\]"  # noqa: E501
    _raises_everywhere(sd1, [(path, 1.0)], match, tmp_path)


def test_error_non_finite_values(sd1, tmp_path):
    ((name, (down, up, alpha)),) = _good_layer(sd1).items()
    nan_up = up.copy()
    nan_up[0, 0] = np.nan
    path = _write_kohya({name: (down, nan_up, alpha)}, tmp_path)
    _raises_everywhere(sd1, [(path, 1.0)], rf"{name}\.lora_up\.weight' has 1 non-finite", tmp_path)  # noqa: E501
    bad_alpha = _write_kohya({name: (down, up, np.inf)}, tmp_path)
    with pytest.raises(ValueError, match=rf"{name}\.alpha' has 1 non-finite"):
        read_lora(bad_alpha)


def test_error_rank_zero(sd1, tmp_path):
    name = next(iter(_good_layer(sd1)))
    path = _write_kohya(
        {name: (np.ones((0, 32), np.float32), np.ones((32, 0), np.float32), None)}, tmp_path
    )  # noqa: E501
    _raises_everywhere(sd1, [(path, 1.0)], rf"{name}\.lora_down\.weight' has rank 0", tmp_path)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, "0.5", True, None])
def test_error_scale_not_finite(sd1, tmp_path, scale):
    _raises_everywhere(
        sd1, [(sd1["a_peft"], scale)], "LoRA scale for .* must be a finite number", tmp_path
    )  # noqa: E501


def test_parse_lora_arg(tmp_path):
    assert parse_lora_arg("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)
    assert parse_lora_arg("/a/b:c/x.safetensors:-1.5") == ("/a/b:c/x.safetensors", -1.5)
    with pytest.raises(ValueError, match="finite"):
        parse_lora_arg("style.safetensors:nan")
    with pytest.raises(ValueError, match="PATH:SCALE"):
        parse_lora_arg("style.safetensors:strong")


def test_export_refuses_bad_lora_before_loading(sd1, tmp_path):
    out = tmp_path / "pkg"
    with pytest.raises(ValueError, match="LoRA file not found"):
        from fewstep.export import export_package

        export_package(sd1["folder"], out, loras=[(tmp_path / "missing.safetensors", 1.0)])
    assert not out.exists()
