import dataclasses
import json
import os
import pathlib

# Triton kernels run in the interpreter on CPU-only machines; this must be set
# before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from fewstep.benchmarks.harness import import_training  # noqa: E402

# Fuzz tests draw the same cases on every run (a CI failure reproduces), keep no example
# database in the tree, and time whole pipeline calls, so no per-example deadline.
settings.register_profile(
    "fewstep",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile("fewstep")

# training/ (the scenes dataset and analyzer, the ship step) is a folder of the checkout, not
# installed: imported by its path, never by putting the root on sys.path
# (fewstep.benchmarks.harness.import_training says why).
import_training(pathlib.Path(__file__).resolve().parents[1])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """family -> path of a tiny random-weight diffusers folder (built once per session)."""
    from fewstep.export.testing import make_tiny_model

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_tiny_model(tmp_path_factory.mktemp(family) / "model", family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, tiny_model):
    """family -> path of the tiny model exported to a fewstep package (fp32)."""
    from fewstep.export import export_package

    cache = {}

    def get(family: str):
        if family not in cache:
            out = tmp_path_factory.mktemp(f"{family}-pkg") / "package"
            cache[family] = export_package(tiny_model(family), out, progress=False)
        return cache[family]

    return get


from fewstep.arrays import NUMPY_OPS  # noqa: E402


class GraphRan(AssertionError):
    """A graph ran: every input check had passed."""


class NoGraphBackend:
    """Stands in for a backend to prove that bad input fails before any graph runs."""

    name = "none"
    array_ops = NUMPY_OPS

    def run(self, graph, **inputs):
        raise GraphRan(f"graph {graph} ran")

    def has_graph(self, graph):
        return True


@pytest.fixture
def guarded():
    """pipeline -> the same model on a backend that fails any graph it is asked to run (with
    GraphRan), so a test can tell a refused input (ValueError) from one that passed."""
    from fewstep.pipeline import Pipeline

    def make(pipe, **kwargs):
        return Pipeline(pipe.info, pipe.tokenizer, NoGraphBackend(), pipe.path, **kwargs)

    make.GraphRan = GraphRan
    return make


# ---------------------------------------------------------------------------------------------
# Single-file checkpoints: diffusers keys -> original Stable Diffusion (LDM) keys
#
# `save_single_file(folder, out)` writes a diffusers SD or SDXL folder (a tiny model) as one
# `.safetensors` checkpoint in the original key layout (LDM/CompVis for SD 1.x/2.x, Stability's
# sgm for SDXL): the inverse of what diffusers' `src/diffusers/loaders/single_file_utils.py`
# converts (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
# `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`), written from the key tables
# below, so `StableDiffusionPipeline.from_single_file(out, config=folder, local_files_only=True)`
# (`StableDiffusionXLPipeline` for SDXL) rebuilds the folder's weights bit for bit.
#
# SDXL (`sd_xl_base_1.0.safetensors`' layout): the U-Net under `model.diffusion_model.` with
# sgm's numbering (the same `input_blocks.N.M` arithmetic; blocks without attention simply
# have no `.1` entry; each transformer layer is `transformer_blocks.K` in both layouts) and
# the added conditioning's MLP as `label_emb.0.{0,2}`; CLIP-L under
# `conditioner.embedders.0.transformer.text_model.` (transformers names); OpenCLIP-bigG under
# `conditioner.embedders.1.model.` with its `text_projection` a [hidden, projection] matrix
# (OpenCLIP computes `pooled @ text_projection`, the transpose of the Linear weight).
#
# Limits and deviations:
# - The LDM layout has no key for LCM's guidance embedding (`time_embedding.cond_proj`); it is
#   written as `model.diffusion_model.time_embedding.cond_proj.weight`, the name diffusers' own
#   `scripts/convert_diffusers_to_original_stable_diffusion.py` passes it through under.
#   diffusers' single-file loader (0.42) has no rule for it and leaves that one weight unloaded.
# - SD2 text encoder (OpenCLIP layout): real SD 2.x files carry one more resblock than the
#   diffusers encoder (SD2 uses the penultimate layer; diffusers drops resblock 23 by name);
#   here the file holds exactly the folder's layers. `text_projection` is written as the
#   identity [hidden, hidden]: diffusers reads its first dimension as the q/k/v split size and
#   drops it.
# - Only what these families use: no class embeddings, no added conditioning but SDXL's
#   `text_time`, no refiner layout (`conditioner.embedders.0.model.`), no EMA weights, none of
#   the extra tensors real files carry and the loaders ignore (noise-schedule buffers and such).
# ---------------------------------------------------------------------------------------------


UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

# Inside a U-Net ResBlock (ldm `ResBlock`: in_layers = [norm, SiLU, conv], emb_layers =
# [SiLU, linear], out_layers = [norm, SiLU, dropout, conv]).
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}
_OPENCLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}

