"""Verification: every exported graph against its torch module, on onnxruntime's CPU.

Each graph runs on seeded random inputs (batch 2, a non-square latent; neither is the shape
the graph was traced at, so the dynamic axes are exercised too) with onnxruntime's
CPUExecutionProvider, and so does its fp32 torch module, on exactly the values the graph sees
(fp16 inputs are rounded to fp16 first, so the error measures the graph's arithmetic only).

    max_abs_error = max |onnx - torch|                      over all outputs
    max_rel_error = max_abs_error / max |torch|             (per output, then the max)

fp32 graphs fail verification above `FP32_MAX_REL_ERROR`; fp16 graphs are reported, and
fail only on non-finite outputs (e.g. a VAE overflowing in fp16).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.export.graphs import GraphSpec

FP32_MAX_REL_ERROR = 1e-4
VERIFY_BATCH = 2
VERIFY_SEED = 1234


class VerificationError(RuntimeError):
    """An exported graph does not reproduce its torch module."""


@dataclasses.dataclass(frozen=True)
class GraphError:
    graph: str
    precision: str  # fp32 | fp16: the graph's own float precision
    max_abs_error: float
    max_rel_error: float
    finite: bool
    input_shapes: dict[str, tuple[int, ...]]

    def summary(self) -> str:
        shapes = ", ".join(f"{k} {list(v)}" for k, v in self.input_shapes.items())
        return (
            f"verify {self.graph} ({self.precision}): max abs error {self.max_abs_error:.3g}, "
            f"max rel error {self.max_rel_error:.3g}  [{shapes}]"
        )


def verification_latent_size(latent_multiple: int) -> tuple[int, int]:
    """A non-square latent (2m x 3m); the export traces at a square one (see package_writer)."""
    return 2 * latent_multiple, 3 * latent_multiple


def run_onnx(path: Path, feed: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    # Basic optimizations only: what is checked is the graph as exported, not onnxruntime's
    # CPU-specific rewrites (blocked conv layouts, fusions), which hold more weight copies.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(output_names, feed)


def run_torch(spec: GraphSpec, module: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The fp32 torch module on float32 copies of `inputs`."""
    import torch

    as_fp32 = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in inputs.items()}
    with torch.no_grad():
        out = module(*spec.torch_args(as_fp32, "fp32"))
    outs = out if isinstance(out, tuple) else (out,)
    return [o.float().numpy() for o in outs]


def compare_outputs(
    graph: str, got: list[np.ndarray], ref: list[np.ndarray]
) -> tuple[float, float, bool]:
    """(max abs error, max rel error, all finite) of `got` against `ref`, output by output."""
    max_abs = max_rel = 0.0
    finite = True
    for g, r in zip(got, ref, strict=True):
        if g.shape != r.shape:
            raise VerificationError(f"{graph}: output shape {g.shape} != torch's {r.shape}")
        g = g.astype(np.float64)
        finite = finite and bool(np.isfinite(g).all())
        err = float(np.abs(g - r).max())
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / max(float(np.abs(r).max()), 1e-30))
    return max_abs, max_rel, finite


@dataclasses.dataclass(frozen=True)
class Reference:
    """What a graph must reproduce: its inputs as the graph takes them, and the fp32 torch
    module's outputs on exactly those values."""

    feed: dict[str, np.ndarray]
    outputs: list[np.ndarray]


def reference_outputs(
    spec: GraphSpec,
    module: Any,
    precision: str,
    latent_size: tuple[int, int],
    batch: int = VERIFY_BATCH,
    seed: int = VERIFY_SEED,
) -> Reference:
    """The fp32 module's outputs on seeded inputs in the graph's precision: taken before the
    export converts or frees the module, compared with the graph after (`check_graph`)."""
    inputs = spec.sample_inputs(batch, *latent_size, seed=seed)
    feed = spec.cast_inputs(inputs, precision)
    return Reference(feed, run_torch(spec, module, feed))


def check_graph(
    spec: GraphSpec, onnx_path: Path, precision: str, reference: Reference
) -> GraphError:
    """Measure one graph's error against its reference; raise when it is unusable."""
    got = run_onnx(onnx_path, reference.feed, spec.output_names)
    max_abs, max_rel, finite = compare_outputs(spec.name, got, reference.outputs)
    error = GraphError(
        graph=spec.name,
        precision=precision,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        finite=finite,
        input_shapes={k: tuple(v.shape) for k, v in reference.feed.items()},
    )
    check_graph_error(error)
    return error


def check_graph_error(error: GraphError) -> None:
    if not error.finite:
        raise VerificationError(f"{error.summary()}: onnxruntime output has NaN or inf")
    if error.precision == "fp32" and not error.max_rel_error <= FP32_MAX_REL_ERROR:
        raise VerificationError(
            f"{error.summary()}: max rel error exceeds {FP32_MAX_REL_ERROR:g} "
            "(the exported graph does not reproduce the torch module)"
        )
