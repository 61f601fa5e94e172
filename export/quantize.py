"""Post-training int8 quantization of a package's U-Net: `fewstep quantize PKG --out OUT`.

    quantize_package("sd15-onnx", "sd15-int8")                  # built-in calibration prompts
    quantize_package("sd15-onnx", "sd15-int8", prompts=[...])   # the prompts you will serve

Steps:
1. calibrate: the package's own pipeline (OpenVINO, fp32) generates each calibration prompt
   (seed i for prompt i, the model's default size and guidance, `num_inference_steps` steps)
   and every U-Net call's inputs are kept: the activations the quantized U-Net will see;
2. quantize: NNCF's post-training quantization of the U-Net graph as OpenVINO reads it
   (`nncf.quantize`, transformer preset: int8 weights, one scale per output channel, and
   int8 activations into the matrix products, with SmoothQuant and bias correction),
   statistics taken over every kept call;
3. write: a copy of the package in which `unet/openvino_model.xml` + `.bin` (the int8 graph,
   dynamic shapes as exported) replace `unet/model.onnx` (+ data), the manifest records
   `graphs.unet.precision = "int8"`, `graphs.unet.format = "openvino"` and how it was
   calibrated (`quantization`). Atomic: nothing is left at `out` on any error.

Why NNCF on OpenVINO (docs/performance.md#int8-u-net): it is the library made for OpenVINO's
int8 kernels, and on the full SD 1.5 U-Net it ran where onnxruntime's static quantization ran
out of memory. The int8 package therefore runs on the openvino backend only; onnxruntime
refuses it by name, and LoRAs fold into the package before quantizing, not after.

Limits: the U-Net only (the VAE and text encoders keep their precision); every check (the
package's files and hashes, an already-quantized U-Net, the prompts, `out`) runs before the
first U-Net call. NNCF holds the fp32 graph, its statistics and the int8 graph at once: about
13 GB for SD 1.5's U-Net.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.atomic_folder import atomic_folder, check_new_folder
from fewstep.export.progress import StageLog
from fewstep.package import (
    MANIFEST_NAME,
    ONNX_GRAPH,
    OPENVINO_GRAPH,
    PackageError,
    graph_file,
    verify_package,
    write_manifest,
)

# Varied subjects, styles and layouts, so the calibration sees the activations of more than
# one kind of picture.
CALIBRATION_PROMPTS = (
    "a photo of a cat sitting on a sofa",
    "a mountain lake at sunset, oil painting",
    "a red circle and a blue square on a white background",
    "portrait of an old fisherman, dramatic lighting",
    "a city street at night in the rain, neon signs",
    "a bowl of fruit on a wooden table, still life",
    "an astronaut riding a horse on the moon",
    "a watercolor map of a small island",
)
CALIBRATION_STEPS = 4
NNCF_PRESET = "transformer"  # nncf.ModelType.TRANSFORMER
STAGES = ["calibrate", "quantize", "write"]


def check_prompts(prompts: Any) -> list[str]:
    """The calibration prompts as a list: non-empty strings, at least one."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.200}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompts[{i}] must be a non-empty string, got {prompt!r:.200}")
    return list(prompts)


