"""The quality report of the default model: one command -> a JSON file and a PNG grid.

    python -m training.evaluate --teacher runs/unet/model --student runs/lcm/model \
        --out benchmarks/results/quality-default-model.json \
        --grid benchmarks/results/quality-default-model.png

Generates every prompt of `training.scenes.evaluation_prompts()` (60 single-object, 40
two-object; prompt i uses seed i) under each configuration below, scores each image with
`training.scenes.score` (the analyzer), and reports, per configuration and prompt kind, the
fraction fully correct and the accuracy of each attribute:

- teacher, DDIM 50 / 25 / 8 / 4 steps, with CFG (7.5) and without (1.0);
- student (LCM), 4 / 2 / 1 steps, with embedded guidance (8.5, fewstep's LCM default) and
  4 steps without (1.0);
all through fewstep's pipeline on the onnxruntime backend, fp32 package (the primary rows);
then the teacher at DDIM 25 + CFG and the student at 4 steps on the other backends and
dtypes: onnxruntime fp16 package, openvino (fp32, bf16), fewstep's torch backend (fp32 on the
diffusers folder), and diffusers' own pipelines (the reference).

`--int8` runs the student only, at 4 steps with its guidance, on OpenVINO: the fp32 package in
fp32 and bf16, and the same package quantized to int8 (`fewstep.export.quantize`, calibrated on
`INT8_CALIBRATION_SCENES` captions of the training distribution, none of them evaluation
prompts) with the other layers in fp32 and in bf16; its gate: int8 within `GATE_INT8_POINTS`
of the fp32 row on single- and two-object prompts.

`gates` records the targets: teacher DDIM 50 + CFG >= 90% single-object and >= 60%
two-object prompts fully correct; the student at 4 steps within 5 points of that teacher.

Packages are exported (fewstep.export.export_package) into `--work` on first use and reused
while the source weights are the same.
`--quick` runs 10 + 10 prompts and the primary rows only, `--prompts-per-kind N` the first N
of each kind (smoke checks, not reports: the JSON says `"complete": false`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import platform
import shutil
import time
from typing import Any

import numpy as np

from training import common, scenes

GRID_COLUMNS = (8, 8)  # single-object, two-object prompts shown per row
DEFAULT_CFG = 7.5
LCM_GUIDANCE = 8.5
TEACHER_STEPS = (50, 25, 8, 4)
STUDENT_STEPS = (4, 2, 1)
GATE_SINGLE, GATE_TWO, GATE_STUDENT_POINTS = 0.90, 0.60, 5.0
GATE_INT8_POINTS = 2.0
INT8_CALIBRATION_SCENES = 16  # captions of scene_at(i, seed=INT8_CALIBRATION_SEED)
INT8_CALIBRATION_SEED = 7


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    model: str  # "teacher" | "student"
    steps: int
    guidance: float
    runner: str = "fewstep"  # "fewstep" | "diffusers"
    backend: str = "onnxruntime"  # fewstep backend
    dtype: str = "fp32"  # package dtype (onnxruntime) or backend precision

    @property
    def name(self) -> str:
        sampler = "ddim" if self.model == "teacher" else "lcm"
        where = "diffusers" if self.runner == "diffusers" else self.backend
        return f"{self.model}-{sampler}{self.steps}-g{self.guidance:g}-{where}-{self.dtype}"


def configurations(quick: bool) -> list[EvalConfig]:
    primary = [EvalConfig("teacher", s, g) for s in TEACHER_STEPS for g in (DEFAULT_CFG, 1.0)]
    primary += [EvalConfig("student", s, LCM_GUIDANCE) for s in STUDENT_STEPS]
    primary.append(EvalConfig("student", 4, 1.0))
    if quick:
        return primary
    others = []
    for model, steps, guidance in (("teacher", 25, DEFAULT_CFG), ("student", 4, LCM_GUIDANCE)):
        others += [
            EvalConfig(model, steps, guidance, dtype="fp16"),
            EvalConfig(model, steps, guidance, backend="openvino", dtype="fp32"),
            EvalConfig(model, steps, guidance, backend="openvino", dtype="bf16"),
            EvalConfig(model, steps, guidance, backend="torch", dtype="fp32"),
            EvalConfig(model, steps, guidance, runner="diffusers"),
        ]
    return primary + others


def int8_configurations() -> list[EvalConfig]:
    """The student on OpenVINO: fp32 package (fp32, bf16), then int8 (fp32 and bf16 around)."""
    return [
        EvalConfig("student", 4, LCM_GUIDANCE, backend="openvino", dtype=dtype)
        for dtype in ("fp32", "bf16", "int8", "int8-bf16")
    ]


def initial_latents(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """What fewstep's pipeline draws for `seed` (numpy default_rng), for a batch of one."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


