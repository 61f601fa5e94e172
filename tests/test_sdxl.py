"""SDXL end to end on the tiny SDXL model: export against transformers/diffusers and optimum's
names, the pipeline against diffusers' StableDiffusionXLPipeline, the input checks.

Reference: diffusers' StableDiffusionXLPipeline in torch fp32 (DDIM, Euler, Euler-ancestral)
on `make_tiny_model(…, "sdxl")`; fewstep runs its exported package on onnxruntime (and one
case on OpenVINO), from the same latents and the same noise (conftest's `TorchNoise`),
within conftest's image tolerance (the cases and their runner: sdxl_parity.py). The
SDXL-Turbo package is the SDXL one with SDXL-Turbo's scheduler config (the tiny models share
their weights; conftest's `turbo_package` checks it), so the session exports one SDXL
package. I/O names are optimum's (`optimum/exporters/onnx/model_configs.py`:
CLIPTextOnnxConfig, CLIPTextWithProjectionOnnxConfig, UNetOnnxConfig, with
`output_hidden_states` on both encoders as its SDXL export sets it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import IMAGE_TOLERANCE, TorchNoise  # noqa: E402
from sdxl_parity import CASES, NEGATIVE_SIZES, SIZES, SDXLCase, run_case  # noqa: E402

from fewstep.package import (  # noqa: E402
    PackageError,
    read_manifest,
    read_model_info,
    verify_package,
)
from fewstep.pipeline import Pipeline  # noqa: E402

TEXT_LAYERS = 3  # both tiny encoders (export/testing.py)


# ---------------------------------------------------------------------------------------------
# The tiny SDXL model
# ---------------------------------------------------------------------------------------------


def test_tiny_sdxl_model_has_sdxls_shape(tiny_model, tmp_path):
    from fewstep.export.testing import make_tiny_model

    folder = tiny_model("sdxl")

    def config(name: str) -> dict:
        return json.loads((folder / name / "config.json").read_text())

    unet, te1, te2, vae = (config(n) for n in ("unet", "text_encoder", "text_encoder_2", "vae"))
    assert unet["addition_embed_type"] == "text_time"
    assert max(unet["transformer_layers_per_block"]) > 1
    assert te1["hidden_size"] != te2["hidden_size"] != te2["projection_dim"]
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == (
        6 * unet["addition_time_embed_dim"] + te2["projection_dim"]
    )
    assert (te1["hidden_act"], te2["hidden_act"]) == ("quick_gelu", "gelu")
    assert te2["architectures"] == ["CLIPTextModelWithProjection"]
    assert vae["force_upcast"] is True and vae["scaling_factor"] == 0.13025
    for tokenizer in ("tokenizer", "tokenizer_2"):  # as transformers 5 saves them
        files = sorted(p.name for p in (folder / tokenizer).iterdir())
        assert files == ["tokenizer.json", "tokenizer_config.json"], tokenizer
    # The weights are the seed's: another seed changes every file.
    other = make_tiny_model(tmp_path / "seed1", "sdxl", seed=1)
    weights = sorted(p.relative_to(folder) for p in folder.rglob("*.safetensors"))
    assert len(weights) == 4
    for name in weights:
        assert (folder / name).read_bytes() != (other / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------
# Export: optimum's names, and every graph against its torch module
# ---------------------------------------------------------------------------------------------


def _io(package: Path, graph: str) -> tuple[dict[str, list], dict[str, list]]:
    model = onnx.load(str(package / graph / "model.onnx"), load_external_data=False)

    def describe(values: Any) -> dict[str, list]:
        return {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in values
        }

    return describe(model.graph.input), describe(model.graph.output)


def test_graph_io_is_optimums_sdxl_layout(sdxl_package):
    states = {f"hidden_states.{i}": ["batch", "sequence"] for i in range(TEXT_LAYERS + 1)}
    inputs, outputs = _io(sdxl_package, "text_encoder")
    assert inputs == {"input_ids": ["batch", "sequence"]}
    assert list(outputs) == ["last_hidden_state", "pooler_output", *states]
    assert outputs["pooler_output"] == ["batch", 32]
    assert all(outputs[name] == ["batch", "sequence", 32] for name in states)

    inputs, outputs = _io(sdxl_package, "text_encoder_2")
    assert inputs == {"input_ids": ["batch", "sequence"]}
    assert list(outputs) == ["text_embeds", "last_hidden_state", *states]
    assert outputs["text_embeds"] == ["batch", 40]  # projection_dim, not hidden_size (64)
    assert all(outputs[name] == ["batch", "sequence", 64] for name in states)

    inputs, outputs = _io(sdxl_package, "unet")
    assert inputs == {
        "sample": ["batch", 4, "height", "width"],
        "timestep": [],
        "encoder_hidden_states": ["batch", "sequence", 96],  # 32 + 64
        "text_embeds": ["batch", 40],
        "time_ids": ["batch", 6],
    }
    assert outputs == {"out_sample": ["batch", 4, "height", "width"]}
    assert list(_io(sdxl_package, "vae_decoder")[0]) == ["latent_sample"]
    assert list(_io(sdxl_package, "vae_encoder")[0]) == ["sample"]

    for tokenizer in ("tokenizer", "tokenizer_2"):  # both layouts, whatever the source had
        files = {p.name for p in (sdxl_package / tokenizer).iterdir()}
        assert {"tokenizer.json", "vocab.json", "merges.txt"} <= files, tokenizer
    manifest = verify_package(sdxl_package)  # every file hashed, text_encoder_2 there
    for path in ("text_encoder_2/model.onnx", "text_encoder_2/config.json",
                 "tokenizer_2/tokenizer.json", "tokenizer_2/vocab.json"):  # fmt: skip
        assert path in manifest["files"], path
    assert manifest["family"] == "sdxl" and manifest["vae_scaling_factor"] == 0.13025
    assert manifest["default_guidance_scale"] == 5.0  # diffusers' SDXL default
    assert set(manifest["graphs"]) == {
        "text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"
    }  # fmt: skip
    assert manifest["graphs"]["text_encoder_2"]["max_rel_error"] <= 1e-4


class SDXLTorch:
    """The tiny SDXL model's own modules, called through diffusers/transformers APIs."""

    def __init__(self, folder: Path):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        self.unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
        self.vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
        self.encoders = {
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                folder / "text_encoder_2"
            ).eval(),
        }

    @torch.no_grad()
    def run(self, graph: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        t = {k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}
        if graph in self.encoders:
            out = self.encoders[graph](t["input_ids"], output_hidden_states=True)
            first = [out[0], out[1]]  # (last_hidden_state, pooler) / (text_embeds, last)
            outs = first + list(out.hidden_states)
        elif graph == "unet":
            added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}
            outs = [
                self.unet(
                    t["sample"], t["timestep"], t["encoder_hidden_states"], added_cond_kwargs=added
                ).sample
            ]
        elif graph == "vae_decoder":
            outs = [self.vae.decode(t["latent_sample"]).sample]
        else:
            dist = self.vae.encode(t["sample"]).latent_dist
            outs = [torch.cat([dist.mean, dist.logvar], dim=1)]
        return [o.float().numpy() for o in outs]


