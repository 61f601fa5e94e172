"""The model package: a folder in optimum's ONNX Stable Diffusion layout plus `fewstep.json`.

Layout (docs/architecture.md#the-model-package):

    model_index.json                 from the source model
    scheduler/scheduler_config.json
    tokenizer/                       vocab.json + merges.txt (+ tokenizer.json)
    text_encoder/model.onnx (+ config.json)
    tokenizer_2/, text_encoder_2/    SDXL only (+ model.onnx_data past 2 GiB)
    unet/model.onnx (+ model.onnx_data, config.json)
                                     or, quantized to int8 by `fewstep quantize`,
                                     unet/openvino_model.xml + .bin (OpenVINO only)
    vae_decoder/model.onnx (+ config.json)
    vae_encoder/model.onnx (+ config.json)
    fewstep.json                     the manifest (optional: optimum packages have none)

A package can also be its diffusers folder (fewstep.export.shared_weights): the graphs sit in
the component folders and read their weights from the safetensors files there.

The VAE graphs are an AutoencoderKL's or, exported with a tiny autoencoder (diffusers'
`AutoencoderTiny`: TAESD, TAESDXL), that one's; `vae_decoder/config.json`'s `_class_name`
says which (`ModelInfo.vae_class`), and a tiny VAE's encoder outputs its latents (`latents`)
rather than a distribution. A tiny VAE's folder comes from strangers like every input:
`check_tiny_vae_folder` checks its config and weights before anything loads it.

Everything the runtime needs is derived from the component configs, so packages
written by optimum load too; the manifest adds file hashes, export errors and
versions, and is checked when present.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST_NAME = "fewstep.json"
MANIFEST_VERSION = 1
FAMILIES = ("sd1", "sd2", "sdxl")
PRECISIONS = ("fp32", "fp16")
ONNX_GRAPH = "model.onnx"
# An OpenVINO IR graph (+ openvino_model.bin): what `fewstep quantize` writes for an int8 U-Net,
# a format only the openvino backend runs (docs/architecture.md#int8-packages).
OPENVINO_GRAPH = "openvino_model.xml"
GRAPH_NAMES = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
REQUIRED_GRAPHS = ("text_encoder", "unet", "vae_decoder")  # and text_encoder_2 for SDXL
SDXL_TIME_IDS = 6  # SDXL's size conditioning: original size, crop top-left, target size
# The default model, trained by training/ and installed with fewstep: one folder that is both
# its diffusers folder and its model package (fewstep.export.shared_weights).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "scenes"
WEIGHT_SUFFIXES = (".onnx", ".onnx_data", ".safetensors", ".bin")
# Bounds on config values, far past any SD-family model, so a config cannot ask for absurd work.
MAX_BLOCKS = 8
MAX_CHANNELS = 65_536
MAX_LATENT_SIZE = 4096
MAX_JSON_BYTES = 64 << 20  # CLIP's tokenizer.json is 2 MB; configs are a few kB
# The VAE classes a package's vae_decoder/config.json may name (absent: AutoencoderKL).
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
TINY_VAE_CLASS = "AutoencoderTiny"
TINY_VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
# diffusers' get_activation names, and nn.Upsample modes that export to ONNX as diffusers runs them
TINY_VAE_ACTIVATIONS = ("relu", "silu", "swish", "gelu", "mish")
TINY_VAE_UPSAMPLE = ("nearest", "bilinear")
MAX_TINY_VAE_LAYERS = 64  # blocks per stage (TAESD: 3)


class PackageError(ValueError):
    """A model package is missing a file, or a file does not match the manifest."""


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def check_file_size(path: Path, max_bytes: int = MAX_JSON_BYTES) -> None:
    """PackageError naming a package's text file that is larger than any real one."""
    size = path.stat().st_size
    if size > max_bytes:
        raise PackageError(f"package file {path} is {size} bytes, more than {max_bytes} allowed")


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A package's JSON object file; PackageError naming it when missing, too large or corrupt."""
    if not path.is_file():
        raise PackageError(f"missing package file: {path}")
    check_file_size(path, max_bytes)
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PackageError(f"corrupt package file {path}: {e}") from e
    if not isinstance(data, dict):
        raise PackageError(f"corrupt package file {path}: expected a JSON object")
    return data


