"""SDXL packages between fewstep and Hugging Face optimum, both ways, on the tiny SDXL model.

1. optimum's exporter (`optimum.exporters.onnx.main_export`, task text-to-image) writes the
   package; fewstep runs it on onnxruntime like diffusers' StableDiffusionXLPipeline.
2. fewstep's package loads in optimum's `ORTStableDiffusionXLPipeline`, whose images match
   diffusers' and fewstep's.

References: diffusers' StableDiffusionXLPipeline in torch fp32 on the tiny folder, through
sdxl_parity.py's cases and runner (the same latents and noise on every side: optimum's side
gets the runner's own `call_of`), within conftest's image tolerance. optimum-onnx 0.1.0
requires transformers<4.58, so optimum runs in a subprocess from an overlay of older packages
(tests/optimum_side.py has the pins and the command that builds it; .ci/run builds it at
`.optimum-overlay`, FEWSTEP_OPTIMUM_OVERLAY points elsewhere). Without a working overlay
these tests are skipped, saying why.

What optimum writes differs from fewstep's package only where the runtime does not look:
dynamic axis names (`batch_size`, `sequence_length`, … against `batch`, `sequence`, …, and
`text_embeds` of text_encoder_2 declared [batch_size, sequence_length] for its [batch,
projection_dim]), tokenizers as vocab.json + merges.txt (+ special_tokens_map.json) without
tokenizer.json, no fewstep.json or lora_map.json; I/O names, their order, dtypes, opset, the
folders and `model.onnx_data` are the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import optimum_side  # noqa: E402
from conftest import IMAGE_TOLERANCE  # noqa: E402
from sdxl_parity import CASES_BY_ID, NOISE_SEED, SCHEDULERS, call_of, run_case  # noqa: E402

OVERLAY_ENV = "FEWSTEP_OPTIMUM_OVERLAY"
OVERLAY = Path(
    os.environ.get(OVERLAY_ENV) or Path(__file__).resolve().parents[1] / ".optimum-overlay"
)
GRAPHS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
# Guided with prompt_2 and both negatives (DDIM, non-square); the package's own Euler with
# the size conditioning and guidance_rescale; 2 prompts x 2 images with a prompt_2 list.
CASE_IDS = (
    "ddim-cfg-prompt2-negatives-wide",
    "euler-default-cfg-sizes-rescale",
    "euler-cfg-n2-prompt2-list",
)


def _skip_reason(problem: str, remedy: str = "build it with") -> str:
    return (
        f"optimum-onnx 0.1.0 requires transformers<4.58 (this environment has "
        f"{_installed('transformers')}), so optimum runs from an overlay of older packages: "
        f"{problem}; {remedy} `{optimum_side.install_command(OVERLAY)}` (or set "
        f"{OVERLAY_ENV} to one)"
    )


def _installed(name: str) -> str:
    from importlib.metadata import version

    return f"{name} {version(name)}"


# A missing or incomplete overlay skips the module before any model is built.
OVERLAY_PROBLEM = optimum_side.overlay_problem(OVERLAY)
pytestmark = pytest.mark.skipif(
    OVERLAY_PROBLEM is not None, reason=_skip_reason(OVERLAY_PROBLEM or "")
)


def run_optimum_side(*args: str | Path, timeout: float) -> None:
    """tests/optimum_side.py with the overlay first on PYTHONPATH; skips when optimum does not
    import from it, fails on any other error."""
    path = [str(OVERLAY), *filter(None, [os.environ.get("PYTHONPATH")])]
    proc = subprocess.run(
        [sys.executable, optimum_side.__file__, *map(str, args)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode == optimum_side.OVERLAY_BROKEN:
        last = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        problem = f"the overlay at {OVERLAY} does not serve: {last[0]}"
        pytest.skip(_skip_reason(problem, remedy="delete it and build it again with"))
    assert proc.returncode == 0, f"optimum_side.py {args[0]} failed:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def optimum_package(tiny_model, tmp_path_factory):
    """The tiny SDXL folder exported by optimum's own exporter."""
    out = tmp_path_factory.mktemp("optimum-sdxl") / "package"
    run_optimum_side("export", tiny_model("sdxl"), out, timeout=300)
    return out


