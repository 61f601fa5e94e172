"""fewstep.lora on SDXL: the U-Net and both text encoders, kohya's sgm names and PEFT's.

One LoRA is made by peft (`inject_adapter_in_model`, random A and non-zero random B) on the
tiny SDXL model (export/testing.py): on the U-Net every kind of layer kohya's SDXL files name
(attention projections, feed-forward, proj_in/proj_out, the ResBlocks' conv1/conv2/
time_emb_proj/conv_shortcut, down- and upsampler convs, conv_in/conv_out, the time and added-
conditioning embeddings), on text_encoder (CLIP-L) and text_encoder_2 (OpenCLIP-bigG as
transformers' CLIPTextModelWithProjection, text_projection included). It is written twice:

- PEFT: diffusers' own `StableDiffusionXLPipeline.save_lora_weights` (`unet.…`,
  `text_encoder.…`, `text_encoder_2.…`, lora_A/lora_B, alphas in the metadata);
- kohya: `lora_unet_<sgm name>` / `lora_te1_text_model_…` / `lora_te2_text_model_…`, where the
  sgm names come from `SgmTable` below, written here from the diffusers U-Net's module tree
  (not from its config, which is what fewstep.lora.sgm_names reads).

Reference: diffusers' `load_lora_weights` + `fuse_lora(lora_scale=…)` on the same folder,
for all three components. diffusers (with transformers 5) drops a kohya file's text-encoder
attention keys when the file has MLP keys but no out_proj (tests/test_lora.py's docstring);
this LoRA adapts out_proj too, so diffusers folds every key, and each test checks that
diffusers' fold changed every adapted weight, so a dropped key fails instead of hiding. The
full-size SDXL U-Net (built on the meta device, no weights) checks that the sgm names resolve
from the config of another size than the tiny one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from conftest import IMAGE_TOLERANCE, TorchNoise  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from fewstep.cli import main as cli_main  # noqa: E402
from fewstep.lora import (  # noqa: E402
    apply_loras_to_package,
    canonical_weight_name,
    fold_lora_torch,
    lora_initializers,
    plan_fold,
    read_lora,
)
from fewstep.lora.onnx_package import GraphWeights, derive_lora_map, read_lora_map  # noqa: E402
from fewstep.onnx_proto import read_onnx_index  # noqa: E402
from fewstep.package import read_manifest  # noqa: E402
from fewstep.pipeline import Pipeline  # noqa: E402

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TARGETS = {
    "unet": [
        "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
        "conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv", "conv_in", "conv_out",
        "linear_1", "linear_2",
    ],
    "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "text_encoder_2": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "text_projection"],
}  # fmt: skip
RANK, ALPHA = 4, 2.0
WEIGHT_TOLERANCE = 1e-4
# Full-size U-Net configs (stabilityai/stable-diffusion-xl-base-1.0; SD 1.5, whose original
# code has the same block layout), the fields that shape them; built on the meta device.
FULL_SDXL_UNET = dict(
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
    sample_size=128,
)
FULL_SD15_UNET = dict(
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    cross_attention_dim=768,
    sample_size=64,
)


# ---------------------------------------------------------------------------------------------
# sgm names, written from the diffusers module tree
# ---------------------------------------------------------------------------------------------

RESNET_LAYERS = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


class SgmTable:
    """diffusers U-Net module → Stability's sgm name, by walking the model's blocks in sgm's
    order: input_blocks (conv_in, then per down block its ResBlock[+SpatialTransformer] pairs
    and its downsampler), middle_block, output_blocks (per up block its pairs, the upsampler
    beside the last)."""

    def __init__(self, unet):
        self.whole = {
            "conv_in": "input_blocks.0.0",
            "conv_out": "out.2",
            "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2",
        }
        self.resnets: dict[str, str] = {}
        self.transformers: dict[str, str] = {}
        i = 1
        for b, block in enumerate(unet.down_blocks):
            for n in range(len(block.resnets)):
                self._pair(f"down_blocks.{b}", n, block, f"input_blocks.{i}")
                i += 1
            if block.downsamplers is not None:
                self.whole[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
                i += 1
        self.resnets["mid_block.resnets.0"] = "middle_block.0"
        self.transformers["mid_block.attentions.0"] = "middle_block.1"
        self.resnets["mid_block.resnets.1"] = "middle_block.2"
        k = 0
        for b, block in enumerate(unet.up_blocks):
            for n in range(len(block.resnets)):
                self._pair(f"up_blocks.{b}", n, block, f"output_blocks.{k}")
                if n == len(block.resnets) - 1 and block.upsamplers is not None:
                    slot = 2 if hasattr(block, "attentions") else 1
                    self.whole[f"up_blocks.{b}.upsamplers.0.conv"] = (
                        f"output_blocks.{k}.{slot}.conv"
                    )
                k += 1

    def _pair(self, prefix: str, n: int, block, sgm: str) -> None:
        self.resnets[f"{prefix}.resnets.{n}"] = f"{sgm}.0"
        if hasattr(block, "attentions"):
            self.transformers[f"{prefix}.attentions.{n}"] = f"{sgm}.1"

    def __call__(self, module: str) -> str:
        if module in self.whole:
            return self.whole[module]
        head, _, layer = module.rpartition(".")
        if head in self.resnets:
            return f"{self.resnets[head]}.{RESNET_LAYERS[layer]}"
        parts = module.split(".")
        for n in (4, 3):  # down_blocks.b.attentions.n, mid_block.attentions.0
            head = ".".join(parts[:n])
            if head in self.transformers:
                return ".".join([self.transformers[head], *parts[n:]])
        raise KeyError(f"no sgm name for {module}")


# ---------------------------------------------------------------------------------------------
# The LoRA, made by peft, written in both layouts
# ---------------------------------------------------------------------------------------------


def load_components(folder: Path) -> dict:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {
        "unet": diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
            folder / "text_encoder_2"
        ).eval(),
    }


def make_lora(folder: Path, seed: int) -> tuple[dict, dict]:
    """({component: {module: (A, B)}}, {component: LoraConfig dict}); B is non-zero."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    torch.manual_seed(seed)
    layers, configs = {}, {}
    for component, model in load_components(folder).items():
        config = LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[component], init_lora_weights=False
        )
        inject_adapter_in_model(config, model, adapter_name="x")
        layers[component] = {
            name: (
                module.lora_A["x"].weight.detach().numpy().copy(),
                module.lora_B["x"].weight.detach().numpy().copy(),
            )
            for name, module in model.named_modules()
            if isinstance(module, PeftLoraLayer) and "x" in module.lora_A
        }
        configs[component] = config.to_dict()
    return layers, configs