def default_model() -> Path:
    """The folder of the default model: both its model package and its diffusers folder.

    A small LCM model of procedural scenes ("a red circle on a blue background"), 64x64
    images in 4 steps; `fewstep generate` uses it when no --model is given.
    """
    path = DEFAULT_MODEL_DIR
    if not (path / "model_index.json").is_file():
        raise PackageError(f"the default model is not installed: {path} is missing")
    return path


def weight_bytes(root: str | Path) -> int:
    """Bytes of the weight files (graphs, external data, safetensors) under `root`."""
    return sum(
        p.stat().st_size
        for p in Path(root).rglob("*")
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES
    )


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about a model, read from its configs."""

    family: str  # sd1 | sd2 | sdxl
    prediction_type: str  # epsilon | v_prediction | sample
    latent_channels: int
    vae_scale_factor: int  # image pixels per latent pixel
    vae_scaling_factor: float  # latents = vae_scaling_factor * encoder mean
    default_height: int
    default_width: int
    guidance_embedding_dim: int | None  # LCM's time_cond_proj_dim; no CFG batch when set
    scheduler_class: str
    scheduler_config: dict[str, Any]
    default_num_inference_steps: int
    default_guidance_scale: float
    tokenizer_max_length: int = 77
    size_multiple: int = 8  # height and width must be multiples: VAE × U-Net downsampling
    vae_class: str = "AutoencoderKL"  # one of VAE_CLASSES: how to read the VAE encoder


def default_generation_settings(
    scheduler_config: dict[str, Any], guidance_embedding_dim: int | None, family: str = "sd1"
) -> tuple[int, float]:
    """(num_inference_steps, guidance_scale) users of each family expect
    (docs/reference.md#model-families)."""
    cls = scheduler_config.get("_class_name", "")
    if cls == "LCMScheduler" or guidance_embedding_dim:
        return 4, 8.5
    if cls.startswith("Euler") and scheduler_config.get("timestep_spacing") == "trailing":
        return 1, 0.0  # ADD-distilled (SD-Turbo, SDXL-Turbo): 1-4 steps, no CFG
    return 50, 5.0 if family == "sdxl" else 7.5  # diffusers' SDXL pipeline guides at 5


def family_from_configs(unet_config: dict[str, Any]) -> str:
    cross_dim = unet_config.get("cross_attention_dim", 768)
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("use_linear_projection") or isinstance(
        unet_config.get("attention_head_dim"), (list, tuple)
    ):
        return "sd2"
    return "sd1" if cross_dim != 1024 else "sd2"


def _config_int(cfg: dict[str, Any], key: str, default: int, path: Path, high: int) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise PackageError(f"{path}: {key} must be an integer between 1 and {high}, got {value!r}")
    return value


def _config_list(cfg: dict[str, Any], key: str, default: list[Any], path: Path) -> list[Any]:
    value = cfg.get(key, default)
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_BLOCKS:
        raise PackageError(
            f"{path}: {key} must be a list of 1 to {MAX_BLOCKS} entries, got {value!r:.80}"
        )
    return value


def _scheduler_check(sched_cfg: dict[str, Any], path: Path) -> str:
    """The scheduler class name, after building its noise schedule once (bad betas, types)."""
    from fewstep.samplers.base import SchedulerConfig, alphas_cumprod

    cls = sched_cfg.get("_class_name", "DDIMScheduler")
    if not isinstance(cls, str):
        raise PackageError(f"{path}: _class_name must be a string, got {cls!r:.80}")
    try:
        alphas_cumprod(SchedulerConfig.from_dict(sched_cfg))
    except (ValueError, TypeError) as e:
        raise PackageError(f"{path}: {e}") from e
    return cls


def read_model_info(root: str | Path, vae: str | Path | None = None) -> ModelInfo:
    """Derive ModelInfo from a package's (or a diffusers folder's) component configs.

    vae: a tiny autoencoder folder (diffusers' AutoencoderTiny) that replaces the folder's own
    VAE, checked by `check_tiny_vae_folder` against the U-Net's latent channels and the own
    VAE's scale. Every value used is checked: a PackageError names the file and the key.
    """
    root = Path(root)
    unet_path = root / "unet" / "config.json"
    unet_cfg = read_json(unet_path)
    vae_dir = root / "vae_decoder" if (root / "vae_decoder").is_dir() else root / "vae"
    vae_path = vae_dir / "config.json"
    vae_cfg = read_json(vae_path)
    sched_path = root / "scheduler" / "scheduler_config.json"
    sched_cfg = read_json(sched_path)
    scheduler_class = _scheduler_check(sched_cfg, sched_path)
    latent_channels = _config_int(unet_cfg, "in_channels", 4, unet_path, MAX_CHANNELS)
    vae_class = _vae_class(vae_cfg, vae_path)
    vae_scale = 2 ** (len(_vae_blocks(vae_cfg, vae_class, vae_path)) - 1)
    if vae is not None:
        vae_path = Path(vae) / "config.json"
        vae_cfg = check_tiny_vae_folder(vae, latent_channels, vae_scale)
        vae_class = TINY_VAE_CLASS
    elif vae_class == TINY_VAE_CLASS:
        check_tiny_vae_config(vae_cfg, vae_path, latent_channels, None)
    vae_scale = 2 ** (len(_vae_blocks(vae_cfg, vae_class, vae_path)) - 1)
    unet_blocks = _config_list(unet_cfg, "block_out_channels", [0, 0, 0, 0], unet_path)
    sample_size = unet_cfg.get("sample_size", 64)
    sizes = sample_size if isinstance(sample_size, list) else [sample_size] * 2
    if len(sizes) != 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_LATENT_SIZE for s in sizes
    ):
        raise PackageError(
            f"{unet_path}: sample_size must be an integer or two, between 1 and "
            f"{MAX_LATENT_SIZE}, got {sample_size!r:.80}"
        )
    height, width = (s * vae_scale for s in sizes)
    guidance_dim = unet_cfg.get("time_cond_proj_dim")
    if guidance_dim is not None:
        guidance_dim = _config_int(unet_cfg, "time_cond_proj_dim", 0, unet_path, MAX_CHANNELS)
    prediction = sched_cfg.get("prediction_type", "epsilon")
    family = family_from_configs(unet_cfg)
    steps, guidance = default_generation_settings(sched_cfg, guidance_dim, family)
    return ModelInfo(
        family=family,
        prediction_type=prediction,
        latent_channels=latent_channels,
        vae_scale_factor=vae_scale,
        vae_scaling_factor=_vae_scaling_factor(vae_cfg, vae_class, vae_path),
        default_height=height,
        default_width=width,
        guidance_embedding_dim=guidance_dim,
        scheduler_class=scheduler_class,
        scheduler_config=sched_cfg,
        default_num_inference_steps=steps,
        default_guidance_scale=guidance,
        # each U-Net block but the last halves the latent's size
        size_multiple=vae_scale * 2 ** (len(unet_blocks) - 1),
        vae_class=vae_class,
    )


