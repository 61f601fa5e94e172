"""The GPU suite's quality check: the shipped default model on the device, scored.

The default model through the torch backend, fp32 and fp16 with the default kernels, scored
by the scenes analyzer (training/scenes.py) on its evaluation prompts: the quality yardstick
of every precision and kernel change. Not timed. It reads training/ from the checkout at
`repo` (a folder of the source tree, not installed). On the CPU (`small`): three prompts of
each kind, fp32 only (the code path, not a measurement).

`bench_quality(device, small, repo)` is the suite's `quality` section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.benchmarks.harness import free_memory, import_training


def bench_quality(device: torch.device, small: bool, repo: Path) -> dict[str, Any]:
    """The shipped default model (LCM, 4 steps, guidance 8.5) on the scenes'
    evaluation prompts through the torch backend: fp32, then fp16 with the default kernels;
    each image scored by the analyzer. Prompt i starts from the latents
    of seed i and prompts go 20 to a call, as in training/evaluate.py, so the fp32 row is
    comparable with benchmarks/results/quality-default-model.json."""
    from fewstep.package import default_model
    from fewstep.pipeline import Pipeline

    # training/ (the dataset and its analyzer) is a folder of the checkout, not installed.
    import_training(repo)
    from training import scenes

    prompts = list(scenes.evaluation_prompts())
    if small:  # a few of each kind: the code path, not a measurement
        prompts = [p for p in prompts if p.kind == "single"][:3] + [
            p for p in prompts if p.kind == "two"
        ][:3]
    side = scenes.IMAGE_SIZE // 4
    latents = np.concatenate(
        [
            np.random.default_rng(i).standard_normal((1, 4, side, side), dtype=np.float32)
            for i in range(len(prompts))
        ]
    )
    settings = [("fp32", {"dtype": torch.float32, "kernels": False})]
    if not small:
        settings += [("fp16", {"dtype": torch.float16})]
    result: dict[str, Any] = {
        "what": "default model, LCM 4 steps, guidance 8.5, torch backend: analyzer accuracy",
        "prompts": len(prompts),
        "rows": {},
    }
    images: dict[str, np.ndarray] = {}
    for name, options in settings:
        pipe = Pipeline.from_pretrained(default_model(), backend="torch", device=device, **options)
        chunks = []
        for i in range(0, len(prompts), 20):
            out = pipe(
                [p.prompt for p in prompts[i : i + 20]],
                num_inference_steps=4,
                guidance_scale=8.5,
                latents=latents[i : i + 20],
                seed=i,
                scheduler="lcm",
                output_type="np",
            ).images
            chunks.append(np.asarray(out, dtype=np.float32))
        images[name] = np.concatenate(chunks)
        uint8 = (np.clip(images[name], 0, 1) * 255).round().astype(np.uint8)
        scores = [scenes.score(im, p.target) for im, p in zip(uint8, prompts, strict=True)]
        row: dict[str, Any] = {}
        for kind in ("single", "two"):
            kind_scores = [sc for sc, p in zip(scores, prompts, strict=True) if p.kind == kind]
            accuracy = scenes.attribute_accuracy(kind_scores)
            row[kind] = {"n": len(kind_scores), **{k: round(v, 4) for k, v in accuracy.items()}}
        row["max_abs_image_diff_vs_fp32"] = float(np.abs(images[name] - images["fp32"]).max())
        result["rows"][name] = row
        del pipe
        free_memory()
    return result