def save_peft(layers: dict, configs: dict, path: Path) -> Path:
    tensors = {
        c: {
            f"{m}.lora_{ab}.weight": torch.from_numpy(w)
            for m, (a, b) in modules.items()
            for ab, w in (("A", a), ("B", b))
        }
        for c, modules in layers.items()
    }
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=tensors["unet"],
        text_encoder_lora_layers=tensors["text_encoder"],
        text_encoder_2_lora_layers=tensors["text_encoder_2"],
        unet_lora_adapter_metadata=configs["unet"],
        text_encoder_lora_adapter_metadata=configs["text_encoder"],
        text_encoder_2_lora_adapter_metadata=configs["text_encoder_2"],
        weight_name=path.name,
    )
    return path


def kohya_name(component: str, module: str, sgm: SgmTable) -> str:
    """kohya sd-scripts' SDXL key of a diffusers/transformers module."""
    if component == "unet":
        return "lora_unet_" + sgm(module).replace(".", "_")
    prefix = "lora_te1_" if component == "text_encoder" else "lora_te2_"
    if not module.startswith(("text_model.", "text_projection")):  # transformers 5's CLIPTextModel
        module = "text_model." + module
    return prefix + module.replace(".", "_")


def save_kohya(layers: dict, sgm: SgmTable, path: Path) -> Path:
    tensors = {}
    for component, modules in layers.items():
        for module, (a, b) in modules.items():
            name = kohya_name(component, module, sgm)
            tensors[f"{name}.lora_down.weight"] = a
            tensors[f"{name}.lora_up.weight"] = b
            tensors[f"{name}.alpha"] = np.array(ALPHA, dtype=np.float32)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def sdxl(tiny_model, tiny_package, tmp_path_factory):
    folder, package = tiny_model("sdxl"), tiny_package("sdxl")
    tmp = tmp_path_factory.mktemp("sdxl-loras")
    layers, configs = make_lora(folder, seed=4)
    sgm = SgmTable(diffusers.UNet2DConditionModel.from_pretrained(folder / "unet"))
    return {
        "folder": folder,
        "package": package,
        "layers": layers,
        "peft": save_peft(layers, configs, tmp / "sdxl_peft.safetensors"),
        "kohya": save_kohya(layers, sgm, tmp / "sdxl_kohya.safetensors"),
        "sgm": sgm,
        "tmp": tmp,
    }