def _vae_class(cfg: dict[str, Any], path: Path) -> str:
    value = cfg.get("_class_name", VAE_CLASSES[0])
    if value not in VAE_CLASSES:
        raise PackageError(f"{path}: _class_name must be one of {VAE_CLASSES}, got {value!r:.80}")
    return str(value)


def _vae_blocks(cfg: dict[str, Any], vae_class: str, path: Path) -> list[Any]:
    """The VAE's blocks: each but the last halves (encoder) or doubles (decoder) the size.
    AutoencoderTiny's `block_out_channels` is its decoder's, as diffusers registers it."""
    key = "decoder_block_out_channels" if vae_class == TINY_VAE_CLASS else "block_out_channels"
    return _config_list(cfg, key, [0, 0, 0, 0], path)


def _vae_scaling_factor(cfg: dict[str, Any], vae_class: str, path: Path) -> float:
    # diffusers' defaults: AutoencoderKL 0.18215; AutoencoderTiny 1.0 (TAESD's latents are
    # the U-Net's latents, unscaled)
    scaling = cfg.get("scaling_factor", 1.0 if vae_class == TINY_VAE_CLASS else 0.18215)
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not scaling > 0:
        raise PackageError(f"{path}: scaling_factor must be a number > 0, got {scaling!r}")
    return float(scaling)


