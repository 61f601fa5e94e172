"""The export's input: a diffusers folder or a single-file `.safetensors` checkpoint.

`check_source` validates what the user named (cheaply, from file names, JSON configs and a
single file's safetensors header, before any weights are read); `load_source` then loads the
torch components in fp32 (three; four for SDXL).

- Pickle checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) are refused: unpickling runs code the
  file chose, and `torch.load(weights_only=True)` has had bypasses
  (docs/reference.md#known-failure-modes). Diffusers folders are loaded with
  `use_safetensors=True` for the same reason.
- Single files are converted by diffusers' own single-file loader
  (`diffusers/loaders/single_file_utils.py`), offline: `config=` must be a local diffusers
  folder that provides the component configs, the tokenizer(s) and the scheduler (weights
  there are not read). The file's key names must be the config's family: SD 1.x/2.x hold
  the text encoder under `cond_stage_model.`; SDXL (Stability's layout, as
  `sd_xl_base_1.0.safetensors` and sdxl-turbo ship it) holds CLIP-L under
  `conditioner.embedders.0.transformer.` and OpenCLIP-bigG under
  `conditioner.embedders.1.model.`, whose widths and the U-Net's `label_emb` input width
  must be the config's (`SDXL_SINGLE_FILE_WIDTHS`). A mismatch is a ValueError naming the
  key; an SDXL refiner file (OpenCLIP alone, under `conditioner.embedders.0.model.`) is a
  NotImplementedError. A file lacking tensors the config's model has fails while loading,
  as a ValueError naming the file (diffusers does not say which).
- Families: SD 1.x, SD 2.x and their few-step descendants (LCM, SD-Turbo), and SDXL (base
  and Turbo: a U-Net with `addition_embed_type="text_time"` and a second text encoder,
  `text_encoder_2/` + `tokenizer_2/`), from diffusers folders and single files.
  NotImplementedError for what is not: the SDXL refiner (no first text encoder, aesthetic
  score in `time_ids`), other added conditionings, single files of LCM U-Nets (diffusers'
  loader has no key for the guidance embedding). An SDXL folder whose widths disagree (the
  U-Net's `cross_attention_dim` against the two encoders' widths, its
  `projection_class_embeddings_input_dim` against 6 time ids and encoder 2's projection) is
  a ValueError naming the keys, since no pipeline could run it.
- model_index.json names a [library, class] per component, and diffusers imports the library
  by name: a folder that ships `evilmod.py` and names it would run it (the folder is on
  `sys.path` under `python -m`, in a notebook started there). Only `MODEL_INDEX_CLASSES` are
  accepted for the components fewstep reads, and classes are looked up on the `diffusers` and
  `transformers` modules only. Other entries (safety_checker, feature_extractor, …) are
  neither read nor imported.
- A tiny autoencoder (`vae=`: a diffusers AutoencoderTiny folder, TAESD / TAESDXL) replaces
  the source's VAE: `with_tiny_vae` checks it (`fewstep.package.check_tiny_vae_folder`: the
  config's keys against the source's latent channels and VAE scale, safetensors weights,
  paths inside the folder) before anything loads, and the source's VAE is then never loaded.
- The tokenizer may be vocab.json + merges.txt (SD 1.x repositories), tokenizer.json (what
  transformers 5 saves) or both; `read_bpe_model` reads the BPE model out of tokenizer.json.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path
from typing import Any

from fewstep.package import SDXL_TIME_IDS, TINY_VAE_CLASS, read_model_info

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors",)
# Key prefixes of the original single-file layouts (LDM for SD 1.x/2.x, Stability's sgm for
# SDXL), as diffusers' single_file_utils reads them.
SINGLE_FILE_UNET = "model.diffusion_model."
SINGLE_FILE_SD_TEXT = "cond_stage_model."
SINGLE_FILE_SDXL_TEXT = "conditioner.embedders."
SINGLE_FILE_SDXL_CLIP = "conditioner.embedders.0.transformer.text_model."
SINGLE_FILE_SDXL_OPENCLIP = "conditioner.embedders.1.model."
SINGLE_FILE_REFINER_OPENCLIP = "conditioner.embedders.0.model."
_SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors format's own limit
# SDXL single-file tensors [_, width] whose width must be the config's: (key, component,
# config field). diffusers tells the two encoders apart by their widths; the refiner's
# label_emb is narrower (an aesthetic score in place of two of the six sizes).
SDXL_SINGLE_FILE_WIDTHS = (
    (SINGLE_FILE_SDXL_CLIP + "embeddings.position_embedding.weight", "text_encoder", "hidden_size"),
    (SINGLE_FILE_SDXL_OPENCLIP + "positional_embedding", "text_encoder_2", "hidden_size"),
    (SINGLE_FILE_UNET + "label_emb.0.0.weight", "unet", "projection_class_embeddings_input_dim"),
)
SOURCE_KINDS = ("diffusers", "single_file")
# The components we export, and the default classes when model_index.json doesn't say.
COMPONENTS = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
}
# SDXL adds these (diffusers' StableDiffusionXLPipeline).
SDXL_COMPONENTS = {
    **COMPONENTS,
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
}
# Schedulers of the SD-family pipelines (diffusers' KarrasDiffusionSchedulers, LCM, TCD): only
# the package's scheduler_config.json is read, never the class, but the name must be one.
SCHEDULER_CLASSES = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler",
    "UniPCMultistepScheduler", "EDMEulerScheduler", "LCMScheduler", "TCDScheduler",
)  # fmt: skip
# model_index.json entry -> the [library, class] pairs accepted for it.
MODEL_INDEX_CLASSES: dict[str, tuple[tuple[str, str], ...]] = {
    **{name: (default,) for name, default in SDXL_COMPONENTS.items()},
    "tokenizer": (("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")),
    "tokenizer_2": (("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")),
    "scheduler": tuple(("diffusers", name) for name in SCHEDULER_CLASSES),
}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What the user pointed at, checked: where the weights are and where the metadata is."""

    path: Path
    kind: str  # one of SOURCE_KINDS
    config_dir: Path  # the diffusers folder with model_index.json, tokenizer/, scheduler/
    sdxl: bool = False  # text_encoder_2/ and tokenizer_2/ too
    vae: Path | None = None  # a tiny autoencoder folder (AutoencoderTiny) replacing the VAE

    @property
    def components(self) -> dict[str, tuple[str, str]]:
        """The torch components to load: name -> default [library, class]."""
        return SDXL_COMPONENTS if self.sdxl else COMPONENTS

    def describe(self) -> dict[str, str]:
        out = {"path": str(self.path.resolve()), "kind": self.kind}
        if self.kind == "single_file":
            out["config"] = str(self.config_dir.resolve())
        if self.vae is not None:
            out["vae"] = str(self.vae.resolve())
        return out


