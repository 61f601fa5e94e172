"""Single-file SDXL checkpoints (Stability's original layout) exported with `config=`.

The tiny SDXL and SDXL-Turbo models are written as one `.safetensors` file by conftest's
`save_single_file` (its own key tables, the inverse of diffusers' single-file conversion);
diffusers' `StableDiffusionXLPipeline.from_single_file` reading that file back as the folder's
weights shows the file has the real layout. The config folder is a copy of the model folder
without weights, as a user would download it. References: diffusers' StableDiffusionXLPipeline
on the model folder, from the same latents and noise, within conftest's image tolerance; and
the refusals, which must come before anything loads, naming the file, key or config.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import IMAGE_TOLERANCE, TorchNoise  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import fewstep.export.package_writer as package_writer  # noqa: E402
from fewstep.export import export_package  # noqa: E402
from fewstep.package import read_manifest  # noqa: E402
from fewstep.pipeline import Pipeline  # noqa: E402

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _config_folder(model: Path, out: Path) -> Path:
    """The diffusers folder's configs, tokenizers and scheduler, without any weights."""
    shutil.copytree(model, out, ignore=shutil.ignore_patterns("*.safetensors"))
    return out


@pytest.fixture(scope="module")
def single_file(tiny_model, save_single_file, tmp_path_factory):
    """family -> (the model as a single file, its config folder)."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in cache:
            root = tmp_path_factory.mktemp(f"{family}-single-file")
            ckpt = save_single_file(tiny_model(family), root / "model.safetensors")
            cache[family] = ckpt, _config_folder(tiny_model(family), root / "config")
        return cache[family]

    return get


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the source was loaded before the arguments were checked")

    monkeypatch.setattr(package_writer, "load_source", fail)


def _load_single_file(ckpt: Path, config: Path):
    return diffusers.StableDiffusionXLPipeline.from_single_file(
        str(ckpt), config=str(config), local_files_only=True, add_watermarker=False
    )


# ---------------------------------------------------------------------------------------------
# The file: Stability's layout, read by diffusers as the folder's weights
# ---------------------------------------------------------------------------------------------


def test_file_has_stabilitys_key_layout(single_file):
    """What sd_xl_base_1.0.safetensors has, at the tiny model's widths (encoder 2: 64 wide,
    40-wide projection; U-Net blocks 16/32/64 wide, attention only below the top level)."""
    ckpt, _ = single_file("sdxl")
    with safe_open(str(ckpt), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    openclip = "conditioner.embedders.1.model."
    assert shapes[openclip + "transformer.resblocks.2.attn.in_proj_weight"] == (3 * 64, 64)
    assert shapes[openclip + "text_projection"] == (64, 40)
    assert shapes[openclip + "positional_embedding"] == (77, 64)
    assert shapes[openclip + "ln_final.weight"] == (64,)
    clip = "conditioner.embedders.0.transformer.text_model."
    assert shapes[clip + "embeddings.position_embedding.weight"] == (77, 32)
    unet = "model.diffusion_model."
    assert shapes[unet + "label_emb.0.0.weight"][1] == 6 * 8 + 40
    assert unet + "input_blocks.1.0.in_layers.2.weight" in shapes  # top level: a ResBlock only
    assert not any(k.startswith(unet + "input_blocks.1.1.") for k in shapes)
    assert shapes[unet + "input_blocks.5.1.proj_in.weight"] == (64, 64)  # linear projection
    assert unet + "input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight" in shapes  # depth 2
    assert unet + "output_blocks.3.2.conv.weight" in shapes  # upsampler after the attention
    assert not any(k.startswith("cond_stage_model.") for k in shapes)


def test_unet_table_inverts_diffusers_on_sdxls_full_block_pattern(to_ldm):
    """SDXL's real U-Net pattern (2 layers a block, no attention at the top, transformer depth
    growing per block, text_time conditioning) at tiny width: diffusers' converter undoes it."""
    from diffusers.loaders import single_file_utils as sfu

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, block_out_channels=(8, 16, 16), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 3), attention_head_dim=(1, 2, 4),
            use_linear_projection=True, cross_attention_dim=12, norm_num_groups=4,
            addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 8,
        )  # fmt: skip
    state, config = unet.state_dict(), dict(unet.config)
    ldm = to_ldm["unet"](state, config)
    assert "model.diffusion_model.output_blocks.8.0.skip_connection.weight" in ldm  # 9 entries
    assert "model.diffusion_model.middle_block.1.transformer_blocks.2.attn1.to_q.weight" in ldm
    back = sfu.convert_ldm_unet_checkpoint(checkpoint=ldm, config=config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_diffusers_reads_the_file_as_the_folders_weights(single_file, tiny_model):
    ckpt, config = single_file("sdxl")
    got = _load_single_file(ckpt, config)
    expected = diffusers.StableDiffusionXLPipeline.from_pretrained(
        tiny_model("sdxl"), add_watermarker=False
    )
    for name in COMPONENTS:
        ours, theirs = getattr(got, name).state_dict(), getattr(expected, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
        assert not different, f"{name}: {different[:5]}"


# ---------------------------------------------------------------------------------------------
# The exported package against diffusers on the folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, steps, guidance_scale",
    [("sdxl", 3, 5.0), ("sdxl_turbo", 1, 0.0)],  # each config's own scheduler
)
def test_package_of_the_file_matches_diffusers_on_the_folder(
    family, steps, guidance_scale, single_file, tiny_model, tmp_path
):
    ckpt, config = single_file(family)
    pkg = export_package(ckpt, tmp_path / "pkg", config=config, progress=False, verify=False)
    manifest = read_manifest(pkg)
    assert manifest["source"] == {
        "path": str(ckpt.resolve()),
        "kind": "single_file",
        "config": str(config.resolve()),
    }
    index = (pkg / "model_index.json").read_text()
    for entry in ('"text_encoder_2": [', '"tokenizer_2": [', '"force_zeros_for_empty_prompt"'):
        assert entry in index
    assert (pkg / "tokenizer_2" / "vocab.json").is_file()

    latents = np.random.default_rng(7).standard_normal((1, 4, 8, 12), dtype=np.float32)
    common = dict(
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=64,
        width=96,
        output_type="np",
        original_size=(128, 96),
    )
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(
        tiny_model(family), add_watermarker=False
    )
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        ["a red cat"],
        negative_prompt=["ugly"] if guidance_scale > 1 else None,
        latents=torch.from_numpy(latents.copy()),
        generator=torch.Generator().manual_seed(11),
        **common,
    ).images
    got = Pipeline.from_pretrained(pkg)(
        ["a red cat"],
        negative_prompt=["ugly"] if guidance_scale > 1 else None,
        latents=latents,
        generator=TorchNoise(11),
        **common,
    ).images
    assert got.shape == expected.shape == (1, 64, 96, 3)
    assert float(expected.std()) > 1e-3, "reference image is flat: the test would prove nothing"
    assert float(np.abs(got - expected).max()) <= IMAGE_TOLERANCE


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def _as_refiner(state: dict) -> dict:
    """The refiner's layout: OpenCLIP alone, as embedders.0; no CLIP-L."""
    out = {k: v for k, v in state.items() if not k.startswith("conditioner.embedders.0.")}
    prefix = "conditioner.embedders.1."
    return {
        ("conditioner.embedders.0." + k[len(prefix) :] if k.startswith(prefix) else k): v
        for k, v in out.items()
    }