def _random_feed(package: Path, graph: str, batch: int, height: int, width: int) -> dict:
    rng = np.random.default_rng(5)
    sizes = {
        "batch": batch,
        "sequence": 77,
        "height": height,
        "width": width,
        "image_height": 8 * height,
        "image_width": 8 * width,
    }
    inputs, _ = _io(package, graph)
    feed: dict[str, np.ndarray] = {}
    for name, dims in inputs.items():
        shape = [sizes[d] if isinstance(d, str) else d for d in dims]
        if name == "input_ids":
            feed[name] = rng.integers(0, 600, size=shape, dtype=np.int64)
        elif name == "timestep":
            feed[name] = np.asarray(rng.uniform(0, 999), dtype=np.float32)
        elif name == "time_ids":
            feed[name] = (8 * rng.integers(0, 200, size=shape)).astype(np.float32)
        else:
            feed[name] = rng.standard_normal(size=shape).astype(np.float32)
    return feed


@pytest.mark.parametrize(
    "graph", ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
)
def test_graph_matches_torch_at_another_batch_and_size(graph, tiny_model, sdxl_package):
    """Batch 3 and a 12x4 latent: neither the traced shape (1, 8x8) nor the verified one."""
    feed = _random_feed(sdxl_package, graph, batch=3, height=12, width=4)
    session = ort.InferenceSession(
        str(sdxl_package / graph / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, feed)
    expected = SDXLTorch(tiny_model("sdxl")).run(graph, feed)
    assert len(got) == len(expected)
    for name, g, e in zip([o.name for o in session.get_outputs()], got, expected, strict=True):
        assert g.shape == e.shape, name
        assert np.abs(g - e).max() <= 1e-4 * np.abs(e).max(), name


# ---------------------------------------------------------------------------------------------
# The pipeline against diffusers' StableDiffusionXLPipeline
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def case_packages(sdxl_package, turbo_package):
    return {"sdxl": sdxl_package, "sdxl_turbo": turbo_package}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_pipeline_matches_diffusers(case, case_packages, package_pipelines, sdxl_references):
    got, expected = run_case(
        case,
        package_pipelines(case_packages[case.family]),
        sdxl_references(case.family, case.sampler),
    )
    err = float(np.abs(got - expected).max())
    print(f"{case.id}: onnxruntime vs diffusers max abs error {err:.2e}")
    assert err <= IMAGE_TOLERANCE


def test_openvino_matches_diffusers(sdxl_package, package_pipelines, sdxl_references):
    pytest.importorskip("openvino")
    case = CASES[1]  # guided, prompt_2 and both negatives, non-square
    got, expected = run_case(
        case, package_pipelines(sdxl_package, "openvino"), sdxl_references("sdxl", "ddim")
    )
    assert float(np.abs(got - expected).max()) <= IMAGE_TOLERANCE


def test_package_in_optimums_file_layout_matches_diffusers(sdxl_package, tmp_path, sdxl_references):
    """What optimum ships for SDXL: no fewstep.json or lora maps, and tokenizers as
    vocab.json + merges.txt only."""
    package = tmp_path / "package"
    shutil.copytree(
        sdxl_package,
        package,
        ignore=shutil.ignore_patterns("fewstep.json", "lora_map.json", "tokenizer.json"),
    )
    assert not (package / "tokenizer_2" / "tokenizer.json").exists()
    case = CASES[1]  # guided, prompt_2 and both negatives, non-square
    got, expected = run_case(
        case, Pipeline.from_pretrained(package), sdxl_references("sdxl", "ddim")
    )
    assert float(np.abs(got - expected).max()) <= IMAGE_TOLERANCE


def test_force_zeros_for_empty_prompt_false(
    sdxl_package, tmp_path, tiny_model, package_pipelines, sdxl_references
):
    """model_index.json's flag off: a guided call without negative_prompt encodes "" instead of
    zeros, as diffusers' pipeline registered with the same flag does."""
    package = tmp_path / "package"
    shutil.copytree(sdxl_package, package)
    index = json.loads((package / "model_index.json").read_text())
    (package / "model_index.json").write_text(
        json.dumps({**index, "force_zeros_for_empty_prompt": False})
    )
    ours = Pipeline.from_pretrained(package, check_hashes=False)
    assert ours.sdxl.force_zeros_for_empty_prompt is False
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(
        tiny_model("sdxl"), add_watermarker=False, force_zeros_for_empty_prompt=False
    )
    reference.scheduler = diffusers.DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    assert reference.config.force_zeros_for_empty_prompt is False
    case = SDXLCase("ddim-cfg-empty-negative", "ddim", 5.0)
    got, expected = run_case(case, ours, reference)
    assert float(np.abs(got - expected).max()) <= IMAGE_TOLERANCE
    # …and it is not the zeros' image.
    zeros, _ = run_case(case, package_pipelines(sdxl_package), sdxl_references("sdxl", "ddim"))
    assert float(np.abs(zeros - got).max()) > 10 * IMAGE_TOLERANCE


def test_negative_sizes_condition_each_image_of_a_batch(sdxl_package, package_pipelines):
    """Each image of a batch gets the image it gets alone (diffusers' own stacking pairs the
    negative and positive time ids with the wrong rows here; see fewstep.prompt_sdxl)."""
    ours = package_pipelines(sdxl_package)
    common = dict(
        num_inference_steps=2,
        guidance_scale=5.0,
        scheduler="ddim",
        output_type="np",
        **dict(SIZES + NEGATIVE_SIZES),
    )
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8), dtype=np.float32)
    prompts = ["a cat", "a dog"]
    both = ours(prompts, latents=latents, **common).images
    for i, prompt in enumerate(prompts):
        alone = ours(prompt, latents=latents[i : i + 1], **common).images
        assert float(np.abs(both[i] - alone[0]).max()) <= 1e-5
    # …and the negative sizes matter: without them the images differ.
    positive_only = {k: v for k, v in common.items() if not k.startswith("negative_")}
    plain = ours(prompts, latents=latents, **positive_only).images
    assert float(np.abs(plain - both).max()) > 10 * IMAGE_TOLERANCE


