"""`export_package`: a diffusers folder or single-file checkpoint -> a fewstep model package.

The lifecycle reads as a sentence: check the arguments (LoRA files included) -> load the torch
components -> fold the LoRAs into them (`fewstep.lora`) -> export each graph (`graphs.py`
contracts, `onnx_io.py`) and map its weights to initializers (`lora_map.py`) -> verify each
against torch (`verify.py`) -> write configs, tokenizer, scheduler and the manifest -> rename
into place.

The package layout is optimum's ONNX Stable Diffusion layout plus `fewstep.json`
(docs/architecture.md#the-model-package). Writes are atomic (`fewstep.atomic_folder`):
everything is built in a hidden sibling folder `.{out.name}.tmp-XXXX` and renamed to `out` at
the end; any failure (an exception, Ctrl-C) removes the temporary folder and leaves nothing at
`out`, and one left by a killed export is removed by the next export to the same `out`.

The package's tokenizer/ (and SDXL's tokenizer_2/) holds both layouts whatever the source
shipped: tokenizer.json (the lean runtime, fast tokenizers) and vocab.json + merges.txt
(optimum, slow tokenizers), each derived from the other when the source lacks it (SD 1.x
repositories have no tokenizer.json; transformers 5 saves only tokenizer.json).

With `vae=` (a diffusers AutoencoderTiny folder: TAESD, TAESDXL) the vae_decoder/ and
vae_encoder/ graphs and configs are the tiny autoencoder's, and model_index.json names it
(fewstep.package reads the class from vae_decoder/config.json; graphs.py has the encoder's
`latents` output).

SDXL packages add text_encoder_2/ and tokenizer_2/ (optimum's SDXL layout, graphs.py has the
I/O); LoRAs fold into its second text encoder too, and kohya's sgm U-Net names are read
(fewstep.lora.sgm_names).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fewstep
from fewstep.atomic_folder import atomic_folder
from fewstep.export.graphs import (
    GraphSpec,
    graph_specs,
    keeps_fp32_vae_decoder,
    release,
    to_fp16,
)
from fewstep.export.lora_map import write_lora_map
from fewstep.export.onnx_io import MAX_OPSET, MIN_OPSET, MODEL_NAME, export_graph, graph_io
from fewstep.export.progress import StageLog
from fewstep.export.source import (
    SourceModel,
    SourceSpec,
    check_source,
    has_vocab_files,
    load_source,
    read_bpe_model,
    refuse_pickle,
    with_tiny_vae,
)
from fewstep.export.verify import (
    GraphError,
    Reference,
    check_graph,
    reference_outputs,
    verification_latent_size,
)
from fewstep.lora import LORA_GRAPHS, LoraArg, LoraFile, describe_loras, fold_lora_torch, load_loras
from fewstep.package import family_from_configs, read_model_info, write_manifest

DTYPES = ("fp32", "fp16")
EXPORTER = "torch.onnx TorchScript exporter (dynamo=False)"
TRACE_BATCH = 1  # the verification runs batch 2, so a batch axis baked in by tracing fails it
# Which source component each graph's config.json comes from.
GRAPH_CONFIGS = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",  # SDXL
    "unet": "unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
}
_VERSIONED = ("torch", "diffusers", "transformers", "onnx", "onnxruntime")
_UNEXPORTED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def _check_arguments(
    src: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str,
    opset: int,
    config: Any,
    vae: str | os.PathLike | None = None,
) -> tuple[SourceSpec, Path]:
    refuse_pickle(src)  # first: nothing may happen to a pickle
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an int in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")
    out_path = Path(out)
    if out_path.exists() and not (out_path.is_dir() and not any(out_path.iterdir())):
        raise ValueError(
            f"out must be a new or empty folder, got {str(out)!r} (exists and is not empty)"
        )
    return with_tiny_vae(check_source(src, config), vae), out_path


def _graph_names(spec: SourceSpec) -> list[str]:
    """The graphs the package will hold, in export order."""
    return [name for name in GRAPH_CONFIGS if spec.sdxl or name != "text_encoder_2"]


def export_package(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "fp32",
    opset: int = 18,
    config: str | os.PathLike | None = None,
    progress: bool = True,
    verify: bool = True,
    loras: Sequence[LoraArg] | None = None,
    vae: str | os.PathLike | None = None,
) -> Path:
    """Export `src` to a model package at `out`; returns `out` as a Path.

    src: a diffusers folder (with model_index.json) or a `.safetensors` single-file checkpoint
        in the original (Stability) key layout, SDXL included. Pickle checkpoints (.ckpt .pt
        .pth .bin) are refused.
    out: a folder that does not exist yet (or is empty); written atomically.
    dtype: one of DTYPES. fp16 graphs take and return fp16 (timestep stays float32, input_ids
        int64); the manifest records each graph's precision and I/O dtypes.
    opset: ONNX opset, MIN_OPSET..MAX_OPSET.
    config: for a single file, a local diffusers folder providing the component configs,
        tokenizer and scheduler (loaded offline).
    progress: print a line per stage with its seconds, and each graph's verification.
    verify: run every graph with onnxruntime against its torch module and store the errors;
        raises VerificationError (leaving no package) when an fp32 graph's relative error
        exceeds 1e-4 or any graph's output is not finite.
    loras: [(path, scale), …] LoRA safetensors folded into the U-Net and text encoder(s)
        before export (fewstep.lora); the manifest's `loras` records each file's name, sha256
        and scale. Files and scales are checked before anything loads, keys before anything is
        written.
    vae: a diffusers AutoencoderTiny folder (TAESD for SD 1.x/2.x, TAESDXL for SDXL) whose
        decoder and encoder become the package's VAE graphs; checked (config keys against
        the source, safetensors weights) before anything loads.
    """
    spec, out_path = _check_arguments(src, out, dtype, opset, config, vae)
    checked = load_loras(loras)
    stage_names = ["load", *(f"export {name}" for name in _graph_names(spec)), "verify", "write"]
    if checked:
        stage_names.insert(1, "fold loras")
    if not verify:
        stage_names.remove("verify")
    log = StageLog(stage_names, enabled=progress)

    with atomic_folder(out_path) as tmp:
        _build_package(tmp, spec, dtype, opset, verify, log, checked)
    return out_path


def _build_package(
    tmp: Path,
    spec: SourceSpec,
    dtype: str,
    opset: int,
    verify: bool,
    log: StageLog,
    loras: list[tuple[LoraFile, float]],
) -> None:
    with log.stage("load"):
        model = load_source(spec)
    if loras:
        with log.stage("fold loras"):
            folds = fold_lora_torch(_lora_targets(model), loras)
            log.note(f"folded {len(loras)} LoRA file(s) into {len(folds)} weights")
    family = family_from_configs(dict(model.unet.config))
    specs = graph_specs(model.unet, model.vae, model.text_encoder, model.text_encoder_2)
    upcast_vae = dtype == "fp16" and keeps_fp32_vae_decoder(family, model.vae.config)
    precisions = {s.name: dtype for s in specs}
    if upcast_vae:  # recorded per graph in the manifest
        precisions["vae_decoder"] = precisions["vae_encoder"] = "fp32"
    unet_multiple = next(s.latent_multiple for s in specs if s.name == "unet")
    sequence = int(model.text_encoder.config.max_position_embeddings)

    # One component at a time: its references while it is fp32, its graphs, then its weights
    # freed: an SDXL export never holds its U-Net twice (docs/architecture.md#export-memory).
    latent_size = verification_latent_size(unet_multiple)
    references: dict[str, Reference] = {}
    for graph in specs:
        component = GRAPH_CONFIGS[graph.name]
        same_component = [s for s in specs if GRAPH_CONFIGS[s.name] == component]
        with log.stage(f"export {graph.name}"):
            if verify and graph.name not in references:
                for other in same_component:
                    references[other.name] = reference_outputs(
                        other, other.make_module(), precisions[other.name], latent_size
                    )
            _export_one(tmp, graph, precisions[graph.name], opset, unet_multiple, sequence)
            shutil.copyfile(_graph_config(spec, graph.name), tmp / graph.name / "config.json")
            if graph is same_component[-1]:
                release(getattr(model, component))

    errors: dict[str, GraphError] = {}
    if verify:
        with log.stage("verify"):
            for graph in specs:
                path = tmp / graph.name / MODEL_NAME
                errors[graph.name] = check_graph(
                    graph, path, precisions[graph.name], references.pop(graph.name)
                )
                log.note(errors[graph.name].summary())

    with log.stage("write"):
        _write_metadata(tmp, model)
        manifest = _manifest(tmp, model, specs, precisions, errors, dtype, opset, loras, log)
        write_manifest(tmp, manifest)


def _lora_targets(model: SourceModel) -> dict[str, Any]:
    """The torch components LoRAs fold into, by diffusers' names."""
    targets = {"unet": model.unet, "text_encoder": model.text_encoder}
    if model.text_encoder_2 is not None:  # SDXL
        targets["text_encoder_2"] = model.text_encoder_2
    return targets