def _config_choice(
    cfg: dict[str, Any], key: str, allowed: tuple[Any, ...], path: Path, default: Any = None
) -> None:
    """`key` must be one of `allowed`; absent, it is `default` (None: the first allowed)."""
    value = cfg.get(key, allowed[0] if default is None else default)
    if isinstance(value, bool) or value not in allowed:
        raise PackageError(f"{path}: {key} must be one of {allowed}, got {value!r:.80}")


def _config_ints(cfg: dict[str, Any], key: str, path: Path, low: int, high: int) -> list[int]:
    values = _config_list(cfg, key, [], path)
    if not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in values):
        raise PackageError(
            f"{path}: {key} must hold integers between {low} and {high}, got {values!r:.80}"
        )
    return values


def check_tiny_vae_config(
    cfg: dict[str, Any], path: Path, latent_channels: int, scale: int | None
) -> None:
    """An AutoencoderTiny config.json, checked: every key that shapes the module or the
    pipeline's reading of it, the latent channels against the U-Net's (`latent_channels`) and,
    when given, its down/upsampling against the model's own VAE's `scale`."""
    # required: the package's vae_decoder/config.json is how the runtime knows the class
    _config_choice(cfg, "_class_name", (TINY_VAE_CLASS,), path, default="(absent)")
    _config_choice(cfg, "in_channels", (3,), path)
    _config_choice(cfg, "out_channels", (3,), path)
    _config_choice(cfg, "latent_channels", (latent_channels,), path, default=4)
    _config_choice(cfg, "act_fn", TINY_VAE_ACTIVATIONS, path)
    _config_choice(cfg, "upsample_fn", TINY_VAE_UPSAMPLE, path)
    # diffusers' pipelines take the scale as 2 ** (blocks - 1), so each step must double
    _config_choice(cfg, "upsampling_scaling_factor", (2,), path)
    stages = {}
    for side in ("encoder", "decoder"):
        channels = _config_ints(cfg, f"{side}_block_out_channels", path, 1, MAX_CHANNELS)
        blocks = _config_ints(cfg, f"num_{side}_blocks", path, 0, MAX_TINY_VAE_LAYERS)
        if len(channels) != len(blocks):
            raise PackageError(
                f"{path}: num_{side}_blocks ({blocks!r}) must have one entry per "
                f"{side}_block_out_channels entry ({channels!r})"
            )
        stages[side] = len(channels)
    expected = stages["decoder"] if scale is None else scale.bit_length()
    for side, count in stages.items():
        if count != expected:
            raise PackageError(
                f"{path}: {side}_block_out_channels has {count} entries, a scale of "
                f"{2 ** (count - 1)}; the model's VAE scales by {2 ** (expected - 1)}, so it "
                f"must have {expected}"
            )
    _vae_scaling_factor(cfg, TINY_VAE_CLASS, path)