def test_turbo_defaults_come_from_the_package(turbo_package, package_pipelines, sdxl_references):
    """SDXL-Turbo's Euler-ancestral trailing schedule → 1 step, no guidance, no arguments."""
    info = read_model_info(turbo_package)
    assert (info.default_num_inference_steps, info.default_guidance_scale) == (1, 0.0)
    ours = package_pipelines(turbo_package)
    latents = np.random.default_rng(9).standard_normal((1, 4, 8, 8), dtype=np.float32)
    got = ours("a red cat", latents=latents, generator=TorchNoise(4), output_type="np")
    assert got.settings["sampler"] == "euler_ancestral" and got.settings["unet_calls"] == 1
    assert (got.settings["num_inference_steps"], got.settings["guidance_scale"]) == (1, 0.0)
    expected = sdxl_references("sdxl_turbo", None)(
        "a red cat",
        num_inference_steps=1,
        guidance_scale=0.0,
        latents=torch.from_numpy(latents.copy()),
        generator=torch.Generator().manual_seed(4),
        output_type="np",
    ).images
    assert float(np.abs(got.images - expected).max()) <= IMAGE_TOLERANCE


def test_onnxruntime_runs_the_sdxl_unet_with_fused_attention(sdxl_package, package_pipelines):
    """So the parity cases above cover the fused path: 11 transformer layers (down 1 + 2,
    middle 2, up 2 x 2 + 2 x 1), each with self- and cross-attention, and the VAE decoder's."""
    fused = package_pipelines(sdxl_package).backend.report().fused_attention
    assert fused == {"unet": 22, "vae_decoder": 1}