@pytest.fixture(scope="module")
def optimum_images(sdxl_package, tmp_path_factory):
    """case id -> the images optimum's ORTStableDiffusionXLPipeline makes of fewstep's
    package, every case in one subprocess."""
    work = tmp_path_factory.mktemp("optimum-run")
    cases = []
    for case_id in CASE_IDS:
        case = CASES_BY_ID[case_id]
        latents, kwargs = call_of(case)
        np.save(work / f"{case_id}-latents.npy", latents)
        cases.append(
            {
                "id": case_id,
                "prompts": list(case.prompts),
                "latents": str(work / f"{case_id}-latents.npy"),
                "scheduler": None if case.sampler is None else SCHEDULERS[case.sampler].__name__,
                "seed": NOISE_SEED,
                "kwargs": kwargs,
            }
        )
    (work / "cases.json").write_text(json.dumps(cases))
    run_optimum_side("run", sdxl_package, work / "cases.json", work / "images", timeout=300)
    return {case_id: np.load(work / "images" / f"{case_id}.npy") for case_id in CASE_IDS}


def graph_io(package: Path, graph: str) -> tuple[list, list]:
    """(inputs, outputs) of a graph as (name, element type, rank), in the graph's order."""
    model = onnx.load(str(package / graph / "model.onnx"), load_external_data=False)

    def describe(values) -> list:
        return [
            (v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))
            for v in values
        ]

    return describe(model.graph.input), describe(model.graph.output)


# ---------------------------------------------------------------------------------------------
# 1. optimum's export in fewstep
# ---------------------------------------------------------------------------------------------


def test_optimums_export_has_fewsteps_graph_io_and_folders(optimum_package, sdxl_package):
    """The names fewstep's runtime feeds and reads, in the same order and types; and what the
    runs below then read: the graphs' weights from optimum's `model.onnx_data`, the
    tokenizers from vocab.json + merges.txt alone, no manifest."""
    for graph in GRAPHS:
        assert graph_io(optimum_package, graph) == graph_io(sdxl_package, graph), graph
        model = onnx.load(str(optimum_package / graph / "model.onnx"), load_external_data=False)
        locations = {
            entry.value
            for tensor in model.graph.initializer
            for entry in tensor.external_data
            if entry.key == "location"
        }
        assert locations == {"model.onnx_data"}, graph  # so fewstep read optimum's data file
    for tokenizer in ("tokenizer", "tokenizer_2"):
        files = {p.name for p in (optimum_package / tokenizer).iterdir()}
        assert {"vocab.json", "merges.txt"} <= files and "tokenizer.json" not in files, files
    assert not (optimum_package / "fewstep.json").exists()


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_fewstep_runs_optimums_export_like_diffusers(
    case_id, optimum_package, package_pipelines, sdxl_references
):
    case = CASES_BY_ID[case_id]
    got, expected = run_case(
        case, package_pipelines(optimum_package), sdxl_references("sdxl", case.sampler)
    )
    err = float(np.abs(got - expected).max())
    print(f"{case_id}: fewstep on optimum's export vs diffusers max abs error {err:.2e}")
    assert err <= IMAGE_TOLERANCE


# ---------------------------------------------------------------------------------------------
# 2. fewstep's package in optimum
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_optimum_runs_fewsteps_package_like_diffusers_and_fewstep(
    case_id, sdxl_package, optimum_images, package_pipelines, sdxl_references
):
    case = CASES_BY_ID[case_id]
    ours, expected = run_case(
        case, package_pipelines(sdxl_package), sdxl_references("sdxl", case.sampler)
    )
    theirs = optimum_images[case_id]
    assert theirs.shape == expected.shape
    to_diffusers = float(np.abs(theirs - expected).max())
    to_fewstep = float(np.abs(theirs - ours).max())
    print(f"{case_id}: optimum on fewstep's package vs diffusers {to_diffusers:.2e}, "
          f"vs fewstep {to_fewstep:.2e}")  # fmt: skip
    assert to_diffusers <= IMAGE_TOLERANCE
    assert to_fewstep <= IMAGE_TOLERANCE