# A prefix table maps a diffusers key prefix to (LDM prefix, renames of what follows it).
_PrefixTable = dict[str, tuple[str, dict[str, str]]]


def _unet_prefix_table(config: dict) -> _PrefixTable:
    """ldm `UNetModel` numbering: input_blocks[0] is conv_in; each down block has one
    [ResBlock, SpatialTransformer?] entry per layer plus a Downsample entry (not after the
    last); output_blocks have layers+1 entries per up block, the Upsample inside the last."""
    for name in ("class_embed_type", "encoder_hid_dim_type"):
        if config.get(name) is not None:
            raise NotImplementedError(f"save_single_file: U-Net config {name}={config[name]!r}")
    if config.get("addition_embed_type") not in (None, "text_time"):
        raise NotImplementedError(
            f"save_single_file: U-Net config addition_embed_type={config['addition_embed_type']!r}"
        )
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise NotImplementedError(f"save_single_file: mid_block_type={config['mid_block_type']!r}")
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise NotImplementedError(f"save_single_file: per-block layers_per_block={layers!r}")
    n_blocks = len(config["down_block_types"])
    table: _PrefixTable = {
        "time_embedding.linear_1.": ("time_embed.0.", {}),
        "time_embedding.linear_2.": ("time_embed.2.", {}),
        # No LDM name exists; diffusers' reverse script passes the key through unchanged.
        "time_embedding.cond_proj.": ("time_embedding.cond_proj.", {}),
        "conv_in.": ("input_blocks.0.0.", {}),
        "conv_norm_out.": ("out.0.", {}),
        "conv_out.": ("out.2.", {}),
        "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET),
        "mid_block.attentions.0.": ("middle_block.1.", {}),
        "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET),
    }
    if config.get("addition_embed_type") == "text_time":
        # SDXL: sgm's label_emb is Sequential(Sequential(linear, SiLU, linear)); add_time_proj
        # (sinusoidal, no weights) has no key in either layout.
        table["add_embedding.linear_1."] = ("label_emb.0.0.", {})
        table["add_embedding.linear_2."] = ("label_emb.0.2.", {})
    for b in range(n_blocks):
        for i in range(layers):
            entry = 1 + b * (layers + 1) + i
            table[f"down_blocks.{b}.resnets.{i}."] = (f"input_blocks.{entry}.0.", _UNET_RESNET)
            table[f"down_blocks.{b}.attentions.{i}."] = (f"input_blocks.{entry}.1.", {})
        if b < n_blocks - 1:
            entry = (b + 1) * (layers + 1)
            table[f"down_blocks.{b}.downsamplers.0.conv."] = (f"input_blocks.{entry}.0.op.", {})
    for b, block_type in enumerate(config["up_block_types"]):
        for i in range(layers + 1):
            entry = b * (layers + 1) + i
            table[f"up_blocks.{b}.resnets.{i}."] = (f"output_blocks.{entry}.0.", _UNET_RESNET)
            table[f"up_blocks.{b}.attentions.{i}."] = (f"output_blocks.{entry}.1.", {})
        if b < n_blocks - 1:
            entry = b * (layers + 1) + layers
            slot = 2 if block_type.startswith("CrossAttn") else 1
            table[f"up_blocks.{b}.upsamplers.0.conv."] = (f"output_blocks.{entry}.{slot}.conv.", {})
    return table