def test_settings_record_the_resolved_sdxl_arguments(sdxl_package, package_pipelines):
    out = package_pipelines(sdxl_package)(
        "a cat",
        num_inference_steps=1,
        height=64,
        width=96,
        seed=1,
        negative_prompt="ugly",
        original_size=(1024, 1024),
    )
    settings = out.settings
    assert settings["prompt_2"] == ["a cat"] and settings["negative_prompt_2"] == ["ugly"]
    assert settings["original_size"] == [1024, 1024] and settings["target_size"] == [64, 96]
    assert settings["crops_coords_top_left"] == [0, 0]
    assert settings["negative_original_size"] == [1024, 1024]  # the positive ones
    assert settings["guidance_scale"] == 5.0 and out.images[0].size == (96, 64)


# ---------------------------------------------------------------------------------------------
# Input checks: before any graph runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(original_size=(64,)), r"original_size must be a \(height, width\) pair"),
        (dict(target_size="64x64"), r"target_size must be a \(height, width\) pair"),
        (dict(crops_coords_top_left=(0, -8)), r"crops_coords_top_left\[1\] must be an integer"),
        (dict(original_size=(64, 1e9)), r"original_size\[1\] must be an integer between 0"),
        (dict(original_size=(True, 64)), r"original_size\[0\] must be an integer"),
        (
            dict(negative_original_size=(64, 64)),
            "negative_original_size needs negative_target_size",
        ),
        (dict(negative_target_size=(64, 64)), "negative_target_size needs negative_original_size"),
        (dict(negative_crops_coords_top_left=(8, 8)), "negative_crops_coords_top_left needs"),
        (dict(prompt_2=["a", "b"]), r"prompt_2 must have one entry per prompt \(1\), got 2"),
        (dict(prompt_2=7), "prompt_2 must be a string or a non-empty list"),
        (dict(negative_prompt_2=["x"] * 3), "negative_prompt_2 must have one entry per prompt"),
    ],
)
def test_bad_sdxl_input_is_refused_before_any_graph_runs(
    kwargs, match, sdxl_package, package_pipelines, guarded
):
    pipe = guarded(package_pipelines(sdxl_package))
    with pytest.raises(ValueError, match=match):
        pipe("a cat", num_inference_steps=1, **kwargs)
    with pytest.raises(guarded.GraphRan):  # the same call without the bad argument passes
        pipe("a cat", num_inference_steps=1)