class Runners:
    """Loads each (model, runner, backend, dtype) once; exports packages on first use."""

    def __init__(self, folders: dict[str, pathlib.Path], work: pathlib.Path):
        self.folders, self.work = folders, work
        self._cache: dict[tuple, Any] = {}

    def package(self, model: str, dtype: str) -> pathlib.Path:
        """The exported package of `model`, reused only if exported from the same weights."""
        out = self.work / f"{model}-{dtype}"
        source = self.folders[model]
        key = " ".join(common.file_sha256(path) for path in sorted(source.glob("*/*.safetensors")))
        stamp = self.work / f"{model}-{dtype}.source"
        if not out.exists() or not stamp.exists() or stamp.read_text() != key:
            from fewstep.export import export_package

            shutil.rmtree(out, ignore_errors=True)
            print(f"exporting {model} ({dtype}) to {out}", flush=True)
            export_package(source, out, dtype=dtype, progress=False)
            stamp.write_text(key)
        return out

    def int8_package(self, model: str) -> pathlib.Path:
        """The fp32 package of `model` with its U-Net quantized to int8, remade when that
        package was."""
        from fewstep.export.quantize import quantize_package

        source = self.package(model, "fp32")
        out = self.work / f"{model}-int8"
        stamp = self.work / f"{model}-int8.source"
        key = (self.work / f"{model}-fp32.source").read_text()
        if not out.exists() or not stamp.exists() or stamp.read_text() != key:
            shutil.rmtree(out, ignore_errors=True)
            prompts = [
                scenes.caption(scenes.scene_at(i, seed=INT8_CALIBRATION_SEED))
                for i in range(INT8_CALIBRATION_SCENES)
            ]
            print(f"quantizing {model} to int8 in {out}", flush=True)
            quantize_package(source, out, prompts, progress=False)
            stamp.write_text(key)
        return out

    def get(self, cfg: EvalConfig) -> Any:
        key = (cfg.model, cfg.runner, cfg.backend, cfg.dtype)
        if key in self._cache:
            return self._cache[key]
        if cfg.runner == "diffusers":
            import diffusers

            pipe = diffusers.DiffusionPipeline.from_pretrained(
                self.folders[cfg.model], local_files_only=True
            )
            pipe.set_progress_bar_config(disable=True)
        else:
            from fewstep.pipeline import Pipeline

            if cfg.backend == "torch":
                pipe = Pipeline.from_pretrained(
                    self.folders[cfg.model], backend="torch", dtype=cfg.dtype
                )
            elif cfg.backend == "openvino" and cfg.dtype.startswith("int8"):
                precision = cfg.dtype.removeprefix("int8").removeprefix("-") or "fp32"
                pipe = Pipeline.from_pretrained(
                    self.int8_package(cfg.model), backend="openvino", precision=precision
                )
            elif cfg.backend == "openvino":
                pipe = Pipeline.from_pretrained(
                    self.package(cfg.model, "fp32"), backend="openvino", precision=cfg.dtype
                )
            else:
                pipe = Pipeline.from_pretrained(self.package(cfg.model, cfg.dtype))
        self._cache[key] = pipe
        return pipe