@dataclasses.dataclass
class SourceModel:
    """The loaded fp32 torch components plus the source's metadata."""

    spec: SourceSpec
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL, or AutoencoderTiny (`SourceSpec.vae`)
    text_encoder: Any  # transformers CLIPTextModel
    model_index: dict[str, Any]
    scheduler_config_path: Path
    tokenizer_dir: Path
    text_encoder_2: Any = None  # SDXL: transformers CLIPTextModelWithProjection
    tokenizer_2_dir: Path | None = None  # SDXL


def refuse_pickle(src: str | os.PathLike) -> None:
    """Raise before anything touches a pickle checkpoint (by name: the file need not exist)."""
    suffix = Path(src).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"src is a pickle checkpoint ({suffix}), got {str(src)!r}: loading a pickle runs "
            "code stored in the file, so fewstep refuses it. Convert it to .safetensors first "
            "with a tool you trust in a sandbox (e.g. load it there and save it with "
            "safetensors.torch.save_file), then export the .safetensors file."
        )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{what}: missing {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} is not a JSON object")
    return data


def _allowed_text(pairs: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"[{library!r}, {cls!r}]" for library, cls in pairs)


def model_index_class(model_index: dict[str, Any], name: str, what: str) -> tuple[str, str]:
    """[library, class] of component `name` in model_index.json, checked against
    MODEL_INDEX_CLASSES (the default when the entry is absent or [null, null])."""
    allowed = MODEL_INDEX_CLASSES[name]
    entry = model_index.get(name)
    if entry is None or entry == [None, None]:
        return allowed[0]
    if isinstance(entry, list) and len(entry) == 2 and tuple(entry) in allowed:
        return allowed[allowed.index(tuple(entry))]
    raise ValueError(
        f"{what}: model_index.json component {name!r} is {entry!r:.120}; fewstep "
        f"accepts {_allowed_text(allowed)} (it never imports other libraries or classes)"
    )