@pytest.fixture(scope="module")
def fused(sdxl):
    """(layout, scale) -> diffusers' SDXL pipeline with that file fused at that scale."""
    cache: dict = {}

    def get(layout: str, scale: float):
        if (layout, scale) not in cache:
            pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
                sdxl["folder"], add_watermarker=False
            )
            pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            pipe.load_lora_weights(str(sdxl[layout]), adapter_name="l")
            pipe.fuse_lora(lora_scale=scale, adapter_names=["l"])
            pipe.unload_lora_weights()  # keeps the fused weights
            cache[layout, scale] = pipe
        return cache[layout, scale]

    return get


def reference_weights(pipe, sdxl) -> dict[str, dict[str, np.ndarray]]:
    """{component: {fewstep weight name: diffusers' fused value}}, after checking that
    diffusers' fold changed every weight the LoRA adapts (none was dropped)."""
    pristine = load_components(sdxl["folder"])
    out = {}
    for component in COMPONENTS:
        state = getattr(pipe, component).state_dict()
        before = pristine[component].state_dict()
        for module in sdxl["layers"][component]:
            name = f"{module}.weight"
            assert not torch.equal(state[name], before[name]), f"diffusers left {name} unfolded"
        out[component] = {canonical_weight_name(component, n): v.numpy() for n, v in state.items()}
    return out