def _narrow_label_emb(state: dict) -> dict:
    """The refiner's U-Net: 5 size embeddings (aesthetic score) where the base has 6."""
    key = "model.diffusion_model.label_emb.0.0.weight"
    return {**state, key: state[key][:, 8:].contiguous()}


def _without_unet(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("model.diffusion_model.")}


def _with_both_layouts(state: dict) -> dict:
    return {**state, "cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2)}


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (_as_refiner, NotImplementedError,
         r"model.safetensors' is an SDXL refiner checkpoint \(OpenCLIP alone, under "
         r"'conditioner.embedders.0.model.'.*aesthetic score"),
        (_narrow_label_emb, ValueError,
         r"key 'model.diffusion_model.label_emb.0.0.weight' has shape \[64, 80\]; config "
         r".* expects \[_, unet projection_class_embeddings_input_dim\] = \[_, 88\]"),
        (_without_unet, ValueError, r"has no U-Net: no key starts with 'model.diffusion_model.'"),
        (_with_both_layouts, ValueError,
         r"under 'cond_stage_model.' \(SD 1.x/2.x\) or 'conditioner.embedders.' \(SDXL\), not "
         r"both"),
    ],
    ids=["refiner", "refiner-unet", "no-unet", "both-layouts"],
)  # fmt: skip
def test_files_it_cannot_export_are_named_before_loading(
    edit, error, match, single_file, tmp_path, no_loading
):
    ckpt, config = single_file("sdxl")
    edited = tmp_path / "model.safetensors"
    save_file(edit(load_file(str(ckpt))), str(edited))
    with pytest.raises(error, match=match):
        export_package(edited, tmp_path / "pkg", config=config, progress=False)
    assert not (tmp_path / "pkg").exists()


