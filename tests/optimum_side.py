"""Hugging Face optimum's side of the SDXL interop tests (tests/test_optimum_sdxl.py).

optimum's ONNX Runtime part (optimum-onnx 0.1.0, with optimum 2.1) requires transformers<4.58,
and fewstep's environment has transformers 5 (constraints.txt), diffusers 0.42 and
huggingface_hub 1.x. So optimum runs in a subprocess with an overlay folder first on
PYTHONPATH: those packages at versions optimum-onnx accepts (`OVERLAY_PINS`, installed with
`--no-deps`), over the main environment's torch, onnxruntime, onnx and numpy.

    python tests/optimum_side.py install DIR           build the overlay (main environment;
                                                       nothing when DIR already holds the pins)
    python tests/optimum_side.py export MODEL OUT      optimum's exporter: diffusers SDXL
                                                       folder -> ONNX package (overlay)
    python tests/optimum_side.py run PACKAGE CASES OUT ORTStableDiffusionXLPipeline on a
                                                       package, one OUT/<id>.npy per case
                                                       (overlay)

`export` and `run` exit with `OVERLAY_BROKEN` when optimum does not import or the overlay's
packages are not the pinned ones, so the tests can tell a broken overlay (skip) from a failure.

Limits: `export` writes every graph's weights to `model.onnx_data` (optimum's
FORCE_ONNX_EXTERNAL_DATA: what it writes for graphs past 2 GiB), skips optimum's own
validation (the tests compare images instead), and gives the copied source folder's tokenizers
`vocab.json` + `merges.txt`, written by `tokenizers` from their tokenizer.json: transformers 4
reads CLIP tokenizers from those only, and transformers 5 saves tokenizer.json alone (as
hub SDXL repositories ship both, this is their layout). Only this file's stdlib part runs in
the main environment (the tests import it for the pins and the overlay check).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# (distribution, version): optimum-onnx 0.1.0 wants optimum~=2.1.0 and transformers<4.58;
# transformers 4.57 wants huggingface_hub<1.0 and tokenizers<=0.23.0; diffusers 0.42 imports
# names only huggingface_hub 1.x has, 0.35 runs on 0.36 and is one optimum-onnx's diffusion
# pipelines know (they branch on >=0.35).
OVERLAY_PINS = (
    ("optimum-onnx", "0.1.0"),
    ("optimum", "2.1.0"),
    ("transformers", "4.57.6"),
    ("huggingface_hub", "0.36.0"),
    ("tokenizers", "0.22.1"),
    ("diffusers", "0.35.2"),
)
# The importable module of each pinned distribution whose version `export`/`run` check.
PINNED_MODULES = {
    "transformers": "4.57.6",
    "huggingface_hub": "0.36.0",
    "tokenizers": "0.22.1",
    "diffusers": "0.35.2",
}
OVERLAY_BROKEN = 3  # exit status: optimum cannot run from this overlay
TOKENIZERS = ("tokenizer", "tokenizer_2")


def install_command(folder: Path | str) -> str:
    """The command that builds the overlay at `folder`, for messages."""
    return f"python {Path(__file__).as_posix()} install {folder}"


def overlay_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete overlay (missing, or a pinned package absent), or None."""
    if not folder.is_dir():
        return f"the overlay folder {folder} is missing"
    missing = [
        f"{name}=={version}"
        for name, version in OVERLAY_PINS
        if not (folder / f"{name.replace('-', '_')}-{version}.dist-info").is_dir()
    ]
    if missing:
        return f"the overlay folder {folder} lacks {', '.join(missing)}"
    return None


def install(folder: Path) -> None:
    """pip-install the pins without their dependencies into `folder`, built beside it and
    moved in whole, so an interrupted build leaves no half overlay."""
    if overlay_problem(folder) is None:
        print(f"{folder}: the optimum overlay is already there")
        return
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    pins = [f"{name}=={version}" for name, version in OVERLAY_PINS]
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target"]
    subprocess.run([*command, str(scratch), *pins], check=True)
    shutil.rmtree(folder, ignore_errors=True)
    scratch.rename(folder)
    print(f"{folder}: installed {' '.join(pins)}")