def generate(pipe: Any, cfg: EvalConfig, prompts: list[str], seeds: list[int]) -> np.ndarray:
    """uint8 images [N, 64, 64, 3]; prompt i starts from initial_latents(seeds[i])."""
    shape = (1, 4, scenes.IMAGE_SIZE // 4, scenes.IMAGE_SIZE // 4)
    latents = np.concatenate([initial_latents(s, shape) for s in seeds])
    if cfg.runner == "diffusers":
        import torch

        out = pipe(
            prompts,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance,
            latents=torch.from_numpy(latents),
            generator=torch.Generator().manual_seed(seeds[0]),
            output_type="np",
        ).images
    else:
        sampler = "ddim" if cfg.model == "teacher" else "lcm"
        out = pipe(
            prompts,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance,
            latents=latents,
            seed=seeds[0],
            scheduler=sampler,
            output_type="np",
        ).images
    return (np.clip(np.asarray(out, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)


def summarize(results: list[dict[str, Any]], targets: list[scenes.Target]) -> dict[str, Any]:
    """Attribute accuracy, and shape accuracy split by the shape each object asked for (which
    shapes the model cannot draw yet)."""
    accuracy = scenes.attribute_accuracy(results)
    right: dict[str, list[bool]] = {shape: [] for shape in scenes.SHAPES}
    for result, target in zip(results, targets, strict=True):
        for want, ok in zip(target.objects, result["shape"], strict=True):
            right[want.shape].append(ok)
    return {
        "n": len(results),
        **{k: round(v, 4) for k, v in accuracy.items()},
        "shape_by_name": {k: round(sum(v) / len(v), 4) for k, v in right.items() if v},
    }


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def environment() -> dict[str, Any]:
    from fewstep.benchmarks.harness import cpu_name, git_commit, library_versions

    return {
        "machine": platform.machine(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "versions": library_versions(
            ("torch", "diffusers", "transformers", "onnxruntime", "openvino", "numpy")
        ),
        "commit": git_commit(),
    }


def save_report_grid(rows: list[tuple[str, np.ndarray]], path: pathlib.Path) -> None:
    """One row per configuration: a label, then its images (uint8 [N, 64, 64, 3])."""
    from PIL import Image, ImageDraw

    label_width, gap, size = 230, 2, scenes.IMAGE_SIZE
    columns = max(len(images) for _, images in rows)
    width = label_width + columns * (size + gap)
    height = len(rows) * (size + gap)
    grid = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = r * (size + gap)
        draw.text((4, y + size // 2 - 6), label, fill=(255, 255, 255))
        for c, image in enumerate(images):
            grid.paste(Image.fromarray(image), (label_width + c * (size + gap), y))
    grid.save(path)


def int8_gates(by_name: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each int8 row's points below the fp32 row it was quantized from (OpenVINO, fp32
    package), single- and two-object prompts."""
    fp32, _, int8, int8_bf16 = (by_name.get(c.name) for c in int8_configurations())
    gates = {}
    for label, row in (("int8", int8), ("int8_bf16", int8_bf16)):
        if fp32 is not None and row is not None:
            gates |= points_below(fp32, row, f"student_lcm4_{label}", "fp32", GATE_INT8_POINTS)
    return gates


def points_below(
    reference: dict[str, Any], row: dict[str, Any], name: str, below: str, limit: float
) -> dict[str, dict[str, Any]]:
    """Gates `<name>_<kind>_points_below_<below>`: how many points of prompts fully correct
    `row` has fewer than `reference`, single- and two-object, at most `limit`."""
    gates = {}
    for kind in ("single", "two"):
        # rounded: fractions of 60 or 40 prompts, so 2 prompts of 40 are 5 points, not 5.000…1
        points = round(100 * (reference[kind]["correct"] - row[kind]["correct"]), 6)
        gates[f"{name}_{kind}_points_below_{below}"] = {
            "value": round(points, 2),
            "max": limit,
            "pass": points <= limit,
        }
    return gates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", help="teacher diffusers folder (all but --int8)")
    parser.add_argument("--student", required=True, help="student (LCM) diffusers folder")
    parser.add_argument("--out", required=True, help="report JSON path")
    parser.add_argument("--grid", required=True, help="PNG grid path")
    parser.add_argument("--work", default="runs/eval", help="exported packages go here")
    parser.add_argument("--quick", action="store_true", help="10 + 10 prompts, primary rows only")
    parser.add_argument(
        "--prompts-per-kind",
        type=int,
        default=None,
        help="only the first N single- and N two-object prompts (checks)",
    )
    parser.add_argument("--batch", type=int, default=20, help="prompts per pipeline call")
    parser.add_argument("--int8", action="store_true", help="the student's int8 rows only")
    args = parser.parse_args(argv)
    if args.teacher is None and not args.int8:
        parser.error("--teacher is required (all but --int8)")

    folders = {"student": pathlib.Path(args.student)}
    if not args.int8:
        folders["teacher"] = pathlib.Path(args.teacher)
    prompts = list(scenes.evaluation_prompts())
    per_kind = 10 if args.quick and args.prompts_per_kind is None else args.prompts_per_kind
    if per_kind is not None:
        prompts = [p for p in prompts if p.kind == "single"][:per_kind] + [
            p for p in prompts if p.kind == "two"
        ][:per_kind]
    seeds = list(range(len(prompts)))
    runners = Runners(folders, pathlib.Path(args.work))
    shown = [i for i, p in enumerate(prompts) if p.kind == "single"][: GRID_COLUMNS[0]]
    shown += [i for i, p in enumerate(prompts) if p.kind == "two"][: GRID_COLUMNS[1]]

    rows, grid_rows = [], []
    for cfg in int8_configurations() if args.int8 else configurations(args.quick):
        try:
            pipe = runners.get(cfg)
        except (ImportError, NotImplementedError, ValueError) as e:
            print(f"{cfg.name}: skipped ({type(e).__name__}: {e})", flush=True)
            rows.append({"name": cfg.name, **dataclasses.asdict(cfg), "skipped": str(e)})
            continue
        start = time.perf_counter()
        images = []
        for i in range(0, len(prompts), args.batch):
            chunk = prompts[i : i + args.batch]
            images.append(generate(pipe, cfg, [p.prompt for p in chunk], seeds[i : i + args.batch]))
        images = np.concatenate(images)
        seconds = time.perf_counter() - start
        results = [scenes.score(im, p.target) for im, p in zip(images, prompts, strict=True)]
        kinds = {
            kind: [(r, p.target) for r, p in zip(results, prompts, strict=True) if p.kind == kind]
            for kind in ("single", "two")
        }
        row = {
            "name": cfg.name,
            **dataclasses.asdict(cfg),
            **{
                kind: summarize([r for r, _ in pairs], [t for _, t in pairs])
                for kind, pairs in kinds.items()
            },
            "correct": [bool(r["correct"]) for r in results],
            "seconds_per_image": round(seconds / len(prompts), 4),
        }
        rows.append(row)
        grid_rows.append((cfg.name, images[shown]))
        print(
            f"{cfg.name}: single {row['single']['correct']:.3f}  two {row['two']['correct']:.3f}  "
            f"({row['seconds_per_image'] * 1e3:.0f} ms/image)",
            flush=True,
        )

    by_name = {r["name"]: r for r in rows if "skipped" not in r}
    teacher = by_name.get(EvalConfig("teacher", 50, DEFAULT_CFG).name)
    student = by_name.get(EvalConfig("student", 4, LCM_GUIDANCE).name)
    gates = {}
    if teacher is not None:
        gates["teacher_ddim50_cfg_single"] = {
            "value": teacher["single"]["correct"],
            "min": GATE_SINGLE,
            "pass": teacher["single"]["correct"] >= GATE_SINGLE,
        }
        gates["teacher_ddim50_cfg_two"] = {
            "value": teacher["two"]["correct"],
            "min": GATE_TWO,
            "pass": teacher["two"]["correct"] >= GATE_TWO,
        }
    if teacher is not None and student is not None:
        gates |= points_below(teacher, student, "student_lcm4", "teacher", GATE_STUDENT_POINTS)
    gates.update(int8_gates(by_name))
    report = {
        "what": "fewstep default model: analyzer accuracy on training.scenes.evaluation_prompts()",
        "prompts": [
            {"kind": p.kind, "prompt": p.prompt, "seed": s}
            for p, s in zip(prompts, seeds, strict=True)
        ],
        "quick": args.quick,
        "complete": per_kind is None and not args.quick,
        "models": {
            name: {
                "folder": str(folder),
                "unet_sha256": sha256(folder / "unet" / "diffusion_pytorch_model.safetensors"),
            }
            for name, folder in folders.items()
        },
        "environment": environment(),
        "gates": gates,
        "configurations": rows,
        "grid_columns": [prompts[i].prompt for i in shown],
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    pathlib.Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
    save_report_grid(grid_rows, pathlib.Path(args.grid))
    print(
        f"wrote {out} and {args.grid}; gates: "
        + json.dumps({k: v["pass"] for k, v in gates.items()}),
        flush=True,
    )


if __name__ == "__main__":
    main()