def _graph_config(spec: SourceSpec, graph: str) -> Path:
    """The config.json a graph's folder gets: its source component's (the tiny VAE's)."""
    component = GRAPH_CONFIGS[graph]
    if component == "vae" and spec.vae is not None:
        return spec.vae / "config.json"
    return spec.config_dir / component / "config.json"


def _export_one(
    tmp: Path, graph: GraphSpec, precision: str, opset: int, latent_multiple: int, sequence: int
) -> None:
    module = graph.make_module()
    if precision == "fp16":
        module = to_fp16(module)
    side = 2 * latent_multiple  # square: the verification's non-square size differs from it
    inputs = graph.sample_inputs(TRACE_BATCH, side, side, sequence=sequence, seed=0)
    export_graph(graph, module, graph.torch_args(inputs, precision), tmp / graph.name, opset)
    if graph.name in LORA_GRAPHS:
        write_lora_map(tmp / graph.name, graph.name, module)


def _write_metadata(tmp: Path, model: SourceModel) -> None:
    """model_index.json, scheduler/scheduler_config.json, tokenizer/ (+ tokenizer.json) and
    SDXL's tokenizer_2/."""
    if model.spec.kind == "diffusers" and model.spec.vae is None:
        shutil.copyfile(model.spec.path / "model_index.json", tmp / "model_index.json")
    elif model.spec.kind == "diffusers":  # the source's, naming the VAE the package holds
        index = dict(model.model_index, vae=["diffusers", type(model.vae).__name__])
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    else:
        (tmp / "model_index.json").write_text(
            json.dumps(_single_file_model_index(model), indent=2) + "\n"
        )
    (tmp / "scheduler").mkdir()
    shutil.copyfile(model.scheduler_config_path, tmp / "scheduler" / "scheduler_config.json")
    _write_tokenizer(model.tokenizer_dir, tmp / "tokenizer")
    if model.tokenizer_2_dir is not None:
        _write_tokenizer(model.tokenizer_2_dir, tmp / "tokenizer_2")


