"""Peak memory of `fewstep export` on an SDXL-layout model, per precision and per stage.

    python -m fewstep.benchmarks.export_memory --size full \
        --out benchmarks/results/export-memory-sdxl.json

Builds a random-weight SDXL-layout folder (fewstep.benchmarks.sdxl_models; `full` is
SDXL base's size) unless `--model` names one, then exports it once per `--dtypes` entry,
each in a fresh process so that each export's peak resident memory (max RSS, what the
kernel counts against the machine's RAM) is its own. That process samples its RSS every
`SAMPLE_S` seconds and tags each sample with the export stage running (load, export unet,
verify, ...), so the result says which stage sets the peak. Reported per precision: peak
RSS overall (getrusage's max RSS, which no sampling can miss) and per stage, each stage's
seconds, and the package's size on disk; per model, its parameters per component.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fewstep.benchmarks.harness import cpu_name, git_commit, library_versions, write_json

SAMPLE_S = 0.2
GB = 1e9
LIBRARIES = ("fewstep", "torch", "diffusers", "transformers", "onnx", "onnxruntime")


def _ram_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(src: str, out: str, dtype: str, report: str) -> None:
    """Export `src` to `out` in this process, sampling RSS per stage; write `report`."""
    from fewstep.export import export_package, progress

    stage = ["start"]
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_S):
            rss = _rss_bytes()
            peaks[stage[0]] = max(peaks.get(stage[0], 0), rss)

    original = progress.StageLog.stage

    @contextlib.contextmanager
    def tagged(self: Any, name: str) -> Iterator[None]:
        stage[0] = name
        with original(self, name):
            yield
        peaks[name] = max(peaks.get(name, 0), _rss_bytes())

    progress.StageLog.stage = tagged  # type: ignore[method-assign]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    export_package(src, out, dtype=dtype)
    seconds = time.perf_counter() - start
    done.set()
    manifest = json.loads((Path(out) / "fewstep.json").read_text())
    result = {
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 2),
        "peak_rss_gb_by_stage": {k: round(v / GB, 2) for k, v in peaks.items()},
        "stage_seconds": manifest["export_seconds"],
        "seconds": round(seconds, 1),
        "package_gb": round(sum(f.stat().st_size for f in Path(out).rglob("*")) / GB, 2),
    }
    Path(report).write_text(json.dumps(result))


def _parameters(folder: Path) -> dict[str, int]:
    """Parameters per component, from the safetensors headers (no weights read)."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for component in ("text_encoder", "text_encoder_2", "unet", "vae"):
        total = 0
        for file in sorted((folder / component).glob("*.safetensors")):
            with safe_open(str(file), "np") as f:
                for key in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    shape = f.get_slice(key).get_shape()
                    count = 1
                    for dim in shape:
                        count *= dim
                    total += count
        counts[component] = total
    return counts


def run(size: str, dtypes: list[str], model: Path | None, work: Path) -> dict[str, Any]:
    from fewstep.benchmarks.sdxl_models import make_sdxl_model

    if model is None:
        model = make_sdxl_model(work / f"sdxl-{size}", size)
    results: dict[str, Any] = {
        "machine": {"cpu": cpu_name(), "ram_gb": round(_ram_bytes() / GB, 1)},
        "commit": git_commit(),
        "libraries": library_versions(LIBRARIES),
        "model": {"size": size, "parameters": _parameters(model)},
        "exports": {},
    }
    for dtype in dtypes:
        out, report = work / f"package-{dtype}", work / f"report-{dtype}.json"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "fewstep.benchmarks.export_memory", "--worker"]
        subprocess.run([*command, str(model), str(out), dtype, str(report)], check=True)
        results["exports"][dtype] = json.loads(report.read_text())
        print(f"{dtype}: {results['exports'][dtype]}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--worker":
        _worker(*args[1:])
        return
    from fewstep.benchmarks.sdxl_models import SDXL_SIZES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SDXL_SIZES, default="full")
    parser.add_argument("--dtypes", nargs="+", choices=("fp16", "fp32"), default=["fp16", "fp32"])
    parser.add_argument("--model", type=Path, help="an SDXL diffusers folder to export instead")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON result to write")
    options = parser.parse_args(args)
    with contextlib.ExitStack() as stack:
        work = options.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        results = run(options.size, options.dtypes, options.model, work)
    write_json(options.out, results)


if __name__ == "__main__":
    main()
