"""Stage 4: put the student into the installed package as fewstep's default model.

    python -m training.ship --student runs/lcm/model

writes `runtime/models/scenes/` (installed as `fewstep/models/scenes/`) in two steps. First
`ship`: the student's diffusers folder with its weights in fp16, which is also its fewstep
model package (exported with `--dtype fp16`, without vae_encoder). The U-Net and text encoder
graphs read their weights from the folder's safetensors files (fewstep.export.shared_weights),
so each weight is stored once; the VAE decoder's graph keeps its own. The folder is built next
to its destination and renamed into place, so a failure leaves the previous model untouched.
Then `add_vae_encoder` (below) adds the VAE encoder graph, for img2img. The weight files must
stay within the shipping budget (MAX_WEIGHT_BYTES) after each step; the quality report's
onnxruntime fp16 rows measure what fp16 costs.

    python -m training.ship --add-vae-encoder [--out runtime/models/scenes]

does the second step alone, on an already shipped folder, without the training runs. The
graph is exported from the folder's own `vae/` weights exactly as `fewstep export` exports it
(fp16 weights cast from fp16 are the student's fp16 weights, and the export is deterministic:
a full export of the shipped folder gives its VAE decoder graph bit for bit); every other file
stays byte-identical, and the manifest gains the graph and its hash. The graph keeps its own
weights, as the decoder's does (ONNX runtimes read external data only from the graph's own
folder, and `vae_encoder/` is not `vae/`): in fp16 they add 0.71 MB, more than the budget
leaves (12.11 MB in all). So its Conv and MatMul weights are stored as int8 with a float32
scale per output channel (training.quantize: weight-only, the graph dequantizes them and
computes in fp16 as before): 0.40 MB, 11.80 MB in all. Measured on 256 held-out scenes, the
latent mean moves by 0.4% of the latents' std on average (max 2.5%) against the fp32 encoder
(fp16 weights: 0.02%, max 0.18%), and img2img images move by 1e-4 on average on 0..1
(docs/default-model.md). The manifest's entry says so (`weights`), and its errors are the
int8 graph's against the fp32 source module. `--vae-encoder-weights fp16` exports it as
`fewstep export` does (refused at the default budget); `none` ships without it. fewstep's
torch backend runs the folder's `vae/` weights, unquantized.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fewstep.package import (
    DEFAULT_MODEL_DIR,
    PackageError,
    read_manifest,
    verify_diffusers_folder,
    verify_package,
    weight_bytes,
    write_manifest,
)

MAX_WEIGHT_BYTES = 12 * 1000 * 1000


def ship(student: Path, out: Path = DEFAULT_MODEL_DIR, dtype: str = "fp16") -> dict[str, int]:
    """Returns the bytes of the weight files by folder ("model": what ships; "diffusers" and
    "package": the two copies it replaces, for the record)."""
    import diffusers
    import torch

    from fewstep.export import export_package
    from fewstep.export.shared_weights import combine_with_diffusers_folder

    verify_diffusers_folder(student)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(student, local_files_only=True)
        pipe.to(torch.float16 if dtype == "fp16" else torch.float32)
        pipe.save_pretrained(work / "diffusers", safe_serialization=True)
        export_package(student, work / "package", dtype=dtype, progress=True)
        drop_graph(work / "package", "vae_encoder")
        combine_with_diffusers_folder(work / "package", work / "diffusers", work / "model")
        sizes = {name: weight_bytes(work / name) for name in ("model", "diffusers", "package")}
        if sizes["model"] > MAX_WEIGHT_BYTES:
            raise SystemExit(
                f"weights take {sizes['model'] / 1e6:.2f} MB, over {MAX_WEIGHT_BYTES / 1e6} MB"
            )
        move_into_place(work / "model", out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sizes


def move_into_place(built: Path, out: Path, work: Path) -> None:
    """Rename `built` to `out`; the folder `out` held moves into `work` (removed with it),
    and comes back if the rename fails."""
    built.chmod(0o755)
    previous = work / "previous"
    if out.exists():
        out.rename(previous)
    try:
        built.rename(out)
    except BaseException:
        if previous.exists():
            previous.rename(out)
        raise


VAE_ENCODER_WEIGHTS = ("int8", "fp16")


def add_vae_encoder(
    folder: Path = DEFAULT_MODEL_DIR,
    max_weight_bytes: int | None = MAX_WEIGHT_BYTES,
    weights: str = "int8",
) -> int:
    """Add `vae_encoder/` to a shipped folder (module docstring), its Conv and MatMul weights
    stored as `weights` (int8: training.quantize; fp16: as exported); returns the weight bytes
    it adds. Refuses (SystemExit) when the folder's weights would exceed `max_weight_bytes`
    (None: no limit), leaving the folder untouched."""
    if weights not in VAE_ENCODER_WEIGHTS:
        raise ValueError(f"weights must be one of {VAE_ENCODER_WEIGHTS}, got {weights!r}")
    folder = Path(folder)
    manifest = verify_package(folder)
    if manifest is None:
        raise PackageError(f"folder must be a shipped model with a manifest: {folder} has none")
    if (folder / "vae_encoder").exists():
        raise PackageError(f"folder {folder} already has a vae_encoder/")
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        built = work / "model"
        shutil.copytree(folder, built)
        entry = export_vae_encoder(built, manifest, weights)
        info = {k: v for k, v in manifest.items() if k not in ("files", "manifest_version")}
        info["graphs"] = {**manifest["graphs"], "vae_encoder": entry}
        write_manifest(built, info)
        verify_package(built)
        total, added = weight_bytes(built), weight_bytes(built) - weight_bytes(folder)
        if max_weight_bytes is not None and total > max_weight_bytes:
            raise SystemExit(
                f"weights would take {total / 1e6:.2f} MB with the VAE encoder graph "
                f"(+{added / 1e6:.2f} MB), over {max_weight_bytes / 1e6} MB; {folder} unchanged"
            )
        move_into_place(built, folder, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return added


def export_vae_encoder(
    folder: Path, manifest: dict[str, Any], weights: str = "int8"
) -> dict[str, Any]:
    """Write `folder/vae_encoder/` as export_package writes it (same trace size, precision
    and verification) from the folder's own weights, its weights quantized to int8 unless
    `weights` is "fp16"; returns its manifest entry, whose errors are the shipped graph's
    against the fp32 source module (with int8 weights: quantization included)."""
    from fewstep.export.graphs import vae_encoder_spec
    from fewstep.export.onnx_io import MODEL_NAME, graph_io
    from fewstep.export.package_writer import _export_one
    from fewstep.export.source import check_source, load_source
    from fewstep.export.verify import check_graph, reference_outputs, verification_latent_size

    model = load_source(check_source(folder, None))
    spec = vae_encoder_spec(model.vae)
    precision = manifest["graphs"]["vae_decoder"]["precision"]  # the VAE's graphs share it
    unet_multiple = 2 ** (len(model.unet.config.block_out_channels) - 1)
    sequence = int(model.text_encoder.config.max_position_embeddings)
    latent_size = verification_latent_size(unet_multiple)
    # the reference first: the export converts the module to the graph's precision in place
    reference = reference_outputs(spec, spec.make_module(), precision, latent_size)
    _export_one(folder, spec, precision, int(manifest["opset"]), unet_multiple, sequence)
    # the config export_package copies: the source's vae/config.json, as vae_decoder/ has it
    shutil.copyfile(folder / "vae_decoder" / "config.json", folder / spec.name / "config.json")
    path = folder / spec.name / MODEL_NAME
    quantized = quantize_vae_encoder(folder, path) if weights == "int8" else None
    error = check_graph(spec, path, precision, reference)
    entry = {
        **graph_io(path),
        "precision": precision,
        "max_abs_error": error.max_abs_error,
        "max_rel_error": error.max_rel_error,
        "verified_input_shapes": {k: list(v) for k, v in error.input_shapes.items()},
    }
    if quantized is not None:
        entry["weights"] = quantized
    return entry


def quantize_vae_encoder(folder: Path, path: Path) -> dict[str, Any]:
    """Quantize the exported encoder graph at `path` in place (training.quantize), naming its
    tensors after the folder's `vae/` parameters; returns the manifest's note of it."""
    from safetensors.numpy import load_file

    from training.quantize import INT8_MAX, quantize_onnx_file

    parameters = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    # "vae.": the exporter's names for the module's weights (VaeEncoderGraph.vae)
    done = quantize_onnx_file(path, parameters, prefix="vae.")
    return {
        "dtype": "int8",
        "scales": f"float32 per output channel, max |W| / {INT8_MAX}, zero point 0",
        "tensors": len(done),
        "max_error_in_scales": max(q.max_error_in_scales for q in done),
    }


def drop_graph(package: Path, graph: str) -> None:
    """Remove an optional graph from a package and rewrite its manifest's hashes."""
    shutil.rmtree(package / graph)
    manifest = read_manifest(package) or {}
    manifest.pop("files", None)
    manifest.pop("manifest_version", None)
    manifest.get("graphs", {}).pop(graph, None)
    write_manifest(package, manifest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", help="the student's diffusers folder")
    parser.add_argument("--out", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"))
    parser.add_argument(
        "--add-vae-encoder",
        action="store_true",
        help="add the VAE encoder graph to the shipped folder --out (no --student)",
    )
    parser.add_argument(
        "--vae-encoder-weights",
        default="int8",
        choices=(*VAE_ENCODER_WEIGHTS, "none"),
        help="how the VAE encoder graph stores its weights (none: ship without it)",
    )
    parser.add_argument(
        "--max-weight-mb", type=float, default=MAX_WEIGHT_BYTES / 1e6, help="the budget"
    )
    args = parser.parse_args(argv)
    if args.add_vae_encoder == (args.student is not None):
        parser.error("give either --student or --add-vae-encoder")
    if args.add_vae_encoder and args.vae_encoder_weights == "none":
        parser.error("--add-vae-encoder needs --vae-encoder-weights int8 or fp16")
    if args.student is not None:
        sizes = ship(Path(args.student), Path(args.out), args.dtype)
        print(
            f"wrote {args.out}: {sizes['model'] / 1e6:.2f} MB of weights (a diffusers folder "
            f"{sizes['diffusers'] / 1e6:.2f} MB and a package {sizes['package'] / 1e6:.2f} MB "
            "apart)"
        )
    if args.vae_encoder_weights != "none":
        budget = round(args.max_weight_mb * 1e6)
        added = add_vae_encoder(Path(args.out), budget, args.vae_encoder_weights)
        print(f"added {args.out}/vae_encoder: {added / 1e6:.2f} MB of weights")


if __name__ == "__main__":
    main()