def check_tiny_vae_folder(folder: str | Path, latent_channels: int, scale: int) -> dict[str, Any]:
    """A tiny autoencoder folder (diffusers' AutoencoderTiny: config.json +
    diffusion_pytorch_model.safetensors), checked before anything loads it; its config.

    Both files must be regular files inside the folder (links followed); pickle weights are
    refused. PackageError naming `vae`, the file and the key.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PackageError(
            f"vae must be a diffusers AutoencoderTiny folder (config.json + {TINY_VAE_WEIGHTS}), "
            f"got {str(folder)!r}: not a folder"
        )
    config_path = package_path(folder, "config.json", "vae: the config")
    weights = package_path(folder, TINY_VAE_WEIGHTS, "vae: the weights")
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        refused = f" ({pickles[0]} is a pickle, which runs code when loaded)" if pickles else ""
        raise PackageError(f"vae: missing {weights}{refused}; fewstep loads safetensors only")
    cfg = read_json(config_path)
    check_tiny_vae_config(cfg, config_path, latent_channels, scale)
    return cfg


def package_path(folder: str | Path, entry: Any, where: str) -> Path:
    """`folder / entry` for a path `entry` read from a package file (a manifest entry, an
    ONNX external data location), checked to be relative and to stay inside `folder` with
    symlinks followed, as ONNX runtimes require of external data.

    Raises PackageError naming `where` (the file and its entry) and the path given.
    """
    folder = Path(folder)
    problem = ""
    if not isinstance(entry, str) or not entry or "\0" in entry:
        problem = "is not a file path"
    elif PurePosixPath(entry).is_absolute() or PureWindowsPath(entry).anchor:
        problem = "is absolute"
    else:
        try:
            resolved, base = (folder / entry).resolve(), folder.resolve()
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
            problem = f"cannot be resolved ({e})"
        else:
            if not resolved.is_relative_to(base):
                problem = f"resolves to {resolved}, outside {base}"
    if problem:
        raise PackageError(
            f"{where} {entry!r:.200} {problem}: it must be a relative path inside {folder}"
        )
    return folder / entry


def package_files(root: Path) -> list[Path]:
    """Every file of a package that the manifest hashes (all but the manifest and engines).

    Raises PackageError for a link that leads out of the package: what it points to would
    be read, hashed and copied as a part of it.
    """
    root = Path(root)
    files = []
    for p in sorted(root.rglob("*")):  # does not descend into linked folders
        rel = p.relative_to(root)
        if rel.parts[0] == "engines":
            continue
        if p.is_symlink():
            package_path(root, rel.as_posix(), f"{root}: the link")
        if p.is_file() and p.name != MANIFEST_NAME:
            files.append(p)
    return files


def hash_package_files(root: str | Path) -> dict[str, str]:
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in package_files(root)}


def write_manifest(root: str | Path, manifest: dict[str, Any]) -> Path:
    """Write fewstep.json with the hashes of every other file in the package."""
    root = Path(root)
    data = {"manifest_version": MANIFEST_VERSION, **manifest, "files": hash_package_files(root)}
    path = root / MANIFEST_NAME
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def _absolute_or_up(rel: str) -> bool:
    """Whether a path is absolute or climbs with `..` (POSIX or Windows spelling)."""
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    return posix.is_absolute() or bool(windows.anchor) or ".." in posix.parts + windows.parts


def _check_manifest_files(files: Any, path: Path) -> None:
    """`files` must map relative paths (no `..`) to sha256 hex strings."""
    if not isinstance(files, dict):
        raise PackageError(
            f"corrupt package file {path}: 'files' must be an object of path: sha256, got "
            f"{type(files).__name__}"
        )
    for rel, digest in files.items():
        if not isinstance(digest, str):
            raise PackageError(
                f"corrupt package file {path}: files[{rel!r:.200}] must be a sha256 string, "
                f"got {digest!r:.80}"
            )
        if _absolute_or_up(rel):
            raise PackageError(
                f"corrupt package file {path}: files entry {rel!r:.200} must be a relative "
                "path inside the package"
            )


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """The package's fewstep.json (None without one), its `files` entries checked to be
    relative paths; PackageError naming the file otherwise."""
    path = Path(root) / MANIFEST_NAME
    if not (path.exists() or path.is_symlink()):
        return None
    package_path(root, MANIFEST_NAME, f"{root}: the manifest")
    manifest = read_json(path)
    _check_manifest_files(manifest.get("files", {}), path)
    return manifest


def required_graphs(root: Path) -> tuple[str, ...]:
    """The graphs a package cannot run without: REQUIRED_GRAPHS, and text_encoder_2 when its
    U-Net config says SDXL (a missing or corrupt config is reported by read_model_info)."""
    unet_config = root / "unet" / "config.json"
    if unet_config.is_file() and family_from_configs(read_json(unet_config)) == "sdxl":
        return (*REQUIRED_GRAPHS, "text_encoder_2")
    return REQUIRED_GRAPHS


def graph_file(root: str | Path, graph: str) -> Path | None:
    """The file holding `graph` of the package at `root`: its model.onnx, else its
    openvino_model.xml; None when it has neither."""
    for name in (ONNX_GRAPH, OPENVINO_GRAPH):
        path = Path(root) / graph / name
        if path.is_file():
            return path
    return None


def unet_hash(manifest: dict[str, Any] | None) -> str | None:
    """The sha256 of the U-Net's graph file as the manifest lists it (None without one)."""
    files = (manifest or {}).get("files", {})
    return files.get(f"unet/{ONNX_GRAPH}") or files.get(f"unet/{OPENVINO_GRAPH}")