def _single_file_model_index(model: SourceModel) -> dict[str, Any]:
    """The config folder's pipeline description, for the components the package holds."""
    import diffusers

    scheduler_class = json.loads(model.scheduler_config_path.read_text())["_class_name"]
    index = {
        "_class_name": model.model_index.get("_class_name", "StableDiffusionPipeline"),
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", type(model.text_encoder).__name__],
        "tokenizer": model.model_index.get("tokenizer", ["transformers", "CLIPTokenizer"]),
        "unet": ["diffusers", type(model.unet).__name__],
        "vae": ["diffusers", type(model.vae).__name__],
        "requires_safety_checker": False,
    }
    if model.text_encoder_2 is not None:  # SDXL: no safety checker, one setting the runtime reads
        del index["requires_safety_checker"]
        index["text_encoder_2"] = ["transformers", type(model.text_encoder_2).__name__]
        index["tokenizer_2"] = model.model_index.get("tokenizer_2", index["tokenizer"])
        zeros = model.model_index.get("force_zeros_for_empty_prompt")
        if zeros is not None:
            index["force_zeros_for_empty_prompt"] = zeros
    for name in _UNEXPORTED_COMPONENTS:
        if name in model.model_index:
            index[name] = [None, None]
    return index


def _write_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files, then add the layout the source lacks (module docstring).

    tokenizer.json is serialised by transformers' fast CLIP tokenizer built from vocab.json +
    merges.txt; vocab.json and merges.txt are the BPE model inside tokenizer.json.
    """
    dst.mkdir()
    for path in sorted(src.iterdir()):
        if path.is_file():
            shutil.copyfile(path, dst / path.name)
    if not has_vocab_files(src):
        vocab, merges = read_bpe_model(src / "tokenizer.json")
        (dst / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
        (dst / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif not (dst / "tokenizer.json").exists():
        from transformers import CLIPTokenizerFast

        tokenizer = CLIPTokenizerFast.from_pretrained(str(src))
        tokenizer.backend_tokenizer.save(str(dst / "tokenizer.json"))


def library_versions() -> dict[str, str]:
    versions = {"fewstep": fewstep.__version__}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _manifest(
    tmp: Path,
    model: SourceModel,
    specs: list[GraphSpec],
    precisions: dict[str, str],
    errors: dict[str, GraphError],
    dtype: str,
    opset: int,
    loras: list[tuple[LoraFile, float]],
    log: StageLog,
) -> dict[str, Any]:
    info = read_model_info(tmp)  # the runtime's own reading of the configs just written
    graphs: dict[str, Any] = {}
    for graph in specs:
        entry: dict[str, Any] = {
            **graph_io(tmp / graph.name / MODEL_NAME),
            "precision": precisions[graph.name],
            "max_abs_error": None,
            "max_rel_error": None,
        }
        if graph.name in errors:
            error = errors[graph.name]
            entry["max_abs_error"] = error.max_abs_error
            entry["max_rel_error"] = error.max_rel_error
            entry["verified_input_shapes"] = {k: list(v) for k, v in error.input_shapes.items()}
        graphs[graph.name] = entry
    return {
        "family": info.family,
        "prediction_type": info.prediction_type,
        "latent_channels": info.latent_channels,
        "vae_scaling_factor": info.vae_scaling_factor,
        "vae_scale_factor": info.vae_scale_factor,
        "vae_class": info.vae_class,
        "default_height": info.default_height,
        "default_width": info.default_width,
        "guidance_embedding_dim": info.guidance_embedding_dim,
        "default_num_inference_steps": info.default_num_inference_steps,
        "default_guidance_scale": info.default_guidance_scale,
        "precision": dtype,
        "opset": opset,
        "exporter": EXPORTER,
        "source": model.spec.describe(),
        "versions": library_versions(),
        "graphs": graphs,
        "loras": describe_loras(loras, "export"),
        "export_seconds": dict(log.seconds),
    }