@pytest.mark.parametrize(
    "name, value",
    [
        ("prompt_2", "a dog"),
        ("negative_prompt_2", "ugly"),
        ("original_size", (64, 64)),
        ("crops_coords_top_left", (0, 0)),
        ("target_size", (64, 64)),
        ("negative_original_size", (64, 64)),
        ("negative_crops_coords_top_left", (0, 0)),
        ("negative_target_size", (64, 64)),
    ],
)
def test_sdxl_arguments_are_refused_for_other_families(name, value, tiny_package, guarded):
    pipe = guarded(Pipeline.from_pretrained(tiny_package("sd1")))
    with pytest.raises(ValueError, match=rf"{name} applies to SDXL models only.*'sd1'"):
        pipe("a cat", num_inference_steps=1, **{name: value})


def test_tokenizer_2_matches_transformers(tiny_model, sdxl_package, package_pipelines):
    """tokenizer_2 pads with "!" (OpenCLIP), tokenizer with <|endoftext|>, as transformers'."""
    from transformers import CLIPTokenizer

    ours = package_pipelines(sdxl_package)
    prompts = ["a photo of an astronaut riding a horse on mars", "", "a cat! " * 40]
    for name, tokenizer in (("tokenizer", ours.tokenizer), ("tokenizer_2", ours.sdxl.tokenizer_2)):
        reference = CLIPTokenizer.from_pretrained(tiny_model("sdxl") / name)
        expected = reference(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np"
        ).input_ids
        np.testing.assert_array_equal(tokenizer(prompts), expected, err_msg=name)
    assert (ours.tokenizer.pad_token, ours.sdxl.tokenizer_2.pad_token) == ("<|endoftext|>", "!")


# ---------------------------------------------------------------------------------------------
# Package errors: at load, naming the file
# ---------------------------------------------------------------------------------------------


def test_sdxl_package_without_text_encoder_2_is_refused_at_load(sdxl_package, tmp_path):
    package = tmp_path / "package"
    shutil.copytree(sdxl_package, package, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(PackageError, match=r"missing package file: .*text_encoder_2/model\.onnx"):
        Pipeline.from_pretrained(package, check_hashes=False)


def test_inconsistent_projection_dim_is_refused_at_load(sdxl_package, tmp_path):
    package = tmp_path / "package"
    shutil.copytree(sdxl_package, package)
    config_path = package / "text_encoder_2" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "projection_dim": 41}))
    with pytest.raises(PackageError, match=r"projection_dim \(41\) must equal .*= 40"):
        Pipeline.from_pretrained(package, check_hashes=False)


def test_text_encoder_without_hidden_states_is_named(sdxl_package, package_pipelines, monkeypatch):
    """A package whose encoder lacks the per-layer outputs (an SD-style export) fails by name
    rather than conditioning on the wrong layer."""
    ours = package_pipelines(sdxl_package)
    real_run = ours.backend.run

    def run(graph, **inputs):
        out = real_run(graph, **inputs)
        if graph == "text_encoder_2":
            out = {k: v for k, v in out.items() if not k.startswith("hidden_states.")}
        return out

    monkeypatch.setattr(ours.backend, "run", run)
    with pytest.raises(PackageError, match=r"text_encoder_2: the graph lacks .*hidden_states"):
        ours("a cat", num_inference_steps=1)


# ---------------------------------------------------------------------------------------------
# fp16: the VAE stays fp32 (force_upcast), the image stays finite
# ---------------------------------------------------------------------------------------------


def test_fp16_package_keeps_the_vae_in_fp32(tiny_model, tmp_path, sdxl_package, package_pipelines):
    from fewstep.export import export_package

    package = export_package(tiny_model("sdxl"), tmp_path / "fp16", dtype="fp16", progress=False)
    graphs = read_manifest(package)["graphs"]
    precisions = {name: entry["precision"] for name, entry in graphs.items()}
    assert precisions == {
        "text_encoder": "fp16",
        "text_encoder_2": "fp16",
        "unet": "fp16",
        "vae_decoder": "fp32",
        "vae_encoder": "fp32",
    }
    unet_types = {t["name"]: t["dtype"] for t in graphs["unet"]["inputs"]}
    assert unet_types["time_ids"] == "float16" and unet_types["timestep"] == "float32"
    assert {t["dtype"] for t in graphs["vae_decoder"]["inputs"]} == {"float32"}
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, seed=2, output_type="np")
    fp16 = Pipeline.from_pretrained(package)("a red cat", **kwargs).images
    fp32 = package_pipelines(sdxl_package)("a red cat", **kwargs).images
    assert np.isfinite(fp16).all()
    # fp16 text encoders and U-Net, fp32 VAE: near the fp32 package's image (measured:
    # max 2e-3, mean 3e-4)
    assert float(np.abs(fp16 - fp32).max()) < 1e-2
