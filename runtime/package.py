"""The model package: a folder in optimum's ONNX Stable Diffusion layout plus `fewstep.json`.

Layout (see DESIGN.md):

    model_index.json                 from the source model
    scheduler/scheduler_config.json
    tokenizer/                       vocab.json + merges.txt (+ tokenizer.json)
    text_encoder/model.onnx (+ config.json)
    unet/model.onnx (+ model.onnx_data, config.json)
    vae_decoder/model.onnx (+ config.json)
    vae_encoder/model.onnx (+ config.json)
    fewstep.json                     the manifest (optional: optimum packages have none)

A package can also be its diffusers folder (fewstep.export.shared_weights): the graphs sit in
the component folders and read their weights from the safetensors files there.

Everything the runtime needs is derived from the component configs, so packages
written by optimum load too; the manifest adds file hashes, export errors and
versions, and is checked when present.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST_NAME = "fewstep.json"
MANIFEST_VERSION = 1
FAMILIES = ("sd1", "sd2", "sdxl")
PRECISIONS = ("fp32", "fp16")
GRAPH_NAMES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
REQUIRED_GRAPHS = ("text_encoder", "unet", "vae_decoder")
# The default model, trained by training/ and installed with fewstep: one folder that is both
# its diffusers folder and its model package (fewstep.export.shared_weights).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "scenes"
WEIGHT_SUFFIXES = (".onnx", ".onnx_data", ".safetensors", ".bin")


class PackageError(ValueError):
    """A model package is missing a file, or a file does not match the manifest."""


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PackageError(f"missing package file: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"corrupt package file {path}: {e}") from e
    if not isinstance(data, dict):
        raise PackageError(f"corrupt package file {path}: expected a JSON object")
    return data


def default_model(kind: str = "onnx") -> Path:
    """The folder of the default model as a model package ("onnx") or diffusers folder: the
    same folder, which is both.

    A small LCM model of the procedural scenes of `fewstep.scenes` ("a red circle on a blue
    background"), 64x64 images in 4 steps; `fewstep generate` uses it when no --model is given.
    """
    if kind not in ("onnx", "diffusers"):
        raise ValueError(f"kind must be 'onnx' or 'diffusers', got {kind!r}")
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


def default_generation_settings(
    scheduler_config: dict[str, Any], guidance_embedding_dim: int | None
) -> tuple[int, float]:
    """(num_inference_steps, guidance_scale) users of each family expect (REFERENCE.md)."""
    cls = scheduler_config.get("_class_name", "")
    if cls == "LCMScheduler" or guidance_embedding_dim:
        return 4, 8.5
    if cls.startswith("Euler") and scheduler_config.get("timestep_spacing") == "trailing":
        return 1, 0.0  # ADD-distilled (SD-Turbo, SDXL-Turbo): 1-4 steps, no CFG
    return 50, 7.5


def family_from_configs(unet_config: dict[str, Any]) -> str:
    cross_dim = unet_config.get("cross_attention_dim", 768)
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("use_linear_projection") or isinstance(
        unet_config.get("attention_head_dim"), (list, tuple)
    ):
        return "sd2"
    return "sd1" if cross_dim != 1024 else "sd2"


def read_model_info(root: str | Path) -> ModelInfo:
    """Derive ModelInfo from a package's (or a diffusers folder's) component configs."""
    root = Path(root)
    unet_cfg = read_json(root / "unet" / "config.json")
    vae_dir = root / "vae_decoder" if (root / "vae_decoder").is_dir() else root / "vae"
    vae_cfg = read_json(vae_dir / "config.json")
    sched_cfg = read_json(root / "scheduler" / "scheduler_config.json")
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample_size = unet_cfg.get("sample_size", 64)
    if isinstance(sample_size, (list, tuple)):
        height, width = (int(s) * vae_scale for s in sample_size)
    else:
        height = width = int(sample_size) * vae_scale
    guidance_dim = unet_cfg.get("time_cond_proj_dim")
    steps, guidance = default_generation_settings(sched_cfg, guidance_dim)
    return ModelInfo(
        family=family_from_configs(unet_cfg),
        prediction_type=sched_cfg.get("prediction_type", "epsilon"),
        latent_channels=int(unet_cfg.get("in_channels", 4)),
        vae_scale_factor=vae_scale,
        vae_scaling_factor=float(vae_cfg.get("scaling_factor", 0.18215)),
        default_height=height,
        default_width=width,
        guidance_embedding_dim=int(guidance_dim) if guidance_dim else None,
        scheduler_class=sched_cfg.get("_class_name", "DDIMScheduler"),
        scheduler_config=sched_cfg,
        default_num_inference_steps=steps,
        default_guidance_scale=guidance,
    )


def package_files(root: Path) -> list[Path]:
    """Every file of a package that the manifest hashes (all but the manifest and engines)."""
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] != "engines" and p.name != MANIFEST_NAME:
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


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    path = Path(root) / MANIFEST_NAME
    return read_json(path) if path.exists() else None


def verify_package(root: str | Path, check_hashes: bool = True) -> dict[str, Any] | None:
    """Check that the graphs are there and, with a manifest, that every file is intact.

    Raises PackageError naming the first missing or corrupt file.
    """
    root = Path(root)
    if not root.is_dir():
        raise PackageError(f"model package not found: {root}")
    for name in REQUIRED_GRAPHS:
        if not (root / name / "model.onnx").is_file():
            raise PackageError(f"missing package file: {root / name / 'model.onnx'}")
    manifest = read_manifest(root)
    if manifest is None or not check_hashes:
        return manifest
    for rel, expected in manifest.get("files", {}).items():
        path = root / rel
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
