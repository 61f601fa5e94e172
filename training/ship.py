"""Stage 4: put the student into the installed package as fewstep's default model.

    python -m training.ship --student runs/lcm/model

writes `runtime/models/scenes/` (installed as `fewstep/models/scenes/`):

    diffusers/   the student's diffusers folder, weights stored in fp16 (safetensors)
    onnx/        its fewstep model package, exported with `--dtype fp16`, without vae_encoder

Both in fp16 because the weight files of the two together must stay within the shipping
budget (MAX_WEIGHT_BYTES); the quality report's onnxruntime fp16 rows measure what that costs.
The package leaves out the VAE encoder graph, which text-to-image does not use: with it, the
two copies took 12.27 MB (the ONNX files carry ~0.6 MB of graph structure besides the
weights). `fewstep export` of the shipped diffusers folder writes a package with it.
The folder is built next to its destination and renamed into place, so a failure leaves the
previous model untouched.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from fewstep.package import (
    DEFAULT_MODEL_DIR,
    read_manifest,
    verify_diffusers_folder,
    weight_bytes,
    write_manifest,
)

MAX_WEIGHT_BYTES = 12 * 1000 * 1000


def ship(student: Path, out: Path = DEFAULT_MODEL_DIR, dtype: str = "fp16") -> dict[str, int]:
    import diffusers
    import torch

    from fewstep.export import export_package

    verify_diffusers_folder(student)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        pipe = diffusers.DiffusionPipeline.from_pretrained(student, local_files_only=True)
        pipe.to(torch.float16 if dtype == "fp16" else torch.float32)
        pipe.save_pretrained(tmp / "diffusers", safe_serialization=True)
        export_package(student, tmp / "onnx", dtype=dtype, progress=True)
        drop_graph(tmp / "onnx", "vae_encoder")
        sizes = {name: weight_bytes(tmp / name) for name in ("diffusers", "onnx")}
        total = sum(sizes.values())
        if total > MAX_WEIGHT_BYTES:
            raise SystemExit(f"weights take {total / 1e6:.2f} MB, over {MAX_WEIGHT_BYTES / 1e6} MB")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sizes


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
    parser.add_argument("--student", required=True, help="the student's diffusers folder")
    parser.add_argument("--out", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"))
    args = parser.parse_args(argv)
    sizes = ship(Path(args.student), Path(args.out), args.dtype)
    for name, size in sizes.items():
        print(f"{name}: {size / 1e6:.2f} MB of weights")
    print(f"wrote {args.out} ({sum(sizes.values()) / 1e6:.2f} MB of weights in all)")


if __name__ == "__main__":
    main()
