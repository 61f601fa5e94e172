"""The GPU suite: kernel and backend correctness at full SD sizes, then side-by-side timings.

One run, in order (each section writes the JSON so far, so a run cut short still reports):

0. checks: fewstep.kernels against fp64 references at full-size SD1.5/SD2 shapes, and the
   grid-sync GroupNorm in a CUDA graph (benchmarks/gpu_checks.py; tests/test_gpu_checks.py
   runs the same checks as `gpu` tests).
1. kernels (a): each fused kernel against the torch op it replaces, eager and in a CUDA graph
   (benchmarks/gpu_kernels.py).
2. unet (b): one U-Net step, SD1.5 architecture, 512², batch 2 (CFG), fp16: diffusers eager,
   fewstep's torch backend configured several ways, torch.compile; every output checked
   against fp64 (benchmarks/gpu_unet.py).
3. turbo (c): SD-Turbo architecture, 1 step, 512², end to end at batch 1 and 8, diffusers
   against fewstep (benchmarks/gpu_end_to_end.py).
4. sdxl_unet: one U-Net step, SDXL base architecture, 1024², batch 2 (CFG), fp16, as `unet`
   but without the two compiled variants unless `--sdxl-compile` (compiling the SDXL U-Net
   takes minutes each, more than the whole suite's run leaves; ask for them in a run of
   this section alone).
5. sdxl_turbo: SDXL-Turbo architecture, 1 step, 512², end to end at batch 1 and 8, as
   `turbo`, against diffusers' StableDiffusionXLPipeline.
6. quality (d): the shipped default model on the device, fp32 and fp16, scored by the scenes
   analyzer (benchmarks/gpu_quality.py). Last because it is not timed: a run cut short loses
   it rather than a timing.
After each section: what the tuned ops chose per shape, with each candidate's device time
(`kernel_choices`; fewstep.kernels.tuning). At the end: the table, the targets and the verdict
(benchmarks/gpu_report.py); the exit status is 1 unless every check passed.

Timing: CUDA events around each call, `--warmup` untimed calls first (Triton
compiles, CUDA graph capture and torch.compile happen there and are reported apart), p50 and
p90 of `--repeats` calls; cuDNN benchmark mode on for every variant alike. Weights are
random: drawn N(0, 1/fan_in), saved as fp16 safetensors in a real diffusers folder
(benchmarks/gpu_models.py), and loaded the way users load them.

`--small` (the default without a GPU): the same code path on the CPU at tiny sizes, kernels in
Triton's interpreter, fp32, no torch.compile, kernels checked but not timed inside models
(interpreted Triton is a correctness tool, not a speed). Seconds, not minutes; the default
test suite runs it (tests/test_gpu_suite.py). Its numbers measure only the harness.
Between sections the suite frees what the last one left (harness.free_memory): the SDXL
U-Net alone is 5 GB in fp16.

    bash benchmarks/gpu_suite.sh                  # GPU machine: installs, runs, tees the log
    python benchmarks/gpu_suite.py --small --output /tmp/suite.json
    bash benchmarks/gpu_suite.sh --sections sdxl_unet --sdxl-compile
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

SMALL = "--small" in sys.argv or not torch.cuda.is_available()
if SMALL:  # before triton is imported: the kernels run in its interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fewstep.benchmarks.gpu_checks import check_grid_sync_in_graph, check_kernels  # noqa: E402
from fewstep.benchmarks.gpu_end_to_end import SDXL_TURBO, bench_turbo  # noqa: E402
from fewstep.benchmarks.gpu_kernels import bench_kernels  # noqa: E402
from fewstep.benchmarks.gpu_models import make_model_folder  # noqa: E402
from fewstep.benchmarks.gpu_quality import bench_quality  # noqa: E402
from fewstep.benchmarks.gpu_report import all_checks_ok, format_table, target_summary  # noqa: E402
from fewstep.benchmarks.gpu_unet import SDXL_STEP, bench_unet  # noqa: E402
from fewstep.benchmarks.harness import (  # noqa: E402
    cpu_name,
    cuda_card,
    free_memory,
    git_commit,
    library_versions,
    write_json,
)
from fewstep.kernels import tuning  # noqa: E402

# the targets first, untimed last
SECTIONS = ("checks", "kernels", "unet", "turbo", "sdxl_unet", "sdxl_turbo", "quality")
REPO = Path(__file__).resolve().parents[1]


def environment(device: torch.device) -> dict[str, Any]:
    """Where the run ran: library versions, the commit, the card (or the CPU, and whether
    Triton is interpreted)."""
    libraries = ("fewstep", "torch", "triton", "diffusers", "transformers", "numpy")
    env: dict[str, Any] = {
        "versions": library_versions(libraries, cuda=device.type == "cuda"),
        "commit": git_commit(REPO),
    }
    if device.type == "cuda":
        env["card"] = cuda_card(device)
    else:
        env["card"] = {
            "name": cpu_name(),
            "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        }
    return env


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What every section runs with."""

    device: torch.device
    dtype: torch.dtype
    small: bool
    warmup: int
    repeats: int
    compile_mode: str
    sdxl_compile: bool