def quantize_package(
    package: str | Path,
    out: str | Path,
    prompts: Sequence[str] = CALIBRATION_PROMPTS,
    num_inference_steps: int = CALIBRATION_STEPS,
    progress: bool = True,
) -> Path:
    """Write `out`: `package` with its U-Net quantized to int8 (module docstring); returns it.

    prompts: what the calibration generates (default CALIBRATION_PROMPTS): the closer to the
        prompts the package will serve, the better the scales fit them.
    num_inference_steps: steps per calibration image; each step's U-Net inputs count.
    """
    root, out_path = Path(package), Path(out)
    prompts = check_prompts(prompts)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    check_new_folder(out_path, root)
    manifest = verify_package(root) or {}
    unet = graph_file(root, "unet")
    if unet is None or unet.name != ONNX_GRAPH:
        raise PackageError(f"{unet}: this package's U-Net is already quantized")
    openvino, nncf = _quantization_libraries()
    log = StageLog(STAGES, enabled=progress, tool="quantize")

    with log.stage("calibrate"):
        samples = calibration_inputs(root, prompts, num_inference_steps)
        log.note(f"{len(samples)} U-Net calls from {len(prompts)} prompts")
    with log.stage("quantize"):
        model = openvino.Core().read_model(str(unet))
        quantized = nncf.quantize(
            model,
            nncf.Dataset(samples),
            subset_size=len(samples),
            model_type=nncf.ModelType(NNCF_PRESET),
        )
        del model
    with atomic_folder(out_path) as tmp, log.stage("write"):
        _copy_package(root, tmp)
        openvino.save_model(quantized, tmp / "unet" / OPENVINO_GRAPH, compress_to_fp16=False)
        calibration = {
            "prompts": prompts,
            "num_inference_steps": num_inference_steps,
            "unet_calls": len(samples),
            "backend": "openvino fp32",
        }
        write_manifest(tmp, _int8_manifest(manifest, calibration, log.seconds))
    return out_path


def calibration_inputs(
    package: Path, prompts: list[str], num_inference_steps: int
) -> list[dict[str, np.ndarray]]:
    """The inputs of every U-Net call while the package's pipeline (OpenVINO fp32, the
    model's default size and guidance) generates prompt i from seed i."""
    from fewstep.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(package, backend="openvino", precision="fp32")
    backend_run = pipe.backend.run
    samples: list[dict[str, np.ndarray]] = []

    def recording_run(graph: str, **inputs: Any) -> dict[str, Any]:
        if graph == "unet":
            samples.append({name: np.array(value) for name, value in inputs.items()})
        return backend_run(graph, **inputs)

    pipe.backend.run = recording_run  # type: ignore[method-assign]
    for seed, prompt in enumerate(prompts):
        pipe(prompt, num_inference_steps=num_inference_steps, seed=seed, output_type="np")
    return samples


def _quantization_libraries() -> tuple[Any, Any]:
    try:
        import nncf
        import openvino
    except ImportError as e:
        raise ImportError(
            f"fewstep quantize needs NNCF and OpenVINO ({e.name} is missing): "
            "pip install 'fewstep[quantize]'"
        ) from e
    return openvino, nncf


def _copy_package(root: Path, tmp: Path) -> None:
    """Every file of the package but its U-Net's graph and the files that only serve it
    (external weights, the LoRA map) and engines/ (built for the old U-Net)."""
    for item in sorted(root.iterdir()):
        if item.name in ("engines", "unet", MANIFEST_NAME):
            continue
        if item.is_dir():
            shutil.copytree(item, tmp / item.name)
        else:
            shutil.copy2(item, tmp / item.name)
    (tmp / "unet").mkdir()
    shutil.copy2(root / "unet" / "config.json", tmp / "unet" / "config.json")


def _int8_manifest(
    manifest: dict[str, Any], calibration: dict[str, Any], seconds: dict[str, float]
) -> dict[str, Any]:
    new = {k: v for k, v in manifest.items() if k not in ("files", "manifest_version")}
    graphs = dict(new.get("graphs", {}))
    # the graph's inputs and outputs stay; the export's verification was of the fp32 graph
    io = {k: v for k, v in graphs.get("unet", {}).items() if k in ("inputs", "outputs")}
    graphs["unet"] = {**io, "precision": "int8", "format": "openvino"}
    new["graphs"] = graphs
    new["quantization"] = {
        "method": f"nncf.quantize, {NNCF_PRESET} preset, post-training",
        "versions": {name: _version(name) for name in ("nncf", "openvino")},
        "calibration": calibration,
        "seconds": dict(seconds),
    }
    return new


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