def verify_package(root: str | Path, check_hashes: bool = True) -> dict[str, Any] | None:
    """Check that the graphs are there and, with a manifest, that every file is intact.

    Raises PackageError naming the first missing or corrupt file.
    """
    root = Path(root)
    if not root.is_dir():
        raise PackageError(f"model package not found: {root}")
    for name in required_graphs(root):
        if graph_file(root, name) is None:
            raise PackageError(f"missing package file: {root / name / ONNX_GRAPH}")
    package_files(root)  # no link leads out of the package
    manifest = read_manifest(root)
    if manifest is None or not check_hashes:
        return manifest
    for rel, expected in manifest.get("files", {}).items():
        path = package_path(root, rel, f"{root / MANIFEST_NAME}: files entry")
        if not path.is_file():
            raise PackageError(f"missing package file: {path}")
        if sha256_file(path) != expected:
            raise PackageError(
                f"corrupt package file: {path} (sha256 differs from {MANIFEST_NAME})"
            )
    return manifest


# What a diffusers folder needs for the backends that run its modules (torch), by component.
DIFFUSERS_FOLDER_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
)


def verify_diffusers_folder(root: str | Path) -> None:
    """Check that a diffusers folder has the configs and tokenizer the torch backend loads.

    Raises PackageError naming the first missing file; an ONNX package (no weights, only
    graphs) is named as such. The weights themselves are checked when they load.
    """
    root = Path(root)
    if not root.is_dir():
        raise PackageError(f"diffusers folder not found: {root}")
    unet_weights = [root / "unet" / f"diffusion_pytorch_model.{s}" for s in ("safetensors", "bin")]
    if (root / "unet" / "model.onnx").is_file() and not any(p.is_file() for p in unet_weights):
        raise PackageError(
            f"{root} is an ONNX model package; the torch backend runs a diffusers folder "
            "(the export's source: model_index.json, unet/, vae/, text_encoder/, tokenizer/)"
        )
    for rel in DIFFUSERS_FOLDER_FILES:
        if not (root / rel).is_file():
            raise PackageError(f"missing diffusers folder file: {root / rel}")
    tokenizer = root / "tokenizer"
    if not (
        (tokenizer / "tokenizer.json").is_file()
        or ((tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file())
    ):
        raise PackageError(
            f"missing diffusers folder file: {tokenizer}/tokenizer.json (or vocab.json + "
            "merges.txt)"
        )