def run(args: argparse.Namespace) -> dict[str, Any]:
    small = SMALL
    device = torch.device("cpu" if small else "cuda")
    settings = RunSettings(
        device=device,
        dtype=torch.float32 if small else torch.float16,
        small=small,
        warmup=args.warmup if args.warmup is not None else (1 if small else 10),
        repeats=args.repeats if args.repeats is not None else (3 if small else 50),
        compile_mode=args.compile_mode or ("none" if small else "reduce-overhead"),
        sdxl_compile=args.sdxl_compile,
    )
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"sections must be among {SECTIONS}, got {unknown}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every variant alike
    else:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "what": "fewstep GPU suite: kernel checks, kernels vs torch, U-Net steps (SD1.5, "
        "SDXL), SD-Turbo and SDXL-Turbo end to end, quality",
        "mode": "small-cpu" if small else "gpu",
        "env": environment(device),
        "settings": {
            "warmup": settings.warmup,
            "repeats": settings.repeats,
            "compile_mode": settings.compile_mode,
            "sdxl_compile": settings.sdxl_compile,
            "sections": sections,
        },
        "section_s": {},
    }

    def save() -> None:
        results["checks_ok"] = all_checks_ok(results)
        results["targets"] = target_summary(results)
        if args.output:
            write_json(args.output, results)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fewstep-gpu-suite-"))
    try:
        for section in sections:
            t0 = time.perf_counter()
            print(f"== {section}", flush=True)
            try:
                run_section(section, results, workdir, settings)
            except Exception:  # one broken section must not cost the others' numbers
                results.setdefault("errors", {})[section] = traceback.format_exc()[-6000:]
                print(results["errors"][section], file=sys.stderr, flush=True)
            free_memory()  # the next section starts with the device's memory free
            # what the tuned ops chose per shape, and each candidate's device time
            results["kernel_choices"] = tuning.choices()
            results["section_s"][section] = round(time.perf_counter() - t0, 1)
            save()
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    save()
    print(format_table(results), flush=True)
    if args.output:
        print(f"wrote {args.output}")
    return results


def run_section(section: str, results: dict[str, Any], workdir: Path, s: RunSettings) -> None:
    timing = (s.device, s.dtype, s.small, s.warmup)
    e2e_repeats = max(3, s.repeats // 2)
    if section == "checks":
        results["checks"] = {"kernels": check_kernels(s.device, s.small)}
        if s.device.type == "cuda":
            results["checks"]["grid_sync_in_cuda_graph"] = check_grid_sync_in_graph(s.device)
    elif section == "kernels":
        results["kernels"] = bench_kernels(s.device, s.small, s.warmup, max(s.repeats, 3))
    elif section == "unet":
        with model_folder(workdir, "sd15", s) as folder:
            results["unet"] = bench_unet(folder, *timing, s.repeats, s.compile_mode)
    elif section == "turbo":
        with model_folder(workdir, "sd_turbo", s) as folder:
            results["turbo"] = bench_turbo(folder, *timing, e2e_repeats)
    elif section == "sdxl_unet":
        with model_folder(workdir, "sdxl", s) as folder:
            results["sdxl_unet"] = bench_unet(
                folder,
                *timing,
                s.repeats,
                s.compile_mode,
                step=SDXL_STEP,
                compile_variants=s.sdxl_compile,
            )
    elif section == "sdxl_turbo":
        with model_folder(workdir, "sdxl_turbo", s) as folder:
            results["sdxl_turbo"] = bench_turbo(folder, *timing, e2e_repeats, model=SDXL_TURBO)
    elif section == "quality":
        results["quality"] = bench_quality(s.device, s.small, REPO)


@contextlib.contextmanager
def model_folder(workdir: Path, preset: str, s: RunSettings):
    """The preset's random-weight diffusers folder (gpu_models), removed after use."""
    folder = workdir / preset
    try:
        yield make_model_folder(folder, preset, s.small, s.device)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU, tiny models, interpreter")
    parser.add_argument("--output", type=Path, help="JSON results (default $OUT/gpu_suite.json)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"among {SECTIONS}")
    parser.add_argument("--warmup", type=int, help="untimed calls per case (GPU 10, small 1)")
    parser.add_argument("--repeats", type=int, help="timed calls per case (GPU 50, small 3)")
    parser.add_argument(
        "--compile-mode",
        help="torch.compile mode for the U-Net, or 'none' (GPU default reduce-overhead: "
        "CUDA graphs, as fewstep's; small: none)",
    )
    parser.add_argument(
        "--sdxl-compile",
        action="store_true",
        help="sdxl_unet: also the compiled variants (fewstep compile=True, torch.compile), "
        "minutes of compiling each; for a run of that section alone",
    )
    parser.add_argument("--workdir", help="where the random-weight models are written")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (small mode)")
    args = parser.parse_args(argv)
    if args.output is None and os.environ.get("OUT"):
        args.output = Path(os.environ["OUT"]) / "gpu_suite.json"
    results = run(args)
    return 0 if results["checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