def _vae_prefix_table(config: dict) -> _PrefixTable:
    """ldm `Encoder`/`Decoder`: down[i].block[j], mid.block_1/attn_1/block_2, norm_out; the
    decoder's up[] counts from the lowest resolution's opposite end (up[0] is the last)."""
    n_blocks = len(config["block_out_channels"])
    table: _PrefixTable = {}
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", {})
        table[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", _VAE_RESNET)
        table[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", _VAE_RESNET)
        table[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION)
    for i in range(n_blocks):
        table[f"encoder.down_blocks.{i}.resnets."] = (f"encoder.down.{i}.block.", _VAE_RESNET)
        table[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", {})
        up = n_blocks - 1 - i
        table[f"decoder.up_blocks.{i}.resnets."] = (f"decoder.up.{up}.block.", _VAE_RESNET)
        table[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{up}.upsample.", {})
    for same in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out."):
        table[same] = (same, {})
    table["quant_conv."] = ("quant_conv.", {})
    table["post_quant_conv."] = ("post_quant_conv.", {})
    return table


def _longest_prefix(key: str, prefixes) -> str | None:
    matches = [p for p in prefixes if key.startswith(p)]
    return max(matches, key=len) if matches else None


def _rename(key: str, table: _PrefixTable, component: str) -> str:
    prefix = _longest_prefix(key, table)
    if prefix is None:
        raise NotImplementedError(
            f"save_single_file: no original-layout name for {component} key {key!r}"
        )
    new_prefix, inner = table[prefix]
    rest = key[len(prefix) :]
    inner_prefix = _longest_prefix(rest, inner)
    if inner_prefix is not None:
        rest = inner[inner_prefix] + rest[len(inner_prefix) :]
    return new_prefix + rest


def _unet_to_ldm(state_dict, config: dict) -> dict:
    table = _unet_prefix_table(config)
    return {UNET_PREFIX + _rename(k, table, "unet"): v for k, v in state_dict.items()}


def _vae_to_ldm(state_dict, config: dict) -> dict:
    table = _vae_prefix_table(config)
    out = {}
    for key, value in state_dict.items():
        new_key = _rename(key, table, "vae")
        if ".mid.attn_1." in new_key and value.ndim == 2:
            value = value[:, :, None, None]  # the LDM VAE attention uses 1x1 convs: [C, C, 1, 1]
        out[VAE_PREFIX + new_key] = value
    return out


def _clip_to_ldm(state_dict, prefix: str = CLIP_PREFIX) -> dict:
    from fewstep.export.testing import text_encoder_state

    return {prefix + k: v for k, v in text_encoder_state(state_dict).items()}


def _openclip_to_ldm(state_dict, config: dict, prefix: str = OPENCLIP_PREFIX) -> dict:
    """OpenCLIP `TextTransformer`: resblocks with a fused in_proj (q; k; v rows), c_fc/c_proj.

    A CLIPTextModelWithProjection's `text_projection.weight` [projection, hidden] becomes
    OpenCLIP's `text_projection` [hidden, projection]; without one (SD2) it is the identity.
    """
    import torch

    from fewstep.export.testing import text_encoder_state

    state = text_encoder_state(state_dict)
    projection = state.pop("text_projection.weight", None)
    out = {}
    for i in range(config["num_hidden_layers"]):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)  # [3 * hidden, ...]
        for key in [k for k in state if k.startswith(src)]:
            rest = key[len(src) :]
            inner = _longest_prefix(rest, _OPENCLIP_LAYER)
            if inner is None:
                raise NotImplementedError(
                    f"save_single_file: no OpenCLIP name for text_encoder key {key!r}"
                )
            out[dst + _OPENCLIP_LAYER[inner] + rest[len(inner) :]] = state.pop(key)
    for key in list(state):
        if key not in _OPENCLIP_TOP:
            raise NotImplementedError(
                f"save_single_file: no OpenCLIP name for text_encoder key {key!r}"
            )
        out[prefix + _OPENCLIP_TOP[key]] = state.pop(key)
    if projection is None:
        projection = torch.eye(config["hidden_size"], dtype=torch.float32)
    out[prefix + "text_projection"] = projection.T.contiguous()
    return out


def _load_component(folder: pathlib.Path, name: str, weights: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    config = json.loads((folder / name / "config.json").read_text())
    path = folder / name / weights
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (save_single_file reads fp32 safetensors)")
    return config, load_file(str(path))


def _save_single_file(
    diffusers_folder: str | os.PathLike, out_path: str | os.PathLike
) -> pathlib.Path:
    """Write a diffusers SD or SDXL folder as one `.safetensors` checkpoint in the original
    layout.

    U-Net under `model.diffusion_model.`, VAE under `first_stage_model.`, the text encoder under
    `cond_stage_model.transformer.text_model.` (OpenAI CLIP, SD1) or `cond_stage_model.model.`
    (OpenCLIP, SD2: chosen when the text encoder's hidden_act is "gelu", as in SD 2.x). SDXL
    (a U-Net with addition_embed_type "text_time"): the two encoders under
    `conditioner.embedders.0.transformer.text_model.` and `conditioner.embedders.1.model.`.
    Load it back with `StableDiffusionPipeline.from_single_file(out_path,
    config=diffusers_folder, local_files_only=True)` (`StableDiffusionXLPipeline` for SDXL).
    """
    from fewstep.export.testing import save_safetensors

    folder = pathlib.Path(diffusers_folder)
    out = pathlib.Path(out_path)
    if out.suffix != ".safetensors":
        raise ValueError(f"out_path must end in .safetensors, got {str(out)!r}")
    unet_config, unet = _load_component(folder, "unet", "diffusion_pytorch_model.safetensors")
    vae_config, vae = _load_component(folder, "vae", "diffusion_pytorch_model.safetensors")
    te_config, text_encoder = _load_component(folder, "text_encoder", "model.safetensors")

    state = {}
    state.update(_unet_to_ldm(unet, unet_config))
    state.update(_vae_to_ldm(vae, vae_config))
    if unet_config.get("addition_embed_type") == "text_time":
        te2_config, text_encoder_2 = _load_component(folder, "text_encoder_2", "model.safetensors")
        state.update(_clip_to_ldm(text_encoder, SDXL_CLIP_PREFIX))
        state.update(_openclip_to_ldm(text_encoder_2, te2_config, SDXL_OPENCLIP_PREFIX))
    elif te_config.get("hidden_act") == "gelu":
        state.update(_openclip_to_ldm(text_encoder, te_config))
    else:
        state.update(_clip_to_ldm(text_encoder))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out)
    return out


@pytest.fixture(scope="session")
def save_single_file():
    """(diffusers_folder, out_path) -> out_path: the folder as one original-layout
    `.safetensors` checkpoint (see `_save_single_file`)."""
    return _save_single_file


@pytest.fixture(scope="session")
def to_ldm():
    """component ("unet", "vae") -> (state_dict, config) -> the state under LDM keys, so a test
    can check the key tables on models other than the tiny ones."""
    return {"unet": _unet_to_ldm, "vae": _vae_to_ldm}


# In CI every extra is installed, so a test skipped for a missing import means the install is
# broken: there it fails instead (pytest.importorskip's reason starts "could not import").
def _missing_import(report) -> bool:
    return (
        bool(os.environ.get("CI")) and report.skipped and "could not import" in str(report.longrepr)
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _missing_import(report):
        report.outcome = "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _missing_import(report):
        report.outcome = "failed"


# ---------------------------------------------------------------------------------------------
# `gpu` tests run where torch sees a CUDA GPU and are deselected elsewhere; asked for by name
# (`-m gpu`) on a machine without one, they are skipped with the reason instead.
# ---------------------------------------------------------------------------------------------


def _torch_sees_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items or _torch_sees_cuda():
        return
    if "gpu" in (config.option.markexpr or ""):
        no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none")
        for item in gpu_items:
            item.add_marker(no_gpu)
        return
    items[:] = [item for item in items if not item.get_closest_marker("gpu")]
    config.hook.pytest_deselected(items=gpu_items)


# ---------------------------------------------------------------------------------------------
# Pipelines against diffusers: the same weights, latents and noise on both sides
#
# Reference: diffusers' StableDiffusionPipeline (DDIM, Euler, Euler-ancestral schedulers) and
# LatentConsistencyModelPipeline in torch fp32 on the tiny random-weight models.
# ---------------------------------------------------------------------------------------------

IMAGE_TOLERANCE = 1e-3  # max abs difference on a 0..1 scale
DIFFUSERS_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "lcm": "LCMScheduler",
}


@dataclasses.dataclass(frozen=True)
class ParityCase:
    """One call, made the same way to fewstep and to diffusers."""

    id: str
    family: str
    sampler: str
    guidance_scale: float
    prompts: tuple[str, ...]
    per_prompt: int
    height: int
    width: int
    eta: float
    steps: int


# (id, family, sampler, guidance_scale, prompts, num_images_per_prompt, height, width, eta, steps)
PARITY_CASES = {
    case.id: case
    for case in (
        ParityCase("sd1-ddim-cfg-b1-square", "sd1", "ddim", 7.5, ("a red cat",), 1, 64, 64, 0.0, 4),
        ParityCase(
            "sd1-ddim-nocfg-b2-wide", "sd1", "ddim", 1.0, ("a red cat", "a dog"), 1, 64, 96, 0.0, 3
        ),
        ParityCase(
            "sd1-ddim-eta-cfg-n2-tall", "sd1", "ddim", 5.0, ("a blue circle",), 2, 96, 64, 0.7, 3
        ),
        ParityCase(
            "sd1-euler-cfg-b1-wide", "sd1", "euler", 7.5, ("a green square",), 1, 64, 96, 0.0, 4
        ),
        ParityCase(
            "sd1-eulera-cfg-b2", "sd1", "euler_ancestral", 7.5, ("a cat", "a dog"),
            1, 64, 64, 0.0, 4,
        ),
        ParityCase(
            "sd2-vpred-ddim-cfg-b1", "sd2", "ddim", 7.5, ("a photo of a cat",), 1, 64, 64, 0.0, 4
        ),
        ParityCase(
            "sd2-vpred-euler-nocfg-n2-wide", "sd2", "euler", 1.0, ("a photo of a dog",),
            2, 64, 96, 0.0, 2,
        ),
        ParityCase(
            "turbo-eulera-1step", "turbo", "euler_ancestral", 0.0, ("a red circle",),
            1, 64, 64, 0.0, 1,
        ),
        ParityCase(
            "turbo-eulera-cfg-b2-tall", "turbo", "euler_ancestral", 2.0, ("a cat", "a dog"),
            1, 96, 64, 0.0, 4,
        ),
        ParityCase("turbo-euler-n2", "turbo", "euler", 0.0, ("a blue square",), 2, 64, 64, 0.0, 2),
        ParityCase("lcm-w8.5-b1", "lcm", "lcm", 8.5, ("a red cat",), 1, 64, 64, 0.0, 4),
        ParityCase("lcm-w1-b2-wide", "lcm", "lcm", 1.0, ("a cat", "a dog"), 1, 64, 96, 0.0, 2),
        ParityCase("lcm-1step-n2", "lcm", "lcm", 3.0, ("a green circle",), 2, 64, 64, 0.0, 1),
    )
}  # fmt: skip


def parity_call(case, scale: int, seed: int) -> tuple[np.ndarray, dict]:
    """The starting latents (numpy, from `seed`) and the keyword arguments every pipeline of
    a parity case gets: `case` has prompts, per_prompt, steps, guidance_scale, height, width;
    `scale` is the VAE's downsampling."""
    batch = len(case.prompts) * case.per_prompt
    shape = (batch, 4, case.height // scale, case.width // scale)
    latents = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return latents, dict(
        num_inference_steps=case.steps,
        guidance_scale=case.guidance_scale,
        height=case.height,
        width=case.width,
        num_images_per_prompt=case.per_prompt,
        output_type="np",
    )


class TorchNoise:
    """Draws from a torch.Generator, so fewstep and diffusers see the same noise."""

    def __init__(self, seed: int):
        import torch

        self._torch = torch
        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, size, dtype=np.float32):
        torch = self._torch
        return torch.randn(size, generator=self.generator, dtype=torch.float32).numpy()


def max_error(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got − expected|, once the shapes agree and the reference is not flat."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert float(expected.std()) > 1e-3, "reference image is flat: the test would prove nothing"
    return float(np.abs(got - expected).max())


class DiffusersParity:
    """What the parity tests share: the tolerance, diffusers' reference pipelines, the noise a
    torch.Generator draws, and one `ParityCase` run through a fewstep pipeline and diffusers."""

    tolerance = IMAGE_TOLERANCE
    noise = TorchNoise

    def __init__(self, tiny_model):
        self._tiny_model = tiny_model

    def load_diffusers(self, folder, family: str, sampler: str):
        """diffusers' pipeline of a diffusers folder, with the named scheduler."""
        import diffusers

        cls = diffusers.StableDiffusionPipeline
        if family == "lcm":
            cls = diffusers.LatentConsistencyModelPipeline
        pipe = cls.from_pretrained(folder, safety_checker=None)
        scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[sampler])
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    max_error = staticmethod(max_error)

    def run_case(self, ours, case: ParityCase) -> tuple[np.ndarray, np.ndarray]:
        """(fewstep's images, diffusers' images) of `case` on its family's tiny model, from the
        same latents and the same noise; `ours` is a fewstep Pipeline of that model."""
        import torch

        latents, common = parity_call(case, ours.info.vae_scale_factor, seed=7)
        prompts = list(case.prompts)
        negative = None if case.family == "lcm" else ["ugly"] * len(prompts)
        reference = dict(
            common,
            latents=torch.from_numpy(latents.copy()),
            generator=torch.Generator().manual_seed(11),
        )
        if case.family != "lcm":  # diffusers' LCM pipeline takes neither
            reference.update(negative_prompt=negative, eta=case.eta)
        folder = self._tiny_model(case.family)
        expected = self.load_diffusers(folder, case.family, case.sampler)(prompts, **reference)
        got = ours(
            prompts,
            negative_prompt=negative,
            latents=latents,
            generator=TorchNoise(11),
            eta=case.eta,
            scheduler=case.sampler,
            **common,
        )
        assert got.images.shape == (len(latents), case.height, case.width, 3)
        return got.images, expected.images


@pytest.fixture(scope="session")
def parity(tiny_model):
    """The `DiffusersParity` helpers (skips without torch or diffusers)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    return DiffusersParity(tiny_model)


@pytest.fixture(params=list(PARITY_CASES))
def parity_case(request) -> ParityCase:
    """Each `ParityCase`; a test narrows them with
    `@pytest.mark.parametrize("parity_case", [ids], indirect=True)`."""
    return PARITY_CASES[request.param]


# ---------------------------------------------------------------------------------------------
# SDXL: the tiny SDXL package, its SDXL-Turbo twin, their pipelines and diffusers' references
#
# Built once per session and shared by the SDXL test modules (test_sdxl, test_sdxl_torch,
# test_img2img_sdxl, test_optimum_sdxl). Tests only read them: one that changes a package
# works on a copy, and one that patches a pipeline does it through monkeypatch, which undoes it.
# The parity cases and their runner: sdxl_parity.py.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sdxl_package(tiny_package):
    """The tiny SDXL model's fp32 package."""
    return tiny_package("sdxl")


@pytest.fixture(scope="session")
def turbo_package(tiny_model, sdxl_package, tmp_path_factory):
    """The SDXL package with SDXL-Turbo's scheduler config and a manifest rewritten for it
    (the tiny SDXL and SDXL-Turbo models share their weights: checked here)."""
    import shutil

    from fewstep.package import read_manifest, read_model_info, write_manifest

    sdxl, turbo = tiny_model("sdxl"), tiny_model("sdxl_turbo")
    for weights in sorted(sdxl.rglob("*.safetensors")):
        other = turbo / weights.relative_to(sdxl)
        assert weights.read_bytes() == other.read_bytes(), f"{other} differs from the sdxl model"
    out = tmp_path_factory.mktemp("sdxl-turbo-pkg") / "package"
    shutil.copytree(sdxl_package, out)
    config = turbo / "scheduler" / "scheduler_config.json"
    shutil.copyfile(config, out / "scheduler" / "scheduler_config.json")
    manifest = read_manifest(out)
    info = read_model_info(out)
    manifest.update(
        default_num_inference_steps=info.default_num_inference_steps,
        default_guidance_scale=info.default_guidance_scale,
    )
    write_manifest(out, {k: v for k, v in manifest.items() if k not in ("files",)})
    return out


@pytest.fixture(scope="session")
def package_pipelines():
    """(package path, backend="onnxruntime") -> its Pipeline, built once per session."""
    from fewstep.pipeline import Pipeline

    cache: dict[tuple[pathlib.Path, str], Pipeline] = {}

    def get(package: pathlib.Path, backend: str = "onnxruntime") -> Pipeline:
        if (package, backend) not in cache:
            cache[package, backend] = Pipeline.from_pretrained(package, backend=backend)
        return cache[package, backend]

    return get


@pytest.fixture(scope="session")
def sdxl_references(tiny_model):
    """(family, sampler or None for the folder's own) -> diffusers' StableDiffusionXLPipeline
    of the tiny folder with that scheduler (skips without torch or diffusers)."""
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from sdxl_parity import SCHEDULERS

    cache: dict[tuple[str, str | None], object] = {}

    def get(family: str, sampler: str | None):
        if (family, sampler) not in cache:
            pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
                tiny_model(family), add_watermarker=False
            )
            if sampler is not None:
                pipe.scheduler = SCHEDULERS[sampler].from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            cache[family, sampler] = pipe
        return cache[family, sampler]

    return get


# ---------------------------------------------------------------------------------------------
# fewstep.kernels against fp64 references
#
# Accuracy rule: with ref64 the fp64 computation on the same (exactly upcast) inputs, a kernel
# (or a patched module) passes when
#     max|kernel − ref64| <= 2 · max|torch_same_precision − ref64| + floor(dtype)
# where torch_same_precision is the plain torch op (module) run in the kernel's dtype.
# ---------------------------------------------------------------------------------------------


def _rounding_floor(dtype, ref64) -> float:
    """One rounding step of `dtype` at the output's largest magnitude: eps · max|ref64|.

    Kernel and torch each round their fp32 result to `dtype` once (torch's GroupNorm+SiLU
    twice). Two implementations that both round correctly can still land one representable
    value apart where the fp32 results straddle a rounding boundary, and near max|ref64| that
    spacing is up to eps·max|ref64|. When torch's own error happens to be small, 2·err_torch
    alone would demand better than one rounding; the floor allows that one step and nothing
    more (fp32 ≈ 1.2e-7, fp16 ≈ 9.8e-4, bf16 ≈ 7.8e-3, relative to max|ref64|).
    """
    import torch

    finite = ref64[torch.isfinite(ref64)]
    return torch.finfo(dtype).eps * (float(finite.abs().max()) if finite.numel() else 0.0)


def _assert_matches_ref(got, torch_out, ref64, what: str) -> tuple[float, float]:
    """The accuracy rule above; NaN in ref64 must be NaN in got, NaN elsewhere fails.

    Returns (kernel error, torch error). On failure, lists the first mismatches.
    """
    import torch

    assert got.shape == ref64.shape and got.dtype == torch_out.dtype, what
    got64 = got.double()
    ref_nan = torch.isnan(ref64)
    err_torch_all = (torch_out.double() - ref64).abs()
    err_torch = float(err_torch_all[~ref_nan].max()) if (~ref_nan).any() else 0.0
    tol = 2 * err_torch + _rounding_floor(got.dtype, ref64)
    err = (got64 - ref64).abs()
    # `~(err <= tol)` is True for NaN errors, so a NaN where ref64 is finite fails.
    bad = torch.where(ref_nan, ~torch.isnan(got64), ~(err <= tol))
    err_kernel = float(err[~ref_nan].max()) if (~ref_nan).any() else 0.0
    print(f"{what}: kernel err {err_kernel:.3g}, torch err {err_torch:.3g}, tol {tol:.3g}")
    if bad.any():
        idx = bad.nonzero()[:5]
        lines = [
            f"  {tuple(i.tolist())}: got {got64[tuple(i)].item():.8g}, "
            f"expected {ref64[tuple(i)].item():.8g} (torch {torch_out[tuple(i)].item():.8g})"
            for i in idx
        ]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off; kernel err "
            f"{err_kernel:.3g} > tol {tol:.3g} (2 × torch err {err_torch:.3g} + floor); "
            "first mismatches (index, got, expected):\n" + "\n".join(lines)
        )
    return err_kernel, err_torch


@pytest.fixture(scope="session")
def assert_matches_ref():
    """(got, torch_out, ref64, what) -> (kernel error, torch error): the accuracy rule above."""
    return _assert_matches_ref


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts of Triton launches (not fallbacks) through fewstep.kernels.ops, and of GroupNorm
    launches with an input bias (a time embedding added inside the kernel)."""
    import fewstep.kernels.ops as kernel_ops

    calls = {"group_norm": 0, "attention": 0, "geglu": 0, "layer_norm": 0}
    for name in list(calls):
        launcher = getattr(kernel_ops, name)

        def counted(*args, _name=name, _launcher=launcher, **kwargs):
            calls[_name] += 1
            if kwargs.get("input_bias") is not None:
                calls["input_bias"] = calls.get("input_bias", 0) + 1
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(kernel_ops, name, counted)
    return calls


@pytest.fixture
def one_torch_thread():
    """torch on one CPU thread for the test: its thread pool spins against the other processes
    on a small shared machine (a tiny U-Net step takes 1 s with 2 threads, 10 ms with 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyModules:
    """The tiny models' diffusers modules, loaded and run the way the kernel tests need."""

    def __init__(self, tiny_model):
        self._tiny_model = tiny_model

    def load(self, family: str, component: str, dtype=None):
        """The family's "unet" or "vae" in eval mode without gradients (fp32 by default)."""
        import diffusers
        import torch

        from fewstep.backends.torch_backend import diffusers_dtype_kwargs

        cls = diffusers.UNet2DConditionModel if component == "unet" else diffusers.AutoencoderKL
        kwargs = diffusers_dtype_kwargs(dtype or torch.float32)
        module = cls.from_pretrained(self._tiny_model(family) / component, **kwargs)
        return module.eval().requires_grad_(False)

    @staticmethod
    def unet_inputs(module, batch: int, dtype):
        """(sample [batch, C, 8, 8], timestep, encoder states [batch, 77, D]), seeded."""
        import torch

        gen = torch.Generator().manual_seed(0)
        cfg = module.config
        sample = torch.randn(batch, cfg.in_channels, 8, 8, generator=gen)
        hidden = torch.randn(batch, 77, cfg.cross_attention_dim, generator=gen)
        return sample.to(dtype), torch.tensor(421.0), hidden.to(dtype)

    @staticmethod
    def run_unet(module, inputs):
        import torch

        sample, t, hidden = inputs
        with torch.inference_mode():
            return module(sample, t, hidden, return_dict=False)[0]


@pytest.fixture(scope="session")
def tiny_modules(tiny_model):
    """The `TinyModules` helpers (skips without torch or diffusers)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    return TinyModules(tiny_model)


@pytest.fixture(scope="session")
def pipe():
    """The bundled default model's pipeline (onnxruntime), shared by every module using it."""
    from fewstep.package import default_model
    from fewstep.pipeline import Pipeline

    return Pipeline.from_pretrained(default_model())