def package_values(package: Path, initializers: dict) -> dict[str, dict[str, np.ndarray]]:
    """{graph: {weight name: value in torch layout}} of the initializers `lora_initializers`
    returned, through the package's lora map."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for graph, values in initializers.items():
        mapping = GraphWeights(package / graph, graph).map
        out[graph] = {}
        for name, m in mapping.items():
            if m.initializer in values:
                value = values[m.initializer]
                out[graph][name] = value.T if m.transposed else value
    return out


def adapted(sdxl) -> dict[str, set[str]]:
    return {
        c: {canonical_weight_name(c, f"{m}.weight") for m in sdxl["layers"][c]} for c in COMPONENTS
    }


def assert_weights_match(got: dict, want: dict, what: str) -> float:
    worst = 0.0
    for name, value in got.items():
        err = float(np.abs(value.astype(np.float64) - want[name]).max())
        assert err <= WEIGHT_TOLERANCE, f"{what}: {name} differs from diffusers' by {err:.2e}"
        worst = max(worst, err)
    return worst


# ---------------------------------------------------------------------------------------------
# Weights against diffusers' fuse_lora
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,scale", [("peft", 1.0), ("kohya", 0.7)])
def test_folded_weights_match_diffusers_fuse_lora(sdxl, fused, layout, scale):
    reference = reference_weights(fused(layout, scale), sdxl)
    want = adapted(sdxl)

    modules = load_components(sdxl["folder"])
    folds = fold_lora_torch(modules, [(sdxl[layout], scale)])
    assert {(f.component, f.weight) for f in folds} == {(c, n) for c in want for n in want[c]}
    for component in COMPONENTS:
        state = {
            canonical_weight_name(component, n): v.numpy()
            for n, v in modules[component].state_dict().items()
        }
        err = assert_weights_match(state, reference[component], f"torch {component}")
        print(f"{layout} torch {component}: max abs error {err:.2e}")

    # the package's folds: what Pipeline.from_pretrained(package, loras=…) loads
    initializers = lora_initializers(sdxl["package"], [(sdxl[layout], scale)])
    values = package_values(sdxl["package"], initializers)
    assert {c: set(v) for c, v in values.items()} == want
    for component in COMPONENTS:
        err = assert_weights_match(values[component], reference[component], f"onnx {component}")
        print(f"{layout} onnx {component}: max abs error {err:.2e}")


def test_kohya_and_peft_files_give_the_same_folds(sdxl):
    graphs = {g: GraphWeights(sdxl["package"] / g, g) for g in COMPONENTS}
    shapes = {g: gw.shapes() for g, gw in graphs.items()}
    configs = {"unet": graphs["unet"].config}
    peft_folds, kohya_folds = (
        {(f.component, f.weight): f for f in plan_fold([(read_lora(p), 1.0)], shapes, configs)}
        for p in (sdxl["peft"], sdxl["kohya"])
    )
    assert len(peft_folds) == sum(len(v) for v in sdxl["layers"].values())
    assert peft_folds.keys() == kohya_folds.keys()
    for key, fold in peft_folds.items():
        np.testing.assert_allclose(kohya_folds[key].delta(), fold.delta(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# End to end: the ONNX package against diffusers' pipeline
# ---------------------------------------------------------------------------------------------


def run(pipe, latents: np.ndarray, ours: bool) -> np.ndarray:
    common = dict(
        negative_prompt="ugly",
        num_inference_steps=3,
        guidance_scale=5.0,
        height=64,
        width=64,
        output_type="np",
    )
    if ours:
        return pipe(
            "a red cat", latents=latents, generator=TorchNoise(5), scheduler="ddim", **common
        ).images
    return pipe(
        "a red cat",
        latents=torch.from_numpy(latents.copy()),
        generator=torch.Generator().manual_seed(5),
        **common,
    ).images


def test_image_matches_diffusers_and_lora_apply(sdxl, fused, tmp_path):
    lora = (sdxl["kohya"], 0.7)
    latents = np.random.default_rng(7).standard_normal((1, 4, 8, 8), dtype=np.float32)
    expected = run(fused("kohya", 0.7), latents, ours=False)
    base = run(Pipeline.from_pretrained(sdxl["package"]), latents, ours=True)
    at_load = run(Pipeline.from_pretrained(sdxl["package"], loras=[lora]), latents, ours=True)
    assert float(expected.std()) > 1e-3, "reference image is flat: the test would prove nothing"
    effect = float(np.abs(expected - base).max())
    assert effect > 50 * IMAGE_TOLERANCE, f"the LoRA barely changes the image ({effect:.2e})"
    err = float(np.abs(at_load - expected).max())
    print(f"sdxl kohya fuse_lora(0.7): max abs error {err:.2e}")
    assert err <= IMAGE_TOLERANCE

    out = tmp_path / "applied"
    assert cli_main(["lora", "apply", str(sdxl["package"]), "--lora", f"{lora[0]}:{lora[1]}",
                     "--out", str(out)]) == 0  # fmt: skip
    applied = run(Pipeline.from_pretrained(out), latents, ours=True)
    assert np.array_equal(applied, at_load), "lora apply and the load-time fold differ"


# ---------------------------------------------------------------------------------------------
# Export-time folding, lora apply, the maps
# ---------------------------------------------------------------------------------------------


def _weights(package: Path, graph: str) -> dict[str, np.ndarray]:
    gw = GraphWeights(package / graph, graph)
    inits = gw.index.initializers
    return {n: inits[m.initializer].read() for n, m in gw.map.items()}


def test_lora_apply_equals_export_time_fold(sdxl, tmp_path):
    from fewstep.export import export_package

    lora = [(sdxl["peft"], 0.8)]
    exported = export_package(
        sdxl["folder"], tmp_path / "exported", loras=lora, verify=False, progress=False
    )
    applied = apply_loras_to_package(sdxl["package"], lora, tmp_path / "applied")
    assert read_manifest(exported)["loras"][0]["folded_at"] == "export"
    assert read_manifest(applied)["loras"][0]["folded_at"] == "apply"
    want = adapted(sdxl)
    for graph in COMPONENTS:
        before = _weights(sdxl["package"], graph)
        at_export, at_apply = _weights(exported, graph), _weights(applied, graph)
        assert at_export.keys() == at_apply.keys() == before.keys()
        changed = {n for n in before if not np.array_equal(at_export[n], before[n])}
        assert changed == want[graph], graph
        for name in before:
            np.testing.assert_allclose(at_export[name], at_apply[name], rtol=1e-6, atol=1e-6)


def test_text_encoder_2_has_a_lora_map(sdxl):
    """The exporter writes text_encoder_2/lora_map.json (its wrapper holds the encoder under
    `text_encoder.`), and it equals the map read off the graph (optimum's packages)."""
    graph = "text_encoder_2"
    path = sdxl["package"] / graph / "lora_map.json"
    recorded = read_lora_map(path)
    derived = derive_lora_map(graph, read_onnx_index(sdxl["package"] / graph / "model.onnx"))
    assert recorded == derived
    assert json.loads(path.read_text())["unmapped"] == []
    assert recorded["text_projection.weight"].transposed
    assert recorded["encoder.layers.0.self_attn.q_proj.weight"].transposed


# ---------------------------------------------------------------------------------------------
# sgm names of the full-size SDXL U-Net, and keys that match nothing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,deepest",
    [
        (FULL_SDXL_UNET, "input_blocks_8_1_transformer_blocks_9_"),
        (FULL_SD15_UNET, "output_blocks_2_1_conv"),  # upsampler of an up block without attention
    ],
    ids=["sdxl", "sd15"],
)
def test_full_size_sgm_names_resolve(tmp_path, config, deepest):
    """Every 2-D/4-D weight of a full-size U-Net (SDXL: 2 layers per block, 10 transformer
    layers, another numbering than the tiny model's), named the sgm way, resolves to it."""
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**config)
    sgm = SgmTable(unet)
    shapes = {n: tuple(p.shape) for n, p in unet.named_parameters() if p.ndim in (2, 4)}
    tensors, expected = {}, {}
    for name, shape in shapes.items():
        key = kohya_name("unet", name.removesuffix(".weight"), sgm)
        tensors[f"{key}.lora_down.weight"] = np.ones((1, *shape[1:]), np.float32)
        up_shape = (shape[0], 1, 1, 1) if len(shape) == 4 else (shape[0], 1)
        tensors[f"{key}.lora_up.weight"] = np.ones(up_shape, np.float32)
        expected[f"{key}.lora_down.weight"] = name
    assert any(k.startswith(f"lora_unet_{deepest}") for k in tensors)
    save_file(tensors, str(tmp_path / "full.safetensors"))
    folds = plan_fold(
        [(read_lora(tmp_path / "full.safetensors"), 1.0)],
        {"unet": shapes},
        {"unet": dict(unet.config)},
    )
    assert {f.terms[0].key: f.weight for f in folds} == expected