def test_family_mismatch_is_named_before_loading(
    single_file, tiny_model, save_single_file, tmp_path, no_loading
):
    sdxl_file, sdxl_config = single_file("sdxl")
    sd1_file = save_single_file(tiny_model("sd1"), tmp_path / "sd1.safetensors")
    with pytest.raises(ValueError, match=r"sd1.safetensors' is an SD 1.x/2.x checkpoint but "
                       r"config '.*config' is an SDXL folder"):  # fmt: skip
        export_package(sd1_file, tmp_path / "pkg", config=sdxl_config, progress=False)
    with pytest.raises(ValueError, match=r"model.safetensors' is an SDXL checkpoint but "
                       r"config '.*model' is an SD 1.x/2.x folder"):  # fmt: skip
        export_package(sdxl_file, tmp_path / "pkg", config=tiny_model("sd1"), progress=False)
    assert not (tmp_path / "pkg").exists()


def test_encoder_width_mismatch_is_named_before_loading(single_file, tmp_path, no_loading):
    """A config whose text_encoder_2 is narrower than the file's (its U-Net agrees with it)."""
    import json

    ckpt, config = single_file("sdxl")
    edited = _config_folder(config, tmp_path / "config")
    for name, key, value in (
        ("text_encoder_2", "hidden_size", 48),
        ("unet", "cross_attention_dim", 32 + 48),
    ):
        path = edited / name / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(
        ValueError,
        match=r"key 'conditioner.embedders.1.model.positional_embedding' has shape \[77, 64\]; "
        r"config .* expects \[_, text_encoder_2 hidden_size\] = \[_, 48\]",
    ):
        export_package(ckpt, tmp_path / "pkg", config=edited, progress=False)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_pickle_and_unreadable_files_are_refused_unread(suffix, single_file, tmp_path, no_loading):
    _, config = single_file("sdxl")
    marker = tmp_path / "unpickled"
    ckpt = tmp_path / f"model{suffix}"
    ckpt.write_bytes(pickle.dumps({"state_dict": _RunsOnUnpickle(marker)}))
    match = {
        ".ckpt": r"src is a pickle checkpoint \(.ckpt\).*runs code",
        ".safetensors": r"model.safetensors' is not a readable safetensors file",
    }[suffix]
    with pytest.raises(ValueError, match=match):
        export_package(ckpt, tmp_path / "pkg", config=config, progress=False)
    assert not marker.exists()
    assert not (tmp_path / "pkg").exists()


class _RunsOnUnpickle:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    "key, match",
    [
        ("model.diffusion_model.input_blocks.3.1.proj_in.weight",
         "lacks weights that the model of config"),
        ("model.diffusion_model.label_emb.0.2.weight",
         "lacks a key diffusers' single-file loader needs .*'label_emb.0.2.weight'"),
    ],
)  # fmt: skip
def test_file_lacking_a_tensor_is_named_while_loading(key, match, single_file, tmp_path):
    ckpt, config = single_file("sdxl")
    state = load_file(str(ckpt))
    del state[key]
    edited = tmp_path / "model.safetensors"
    save_file(state, str(edited))
    with pytest.raises(ValueError, match=rf"src '.*model.safetensors' {match}"):
        export_package(edited, tmp_path / "pkg", config=config, progress=False)
    assert not (tmp_path / "pkg").exists()
