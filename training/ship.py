"""Stage 4: put the student into the installed package as fewstep's default model.

    python -m training.ship --student runs/lcm/model

writes `runtime/models/scenes/` (installed as `fewstep/models/scenes/`): the student's diffusers
folder with its weights in fp16, which is also its fewstep model package (exported with
`--dtype fp16`, without vae_encoder). The U-Net and text encoder graphs read their weights from
the folder's safetensors files (fewstep.export.shared_weights), so each weight is stored once;
the VAE decoder's graph keeps its own. The weight files must stay within the shipping budget
(MAX_WEIGHT_BYTES); the quality report's onnxruntime fp16 rows measure what fp16 costs. The
package leaves out the VAE encoder graph, which text-to-image does not use; `fewstep export`
of the shipped folder writes a package with it. The folder is built next to its destination
and renamed into place, so a failure leaves the previous model untouched.
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
        (work / "model").chmod(0o755)
        previous = work / "previous"
        if out.exists():
            out.rename(previous)
        try:
            (work / "model").rename(out)
        except BaseException:
            if previous.exists():
                previous.rename(out)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
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
    print(
        f"wrote {args.out}: {sizes['model'] / 1e6:.2f} MB of weights (a diffusers folder "
        f"{sizes['diffusers'] / 1e6:.2f} MB and a package {sizes['package'] / 1e6:.2f} MB apart)"
    )


if __name__ == "__main__":
    main()