def has_vocab_files(tokenizer: Path) -> bool:
    return (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()


def read_bpe_model(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the BPE model in a tokenizer.json; ValueError naming the file.

    tokenizers writes merges as [a, b] pairs since 0.20 and as "a b" strings before.
    """
    data = _read_json(path, "tokenizer")
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else model
        raise ValueError(f"tokenizer: {path} must hold a BPE model (CLIP's), got {kind!r:.80}")
    vocab, raw_merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in vocab.items()
    ):
        raise ValueError(f"tokenizer: {path} model.vocab must map tokens to integer ids")
    if not isinstance(raw_merges, list):
        raise ValueError(f"tokenizer: {path} model.merges must be a list, got {raw_merges!r:.80}")
    merges = []
    for merge in raw_merges:
        pair = merge.split(" ") if isinstance(merge, str) else merge
        # merges.txt separates the two by a space, one merge a line
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and all(isinstance(t, str) and t and not any(c.isspace() for c in t) for t in pair)
        ):
            raise ValueError(
                f"tokenizer: {path} has a merge merges.txt cannot hold: {merge!r:.80} (expected "
                "two tokens without whitespace, as [a, b] or 'a b')"
            )
        merges.append((pair[0], pair[1]))
    return _with_added_tokens(vocab, data.get("added_tokens"), path), merges


def _with_added_tokens(vocab: dict[str, int], added: Any, path: Path) -> dict[str, int]:
    """The vocab plus the added tokens it lacks (CLIP's are in it), so that vocab.json gives
    every token the id tokenizer.json gives it."""
    out = dict(vocab)
    ids = set(vocab.values())
    for token in added if isinstance(added, list) else []:
        if not isinstance(token, dict):
            continue
        content, token_id = token.get("content"), token.get("id")
        if not isinstance(content, str) or not isinstance(token_id, int) or content in out:
            continue
        if token_id in ids:
            raise ValueError(
                f"tokenizer: {path} gives added token {content!r} the id {token_id}, which "
                "model.vocab gives another token"
            )
        out[content] = token_id
        ids.add(token_id)
    return out


def _check_tokenizer_folder(tokenizer: Path, what: str) -> None:
    if has_vocab_files(tokenizer):
        return
    if not (tokenizer / "tokenizer.json").is_file():
        raise ValueError(
            f"{what}: {tokenizer} must hold tokenizer.json or vocab.json and merges.txt"
        )
    read_bpe_model(tokenizer / "tokenizer.json")  # the package's vocab.json + merges.txt


def _check_diffusers_folder(folder: Path, what: str, need_weights: bool) -> bool:
    """Check a diffusers folder's configs (and weights' presence); True for SDXL."""
    model_index = _read_json(folder / "model_index.json", what)
    for name in MODEL_INDEX_CLASSES:
        model_index_class(model_index, name, what)
    unet_config = _read_json(folder / "unet" / "config.json", what)
    sdxl = _is_sdxl(model_index, unet_config, what)
    components = SDXL_COMPONENTS if sdxl else COMPONENTS
    configs = {name: _read_json(folder / name / "config.json", what) for name in components}
    if sdxl:
        _check_sdxl_widths(configs, what)
    _read_json(folder / "scheduler" / "scheduler_config.json", what)
    for tokenizer in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        _check_tokenizer_folder(folder / tokenizer, what)
    if need_weights:
        for name in components:
            if not any((folder / name).glob("*.safetensors")):
                raise ValueError(
                    f"{what}: {folder / name} has no .safetensors weights; pickle weights "
                    "(.bin, .ckpt) are refused because loading them runs code. Convert them "
                    "to safetensors first."
                )
    return sdxl


def _is_sdxl(model_index: dict[str, Any], unet_config: dict[str, Any], what: str) -> bool:
    """Whether the folder is an SDXL pipeline fewstep exports; NotImplementedError naming what
    makes it one it does not (module docstring)."""
    added = unet_config.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise NotImplementedError(
            f"{what}: unet config addition_embed_type={added!r} is not supported (fewstep "
            "exports None, SD 1.x/2.x, and 'text_time', SDXL)"
        )
    has_encoder_2 = model_index.get("text_encoder_2") not in (None, [None, None])
    has_encoder_1 = model_index.get("text_encoder", []) != [None, None]
    if added is None:
        if has_encoder_2:
            raise NotImplementedError(
                f"{what}: model_index.json has text_encoder_2 but the unet config has no "
                "addition_embed_type='text_time'; fewstep exports a second text encoder only "
                "for SDXL"
            )
        return False
    if not (has_encoder_1 and has_encoder_2) or model_index.get("requires_aesthetics_score"):
        raise NotImplementedError(
            f"{what}: an SDXL U-Net (addition_embed_type='text_time') needs text_encoder and "
            "text_encoder_2 in model_index.json and no requires_aesthetics_score; the SDXL "
            "refiner (text_encoder_2 alone, aesthetic score) is not supported"
        )
    return True


def _check_sdxl_widths(configs: dict[str, dict[str, Any]], what: str) -> None:
    """The U-Net's added-conditioning and cross-attention widths must match the encoders'."""
    unet, te1, te2 = configs["unet"], configs["text_encoder"], configs["text_encoder_2"]
    cross = unet.get("cross_attention_dim")
    width_1, width_2 = te1.get("hidden_size"), te2.get("hidden_size")
    if not (isinstance(width_1, int) and isinstance(width_2, int)) or cross != width_1 + width_2:
        raise ValueError(
            f"{what}: unet cross_attention_dim ({cross!r}) must be text_encoder hidden_size + "
            f"text_encoder_2 hidden_size ({width_1!r} + {width_2!r}): SDXL concatenates "
            "both encoders' hidden states"
        )
    time_dim = unet.get("addition_time_embed_dim")
    projection = te2.get("projection_dim")
    expected = unet.get("projection_class_embeddings_input_dim")
    if not (isinstance(time_dim, int) and isinstance(projection, int)) or expected != (
        SDXL_TIME_IDS * time_dim + projection
    ):
        raise ValueError(
            f"{what}: unet projection_class_embeddings_input_dim ({expected!r}) must be "
            f"{SDXL_TIME_IDS} x addition_time_embed_dim ({time_dim!r}) + text_encoder_2 "
            f"projection_dim ({projection!r})"
        )


def check_source(src: str | os.PathLike, config: str | os.PathLike | None) -> SourceSpec:
    """Validate `src` (and `config` for single files) without loading any weights."""
    refuse_pickle(src)
    path = Path(src)
    if not path.exists():
        raise ValueError(f"src does not exist: {str(src)!r}")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"src must be a diffusers folder with model_index.json, got {str(src)!r}"
            )
        sdxl = _check_diffusers_folder(path, f"src {str(src)!r}", need_weights=True)
        return SourceSpec(path=path, kind="diffusers", config_dir=path, sdxl=sdxl)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ValueError(
            f"src must be a diffusers folder or a {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint, "
            f"got {str(src)!r}"
        )
    if config is None:
        raise ValueError(
            "config is required for a single-file checkpoint: a local diffusers folder with the "
            "component configs, tokenizer and scheduler of the same architecture (got None)"
        )
    config_dir = Path(config)
    if not config_dir.is_dir():
        raise ValueError(f"config must be a local diffusers folder, got {str(config)!r}")
    sdxl = _check_diffusers_folder(config_dir, f"config {str(config)!r}", need_weights=False)
    unet_config = _read_json(config_dir / "unet" / "config.json", "config")
    if unet_config.get("time_cond_proj_dim"):
        # diffusers 0.42's single_file_utils has no rule for time_embedding.cond_proj: the
        # weight stays on the meta device and loading fails deep inside accelerate.
        raise NotImplementedError(
            f"single-file checkpoints of U-Nets with time_cond_proj_dim="
            f"{unet_config['time_cond_proj_dim']} (LCM) are not supported: diffusers' single-file "
            "loader does not convert the guidance embedding; export the diffusers folder instead"
        )
    _check_single_file_keys(path, config_dir, sdxl)
    return SourceSpec(path=path, kind="single_file", config_dir=config_dir, sdxl=sdxl)


def read_safetensors_shapes(path: Path, what: str) -> dict[str, list[int]]:
    """key -> shape from a safetensors file's JSON header, without reading any tensor."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= _SAFETENSORS_MAX_HEADER:
                raise ValueError(f"header length {size}")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        return {key: list(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{what} is not a readable safetensors file: {e}") from e


def _single_file_is_sdxl(shapes: dict[str, list[int]], what: str) -> bool:
    """Which layout the file's text encoders have: SDXL's (True) or SD 1.x/2.x's (False)."""

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in shapes)

    if not has(SINGLE_FILE_UNET):
        raise ValueError(f"{what} has no U-Net: no key starts with {SINGLE_FILE_UNET!r}")
    if has(SINGLE_FILE_REFINER_OPENCLIP) and not has(SINGLE_FILE_SDXL_CLIP):
        raise NotImplementedError(
            f"{what} is an SDXL refiner checkpoint (OpenCLIP alone, under "
            f"{SINGLE_FILE_REFINER_OPENCLIP!r}; no CLIP-L under {SINGLE_FILE_SDXL_CLIP!r}): the "
            "refiner is conditioned on an aesthetic score and has no first text encoder, which "
            "fewstep does not support; it exports SDXL base and Turbo files"
        )
    if has(SINGLE_FILE_SDXL_TEXT) != has(SINGLE_FILE_SD_TEXT):
        return has(SINGLE_FILE_SDXL_TEXT)
    raise ValueError(
        f"{what} must hold its text encoder(s) under {SINGLE_FILE_SD_TEXT!r} (SD 1.x/2.x) or "
        f"{SINGLE_FILE_SDXL_TEXT!r} (SDXL), not both or neither"
    )


def _check_single_file_keys(path: Path, config_dir: Path, sdxl: bool) -> None:
    """The file's layout must be the config folder's family, its SDXL widths the config's."""
    what = f"src {str(path)!r}"
    shapes = read_safetensors_shapes(path, what)
    family = {True: "SDXL", False: "SD 1.x/2.x"}
    file_sdxl = _single_file_is_sdxl(shapes, what)
    if file_sdxl != sdxl:
        raise ValueError(
            f"{what} is an {family[file_sdxl]} checkpoint but config {str(config_dir)!r} is an "
            f"{family[sdxl]} folder; give the diffusers folder of the file's own architecture"
        )
    if not sdxl:
        return
    for key, component, field in SDXL_SINGLE_FILE_WIDTHS:
        width = _read_json(config_dir / component / "config.json", "config").get(field)
        shape = shapes.get(key)
        if shape is None or len(shape) != 2 or shape[1] != width:
            raise ValueError(
                f"{what} key {key!r} has shape {shape}; config {str(config_dir)!r} expects "
                f"[_, {component} {field}] = [_, {width!r}]"
            )


def with_tiny_vae(spec: SourceSpec, vae: str | os.PathLike | None) -> SourceSpec:
    """`spec` with the tiny autoencoder folder `vae` in place of its VAE, checked against the
    source's configs before anything loads (PackageError, a ValueError, naming the culprit)."""
    if vae is None:
        return spec
    read_model_info(spec.config_dir, vae=Path(vae))
    return dataclasses.replace(spec, vae=Path(vae))


def _load_tiny_vae(folder: Path) -> Any:
    import diffusers
    import torch

    return getattr(diffusers, TINY_VAE_CLASS).from_pretrained(
        folder, torch_dtype=torch.float32, use_safetensors=True
    )


def _component_class(model_index: dict[str, Any], name: str) -> Any:
    import diffusers
    import transformers

    library, cls_name = model_index_class(model_index, name, "model_index")
    return getattr({"diffusers": diffusers, "transformers": transformers}[library], cls_name)


def _load_single_file(spec: SourceSpec, model_index: dict[str, Any]) -> dict[str, Any]:
    """The torch components (`spec.components`) of a single file, by diffusers' loader."""
    import diffusers
    import torch

    pipeline_cls = getattr(diffusers, model_index.get("_class_name", ""), None)
    if pipeline_cls is None or not hasattr(pipeline_cls, "from_single_file"):
        default = "StableDiffusionXLPipeline" if spec.sdxl else "StableDiffusionPipeline"
        pipeline_cls = getattr(diffusers, default)
    kwargs: dict[str, Any] = {}
    # Skip components we don't export (and that would need the Hub to build).
    params = inspect.signature(pipeline_cls.__init__).parameters
    for optional in ("safety_checker", "feature_extractor", "image_encoder"):
        if optional in params:
            kwargs[optional] = None
    if "add_watermarker" in params:  # SDXL: a post-processing step fewstep does not run
        kwargs["add_watermarker"] = False
    try:
        pipe = pipeline_cls.from_single_file(
            str(spec.path),
            config=str(spec.config_dir),
            local_files_only=True,
            torch_dtype=torch.float32,
            **kwargs,
        )
    except KeyError as e:  # diffusers' converters index the keys they need
        raise ValueError(
            f"src {str(spec.path)!r} lacks a key diffusers' single-file loader needs for "
            f"config {str(spec.config_dir)!r}: {e}"
        ) from e
    except NotImplementedError as e:
        if "meta tensor" not in str(e):
            raise
        # A weight the config's model has and the file lacks stays on the meta device.
        raise ValueError(
            f"src {str(spec.path)!r} lacks weights that the model of config "
            f"{str(spec.config_dir)!r} has (diffusers' single-file loader left them unloaded)"
        ) from e
    return {name: getattr(pipe, name) for name in spec.components}


def load_source(spec: SourceSpec) -> SourceModel:
    """Load the U-Net, VAE and text encoder(s) in fp32, eval mode, gradients off."""
    import torch

    model_index = _read_json(spec.config_dir / "model_index.json", "model_index")
    if spec.kind == "diffusers":
        modules = {
            name: _component_class(model_index, name).from_pretrained(
                spec.path / name, torch_dtype=torch.float32, use_safetensors=True
            )
            for name in spec.components
            if not (name == "vae" and spec.vae is not None)  # not loaded: it is replaced
        }
    else:
        modules = _load_single_file(spec, model_index)
    if spec.vae is not None:
        modules["vae"] = _load_tiny_vae(spec.vae)
    for module in modules.values():
        if any(p.dtype != torch.float32 for p in module.parameters()):
            module.float()
        module.eval().requires_grad_(False)
    return SourceModel(
        spec=spec,
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        text_encoder_2=modules.get("text_encoder_2"),
        model_index=model_index,
        scheduler_config_path=spec.config_dir / "scheduler" / "scheduler_config.json",
        tokenizer_dir=spec.config_dir / "tokenizer",
        tokenizer_2_dir=spec.config_dir / "tokenizer_2" if spec.sdxl else None,
    )