def test_kohya_key_of_a_missing_block_is_refused(sdxl, tmp_path):
    """input_blocks_1 has no attention in SDXL (its first down block is DownBlock2D), and
    the tiny U-Net has 6 output blocks: both keys named, everywhere, before anything changes."""
    from fewstep.export import export_package

    one = np.ones((1, 16), np.float32)
    bad = [
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_output_blocks_9_0_in_layers_2",
    ]
    module, (a, b) = next(iter(sdxl["layers"]["unet"].items()))
    good = kohya_name("unet", module, sdxl["sgm"])
    tensors = {f"{good}.lora_down.weight": a, f"{good}.lora_up.weight": b}
    for key in bad:
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = one, one.T
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    match = (
        r"2 LoRA keys match no weight(?=[\s\S]*" + bad[0] + r")(?=[\s\S]*" + bad[1] + r")"
        r"[\s\S]*input_blocks_0…5, middle_block_0…2, output_blocks_0…5"
    )
    loras = [(path, 1.0)]
    modules = load_components(sdxl["folder"])
    pristine = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in modules.items()}
    with pytest.raises(ValueError, match=match):
        fold_lora_torch(modules, loras)
    for c, m in modules.items():
        assert all(torch.equal(v, pristine[c][k]) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match=match):
        Pipeline.from_pretrained(sdxl["package"], loras=loras)
    for out, call in (
        (tmp_path / "applied", lambda o: apply_loras_to_package(sdxl["package"], loras, o)),
        (tmp_path / "exported", lambda o: export_package(
            sdxl["folder"], o, loras=loras, verify=False, progress=False)),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            call(out)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}.tmp-*"))