def import_optimum() -> None:
    """Exit with OVERLAY_BROKEN unless optimum's SDXL pieces import from the pinned packages."""
    try:
        import importlib

        import optimum.exporters.onnx  # noqa: F401
        import optimum.onnxruntime  # noqa: F401

        versions = {name: importlib.import_module(name).__version__ for name in PINNED_MODULES}
    except Exception as error:  # any import failure means the overlay cannot serve
        sys.exit(_broken(f"optimum does not import: {type(error).__name__}: {error}"))
    wrong = {name: v for name, v in versions.items() if v != PINNED_MODULES[name]}
    if wrong:
        sys.exit(_broken(f"not the overlay's packages (PYTHONPATH?): got {wrong}"))


def _broken(message: str) -> int:
    print(message, file=sys.stderr)
    return OVERLAY_BROKEN


def source_with_slow_tokenizer_files(model: Path, scratch: Path) -> Path:
    """A copy of the diffusers folder whose tokenizers also hold vocab.json + merges.txt."""
    from tokenizers import Tokenizer

    source = scratch / "source"
    shutil.copytree(model, source)
    for name in TOKENIZERS:
        folder = source / name
        if folder.is_dir() and not (folder / "vocab.json").is_file():
            Tokenizer.from_file(str(folder / "tokenizer.json")).model.save(str(folder))
    return source


def export(model: Path, out: Path) -> None:
    os.environ["FORCE_ONNX_EXTERNAL_DATA"] = "1"  # read by optimum at each graph's save
    import_optimum()
    from optimum.exporters.onnx import main_export

    with tempfile.TemporaryDirectory() as scratch:
        source = source_with_slow_tokenizer_files(model, Path(scratch))
        main_export(
            str(source),
            str(out),
            task="text-to-image",
            library_name="diffusers",
            device="cpu",
            do_validation=False,
        )


def _call_arguments(case: dict) -> dict:
    """A case's keyword arguments with the size pairs as tuples: diffusers adds them to its
    own tuple defaults (`original_size + crops_coords_top_left + target_size`)."""
    return {
        k: tuple(v) if k.endswith(("_size", "crops_coords_top_left")) else v
        for k, v in case["kwargs"].items()
    }


def run(package: Path, cases_file: Path, out: Path) -> None:
    """Each case of the JSON list ({id, prompts, latents: .npy path, scheduler: diffusers
    class name or null for the package's own, seed, kwargs}) -> out/<id>.npy (images, np)."""
    import_optimum()
    import diffusers
    import numpy as np
    import torch
    from optimum.onnxruntime import ORTStableDiffusionXLPipeline

    pipe = ORTStableDiffusionXLPipeline.from_pretrained(str(package))
    pipe.set_progress_bar_config(disable=True)
    own_scheduler = pipe.scheduler
    out.mkdir(parents=True, exist_ok=True)
    for case in json.loads(cases_file.read_text()):
        scheduler = case["scheduler"]
        pipe.scheduler = (
            own_scheduler
            if scheduler is None
            else getattr(diffusers, scheduler).from_config(own_scheduler.config)
        )
        images = pipe(
            case["prompts"],
            latents=torch.from_numpy(np.load(case["latents"])),
            generator=torch.Generator().manual_seed(case["seed"]),
            **_call_arguments(case),
        ).images
        np.save(out / f"{case['id']}.npy", np.asarray(images, dtype=np.float32))


def main(argv: list[str]) -> None:
    usage = "usage: optimum_side.py install DIR | export MODEL OUT | run PACKAGE CASES_JSON OUT"
    commands = {"install": (install, 1), "export": (export, 2), "run": (run, 3)}
    if not argv or argv[0] not in commands or len(argv) - 1 != commands[argv[0]][1]:
        sys.exit(usage)
    function, _ = commands[argv[0]]
    function(*(Path(arg) for arg in argv[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
