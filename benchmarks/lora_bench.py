"""LoRA fold, unfold and apply timings on this machine, for a full-size SD1.5 U-Net (not a test).

What: a rank-64 LoRA (random weights, kohya layout, alpha 32) on every attention projection
(to_q, to_k, to_v, to_out.0 of attn1 and attn2 in the 16 transformer blocks: 128 weights) of
a U-Net built by diffusers from the SD1.5 config (random weights, no download), fp32.

Stages, each timed on its own (p50 and p90 over --repeats, milliseconds):
1. `read_lora`: parse, check (finite values, shapes), sha256 of the file.
2. torch: `fold_lora_torch` (the first fold also keeps the pristine copies), a refold (set a
   different scale: pristine + delta again), `unfold_lora_torch`.
3. numpy: `plan_fold` + every delta (the math of the ONNX path).
4. ONNX: the U-Net exported alone (TorchScript exporter + lora_map.json, as `fewstep export`
   does; 3.4 GB fp32, so its weights live in model.onnx_data) inside a package whose other
   graphs are the tiny sd1 model's:
   - `lora_initializers`: read the 128 base initializers from the files and fold;
   - onnxruntime session creation, plain and with the LoRA (`add_external_initializers`);
   - `apply_loras_to_package`: verify the source, copy, patch the 128 tensors in place,
     re-hash into the manifest;
   - check: one U-Net call at a 16×16 latent with the LoRA folded at load, against the torch
     U-Net with `fold_lora_torch` (max abs difference).
5. Why not `SessionOptions.add_initializer`: on a mid-size U-Net with embedded weights and a
   LoRA that also covers the ResNet 3×3 convs, session creation from the in-memory patched
   graph (fewstep's way) against `add_initializer`, and the output error of each against the
   graph with the weights written into the file (`apply`).

    python benchmarks/lora_bench.py --output benchmarks/results/cpu-lora.json
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.benchmarks.harness import cpu_name, git_commit, library_versions, wall_ms, write_json
from fewstep.export.graphs import unet_spec
from fewstep.export.lora_map import write_lora_map
from fewstep.export.onnx_io import export_graph
from fewstep.lora import (
    apply_loras_to_package,
    fold_lora_torch,
    lora_initializers,
    plan_fold,
    read_lora,
    unfold_lora_torch,
)
from fewstep.lora.onnx_package import package_graph_weights, patched_model
from fewstep.package import write_manifest

SD15_UNET = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
MID_UNET = {**SD15_UNET, "block_out_channels": (64, 128, 256, 256)}  # fewstep bench's `mid`
ATTENTION = (".to_q", ".to_k", ".to_v", ".to_out.0")
RANK, ALPHA = 64, 32.0
# Whose versions a result records.
LIBRARIES = ("fewstep", "numpy", "torch", "diffusers", "onnx", "onnxruntime", "safetensors")


def make_unet(config: dict, seed: int = 0) -> Any:
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1:  # zero-initialised outputs redrawn, variance preserving
                p.normal_(0.0, 1.0 / np.sqrt(p[0].numel()))
    return unet


def write_kohya_lora(unet: Any, path: Path, suffixes: tuple[str, ...], seed: int) -> int:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if not name.endswith(suffixes):
            continue
        w = module.weight
        key = "lora_unet_" + name.replace(".", "_")
        tail = tuple(w.shape[2:])  # conv kernel
        down = rng.standard_normal((RANK, w.shape[1], *tail), dtype=np.float32)
        up = rng.standard_normal((w.shape[0], RANK, *((1, 1) if tail else ())), dtype=np.float32)
        tensors[f"{key}.lora_down.weight"] = down / np.sqrt(down[0].size)
        tensors[f"{key}.lora_up.weight"] = 0.05 * up / np.sqrt(RANK)
        tensors[f"{key}.alpha"] = np.array(ALPHA, dtype=np.float32)
    save_file(tensors, str(path))
    return len(tensors) // 3


def unet_inputs(side: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "sample": rng.standard_normal((1, 4, side, side), dtype=np.float32),
        "timestep": np.array(421.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((1, 77, 768), dtype=np.float32),
    }


def torch_unet_out(unet: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return unet(
            torch.from_numpy(feed["sample"]),
            torch.from_numpy(feed["timestep"]),
            torch.from_numpy(feed["encoder_hidden_states"]),
        ).sample.numpy()


def export_unet_alone(unet: Any, graph_dir: Path) -> float:
    """The U-Net as `fewstep export` writes it (graph + lora_map.json); returns seconds."""
    vae_stub = types.SimpleNamespace(config=types.SimpleNamespace(block_out_channels=(1,) * 4))
    spec = unet_spec(unet, vae_stub)
    module = spec.make_module()
    t0 = time.perf_counter()
    args = spec.torch_args(spec.sample_inputs(1, 16, 16, seed=0), "fp32")
    export_graph(spec, module, args, graph_dir, opset=18)
    write_lora_map(graph_dir, "unet", module)
    (graph_dir / "config.json").write_text(json.dumps(dict(unet.config), default=list))
    return time.perf_counter() - t0


def package_with_unet(tiny_package: Path, unet: Any, out: Path) -> tuple[Path, float]:
    shutil.copytree(tiny_package, out, ignore=shutil.ignore_patterns("unet", "fewstep.json"))
    seconds = export_unet_alone(unet, out / "unet")
    write_manifest(out, {"loras": [], "note": "lora_bench: SD1.5 U-Net + tiny sd1 graphs"})
    return out, seconds


def ort_session(ort: Any, model: str | bytes, options: Any | None = None) -> Any:
    return ort.InferenceSession(
        model, sess_options=options or ort.SessionOptions(), providers=["CPUExecutionProvider"]
    )


def external_options(ort: Any, values: dict[str, np.ndarray], keep: list) -> Any:
    options = ort.SessionOptions()
    ort_values = [ort.OrtValue.ortvalue_from_numpy(v) for v in values.values()]
    keep.append(ort_values)
    options.add_external_initializers(list(values), ort_values)
    return options


def bench_sd15(work: Path, tiny_package: Path, repeats: int, config: dict) -> dict[str, Any]:
    import onnxruntime as ort

    results: dict[str, Any] = {"unet_config": {k: config[k] for k in ("block_out_channels",)}}
    t0 = time.perf_counter()
    unet = make_unet(config)
    results["build_unet_s"] = time.perf_counter() - t0
    lora_path = work / "attention_rank64.safetensors"
    results["lora_layers"] = write_kohya_lora(unet, lora_path, ATTENTION, seed=0)
    results["lora_file_mb"] = lora_path.stat().st_size / 1e6
    results["unet_params_m"] = sum(p.numel() for p in unet.parameters()) / 1e6

    results["read_lora_ms"] = wall_ms(lambda: read_lora(lora_path), repeats)
    lora = read_lora(lora_path)
    modules = {"unet": unet}

    # torch, in place
    results["torch_first_fold_ms"] = wall_ms(
        lambda: fold_lora_torch(modules, [(lora, 1.0)]),
        repeats,
        setup=lambda: unfold_lora_torch(modules),
    )
    fold_lora_torch(modules, [(lora, 1.0)])
    results["torch_refold_ms"] = wall_ms(lambda: fold_lora_torch(modules, [(lora, 0.7)]), repeats)
    results["torch_unfold_ms"] = wall_ms(
        lambda: unfold_lora_torch(modules),
        repeats,
        setup=lambda: fold_lora_torch(modules, [(lora, 1.0)]),
    )

    # numpy: resolution + deltas
    shapes = {"unet": {n: tuple(p.shape) for n, p in unet.named_parameters()}}
    results["numpy_plan_and_deltas_ms"] = wall_ms(
        lambda: [f.delta() for f in plan_fold([(lora, 1.0)], shapes)], repeats
    )

    feed = unet_inputs(16)
    fold_lora_torch(modules, [(lora, 1.0)])
    torch_folded = torch_unet_out(unet, feed)
    unfold_lora_torch(modules)
    torch_base = torch_unet_out(unet, feed)

    package, export_s = package_with_unet(tiny_package, unet, work / "sd15-package")
    results["export_unet_s"] = export_s
    modules.clear()  # drop the torch U-Net before onnxruntime loads its copy
    del unet
    gc.collect()
    results["unet_onnx_bytes"] = sum(
        p.stat().st_size for p in (package / "unet").iterdir() if p.is_file()
    )

    results["map_and_index_ms"] = wall_ms(lambda: package_graph_weights(package), repeats)
    results["lora_initializers_ms"] = wall_ms(
        lambda: lora_initializers(package, [(lora, 1.0)]), repeats
    )
    values = lora_initializers(package, [(lora, 1.0)])["unet"]
    model = package / "unet" / "model.onnx"
    keep: list = []

    def lora_session() -> Any:  # what OnnxRuntimeBackend does
        patched, external = patched_model(model, values)
        options = external_options(ort, external, keep) if external else None
        return ort_session(ort, patched if patched is not None else str(model), options)

    patched, external = patched_model(model, values)
    results["lora_weights_stored"] = "external data" if external else "embedded"
    results["ort_session_plain_ms"] = wall_ms(lambda: ort_session(ort, str(model)), repeats)
    results["ort_session_with_lora_ms"] = wall_ms(lora_session, repeats)
    del patched, external
    session = lora_session()
    ours = session.run(None, feed)[0]
    plain = ort_session(ort, str(model)).run(None, feed)[0]
    del session
    results["check"] = {
        "latent": [16, 16],
        "max_abs_diff_onnx_lora_vs_torch_lora": float(np.abs(ours - torch_folded).max()),
        "max_abs_diff_onnx_base_vs_torch_base": float(np.abs(plain - torch_base).max()),
        "max_abs_lora_effect": float(np.abs(torch_folded - torch_base).max()),
    }

    def apply_once() -> None:
        out = work / "applied"
        shutil.rmtree(out, ignore_errors=True)
        apply_loras_to_package(package, [(lora, 1.0)], out)

    results["apply_package_ms"] = wall_ms(apply_once, max(1, repeats // 2))
    shutil.rmtree(work / "applied", ignore_errors=True)
    shutil.rmtree(package, ignore_errors=True)
    return results


def bench_add_initializer(work: Path, tiny_package: Path, repeats: int) -> dict[str, Any]:
    """Embedded weights: in-memory patched graph vs add_initializer (and its Conv bug)."""
    import onnxruntime as ort

    unet = make_unet(MID_UNET)
    lora_path = work / "mid_attention_conv1.safetensors"
    layers = write_kohya_lora(unet, lora_path, (*ATTENTION, ".conv1"), seed=1)
    package, export_s = package_with_unet(tiny_package, unet, work / "mid-package")
    del unet
    gc.collect()
    lora = read_lora(lora_path)
    values = lora_initializers(package, [(lora, 1.0)])["unet"]
    model = package / "unet" / "model.onnx"
    applied = work / "mid-applied"
    apply_loras_to_package(package, [(lora, 1.0)], applied)
    feed = unet_inputs(16)
    reference = ort_session(ort, str(applied / "unet" / "model.onnx")).run(None, feed)[0]

    def add_initializer_options() -> Any:
        options = ort.SessionOptions()
        for name, value in values.items():
            ov = ort.OrtValue.ortvalue_from_numpy(value)
            keep.append((ov, value))
            options.add_initializer(name, ov)
        return options

    keep: list = []
    out: dict[str, Any] = {
        "unet": "SD1.5 layout at block_out_channels (64, 128, 256, 256), fp32, embedded weights",
        "unet_onnx_bytes": model.stat().st_size,
        "lora_layers": layers,
        "export_unet_s": export_s,
        "ort_session_plain_ms": wall_ms(lambda: ort_session(ort, str(model)), repeats),
        "patch_graph_bytes_ms": wall_ms(lambda: patched_model(model, values), repeats),
        "ort_session_patched_bytes_ms": wall_ms(
            lambda: ort_session(ort, patched_model(model, values)[0]), repeats
        ),
        "ort_session_add_initializer_ms": wall_ms(
            lambda: ort_session(ort, str(model), add_initializer_options()), repeats
        ),
    }
    patched_out = ort_session(ort, patched_model(model, values)[0]).run(None, feed)[0]
    add_init_out = ort_session(ort, str(model), add_initializer_options()).run(None, feed)[0]
    base_out = ort_session(ort, str(model)).run(None, feed)[0]
    out["max_abs_diff_vs_applied_file"] = {
        "patched_bytes": float(np.abs(patched_out - reference).max()),
        "add_initializer": float(np.abs(add_init_out - reference).max()),
        "no_lora": float(np.abs(base_out - reference).max()),
    }
    shutil.rmtree(package, ignore_errors=True)
    shutil.rmtree(applied, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None, help="JSON file for the results")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument(
        "--size", choices=("sd15", "mid"), default="sd15", help="mid: a quick run of the harness"
    )
    args = parser.parse_args(argv)

    from fewstep.export import export_package
    from fewstep.export.testing import make_tiny_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tiny = make_tiny_model(work / "tiny-sd1", "sd1")
    tiny_package = export_package(tiny, work / "tiny-sd1-package", progress=False)
    results = {
        "what": (
            f"rank-{RANK} LoRA (alpha {ALPHA}, random weights, kohya layout) on every attention "
            "projection (to_q/to_k/to_v/to_out.0, attn1+attn2) of a random-weight SD1.5-layout "
            "U-Net, fp32; ms are p50/p90 over repeats"
        ),
        "where": {
            "device": cpu_name(),
            "torch_threads": torch.get_num_threads(),
            "versions": library_versions(LIBRARIES),
            "commit": git_commit(),
        },
        "repeats": args.repeats,
        "sd15_unet": bench_sd15(
            work, tiny_package, args.repeats, SD15_UNET if args.size == "sd15" else MID_UNET
        ),
        "ort_override_methods": bench_add_initializer(work, tiny_package, args.repeats),
    }
    print(json.dumps(results, indent=2))
    if args.output:
        write_json(Path(args.output), results)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
