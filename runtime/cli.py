"""The `fewstep` command: export, generate, info, demo, bench, lora, serve.

Flags mirror the Python API's argument names in kebab-case. `fewstep export`
hands over to fewstep.export (the `export` extra), imported only when used.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from fewstep.backends.base import BACKENDS
from fewstep.inputs import Limits
from fewstep.samplers import SAMPLERS
from fewstep.samplers.a1111 import A1111_SAMPLERS

MAX_PROMPTS_FILE_BYTES = 1 << 20  # a prompts file larger than this is not a list of prompts


def _scheduler(name: str) -> str:
    """fewstep's sampler name, or the one A1111's name means."""
    if name in SAMPLERS:
        return name
    if name in A1111_SAMPLERS:
        return A1111_SAMPLERS[name]
    raise argparse.ArgumentTypeError(
        f"must be one of {list(SAMPLERS)} or A1111's {list(A1111_SAMPLERS)}, got {name!r}"
    )


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    defaults = Limits()
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--num-inference-steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images-per-prompt", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument(
        "--image",
        default=None,
        metavar="PATH",
        help="img2img: start from this PNG, JPEG or WebP image (its size, rounded down to the "
        "model's size multiple, unless --height/--width are given)",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="img2img: how much of the schedule runs, in (0, 1] (default 0.8, SDXL 0.3: "
        "diffusers' defaults); "
        "int(steps x strength) steps run",
    )
    p.add_argument(
        "--scheduler",
        type=_scheduler,
        default=None,
        metavar="NAME",
        help=f'one of {", ".join(SAMPLERS)}, or A1111\'s name ("DPM++ 2M Karras", "Euler a", '
        "...); default: the package's own",
    )
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument(
        "--precision",
        default=None,
        help="backend precision, passed through when given (openvino: fp32 | bf16)",
    )
    p.add_argument(
        "--output",
        "-o",
        default="image.png",
        help="image path (.png, .jpg, .jpeg, .webp) or existing folder; a taken name gets the "
        "next free one (image-1.png, ...)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing files instead")
    p.add_argument("--max-pixels", type=int, default=defaults.max_pixels, help="per image")
    p.add_argument("--max-images", type=int, default=defaults.max_images, help="per call")
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    _add_lora_arg(p, "folded into the weights at load (the package is not changed)")


def _add_lora_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help=f"LoRA safetensors (kohya or PEFT) and its scale (default 1.0), {what}; repeatable",
    )


def _loras(args: argparse.Namespace) -> list[tuple[str, float]]:
    from fewstep.lora import parse_lora_arg

    return [parse_lora_arg(text) for text in args.lora]


def generate_to_files(model: Path, prompt: str, args: argparse.Namespace) -> list[Path]:
    from fewstep.image_files import a1111_parameters, output_path, save_images
    from fewstep.package import read_manifest, unet_hash
    from fewstep.pipeline import Pipeline

    target = output_path(args.output)  # before anything runs: a bad path loses no work
    limits = Limits(
        max_pixels=args.max_pixels, max_images=args.max_images, max_steps=args.max_steps
    )
    options: dict[str, Any] = {"precision": args.precision} if args.precision is not None else {}
    if args.lora:
        options["loras"] = _loras(args)
    pipe = Pipeline.from_pretrained(model, backend=args.backend, limits=limits, **options)
    result = pipe(
        prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images_per_prompt,
        seed=args.seed,
        eta=args.eta,
        guidance_rescale=args.guidance_rescale,
        scheduler=args.scheduler,
        progress=True,
        image=args.image,
        strength=args.strength,
    )
    manifest = read_manifest(model) or {}
    params = a1111_parameters(
        prompt,
        args.negative_prompt or "",
        result.settings,
        Path(model).resolve().name,
        unet_hash(manifest),
    )
    paths = save_images(result.images, target, params, overwrite=args.overwrite)
    total = result.timings_ms["total"]
    print(f"wrote {', '.join(map(str, paths))} ({total:.0f} ms, seed {result.seed})")
    return paths


def cmd_generate(args: argparse.Namespace) -> int:
    from fewstep.package import default_model

    model = Path(args.model) if args.model is not None else default_model()
    generate_to_files(model, args.prompt, args)
    return 0


def _from_export_extra(command: str, module: str, name: str) -> Any:
    """`name` from `module`, which needs torch and diffusers: an ImportError naming the extra."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ImportError(
            f"fewstep {command} needs the export extra: pip install 'fewstep[export]' ({e})"
        ) from e


def cmd_export(args: argparse.Namespace) -> int:
    export_package = _from_export_extra("export", "fewstep.export", "export_package")
    export_package(
        args.src,
        args.out,
        dtype=args.dtype,
        opset=args.opset,
        config=args.config,
        loras=_loras(args),
        vae=args.vae,
    )
    print(f"wrote model package {args.out}")
    return 0


def cmd_lora_apply(args: argparse.Namespace) -> int:
    from fewstep.lora import apply_loras_to_package

    loras = _loras(args)
    if not loras:
        raise ValueError("fewstep lora apply needs at least one --lora PATH[:SCALE]")
    t0 = time.perf_counter()
    apply_loras_to_package(args.package, loras, args.out)
    print(f"wrote model package {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    quantize = _from_export_extra("quantize", "fewstep.export.quantize", "quantize_package")
    options: dict[str, Any] = {}
    if args.steps is not None:
        options["num_inference_steps"] = args.steps
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        prompts += read_prompts_file(Path(args.prompts_file))
    if prompts:
        options["prompts"] = prompts
    t0 = time.perf_counter()
    quantize(args.package, args.out, **options)
    print(f"wrote int8 model package {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file (at most MAX_PROMPTS_FILE_BYTES)."""
    size = path.stat().st_size
    if size > MAX_PROMPTS_FILE_BYTES:
        raise ValueError(
            f"--prompts-file {path} is {size} bytes; at most {MAX_PROMPTS_FILE_BYTES} are read"
        )
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cmd_info(args: argparse.Namespace) -> int:
    from fewstep.package import read_model_info, verify_package

    manifest = verify_package(args.package) or {}
    info = read_model_info(args.package)
    summary = {
        "family": info.family,
        "prediction_type": info.prediction_type,
        "scheduler": info.scheduler_class,
        "default_size": f"{info.default_width}x{info.default_height}",
        "default_num_inference_steps": info.default_num_inference_steps,
        "default_guidance_scale": info.default_guidance_scale,
        "guidance_embedding_dim": info.guidance_embedding_dim,
        "precision": manifest.get("precision", "unknown (no fewstep.json)"),
        "graphs": manifest.get("graphs", {}),
        "versions": manifest.get("versions", {}),
        "loras": manifest.get("loras", []),
    }
    if "quantization" in manifest:  # an int8 U-Net (fewstep quantize): how it was made
        summary["quantization"] = manifest["quantization"]
    print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a tiny random-weight model, export it, and generate from it.

    The weights are random, so the image is noise: this shows the whole path
    (diffusers folder → model package → onnxruntime pipeline) working end to end.
    """
    from fewstep.export import export_package
    from fewstep.export.testing import make_tiny_model

    work = Path(args.workdir)
    source, package = work / f"tiny-{args.family}", work / f"tiny-{args.family}-onnx"
    t0 = time.perf_counter()
    if not source.exists():
        make_tiny_model(source, family=args.family, seed=0)
    if not package.exists():
        export_package(source, package)
    print(f"model package ready in {time.perf_counter() - t0:.1f} s: {package}")
    print("note: the demo model has random weights, so its images are noise")
    generate_to_files(package, args.prompt, args)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    run_bench = _from_export_extra("bench", "fewstep.benchmarks.pipeline_bench", "run_bench")
    run_bench(
        models=args.models.split(","),
        steps=[int(s) for s in args.steps.split(",")],
        repeats=args.repeats,
        workdir=Path(args.workdir),
        out=Path(args.output) if args.output else None,
        backends=[b for b in args.backends.split(",") if b],
        note=args.note,
    )
    return 0


def _served_models(specs: list[str]) -> dict[str, Path]:
    """--model NAME=PATH values → {name: path}; none gives the bundled model as "default"."""
    from fewstep.package import default_model

    if not specs:
        return {"default": default_model()}
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model must be NAME=PATH, got {spec!r}")
        if name in models:
            raise ValueError(f"--model names must be unique, got {name!r} twice")
        models[name] = Path(path)
    return models


def _serve_on_ray(
    args: argparse.Namespace,
    models: dict[str, Path],
    limits: Limits,
    options: dict[str, Any],
    app_options: dict[str, Any],
) -> int:
    """`fewstep serve --ray`: the same app on `--replicas` Ray Serve replicas (ray_app.py)."""
    try:
        ray_app = importlib.import_module("fewstep.serve.ray_app")
    except ImportError as e:
        raise ImportError(
            f"fewstep serve --ray needs the ray extra: pip install 'fewstep[ray]' ({e})"
        ) from e
    replicas = 1 if args.replicas is None else args.replicas
    if replicas < 1:
        raise ValueError(f"--replicas must be an integer >= 1, got {replicas}")
    settings = ray_app.ServeSettings(
        models={name: str(path) for name, path in models.items()},
        backend=args.backend,
        backend_options=options,
        limits=limits,
        **app_options,
    )
    ray_app.serve_on_ray(
        settings, replicas, host=args.host, port=args.port, drain_timeout=args.drain_timeout
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        serve = importlib.import_module("fewstep.serve")
    except ImportError as e:
        raise ImportError(
            f"fewstep serve needs the serve extra: pip install 'fewstep[serve]' ({e})"
        ) from e
    from fewstep.pipeline import Pipeline

    logging.getLogger("fewstep.serve").setLevel(logging.INFO)  # start-up, drain, errors' ids
    limits = Limits(
        max_pixels=args.max_pixels,
        max_images=args.max_images,
        max_steps=args.max_steps,
        max_prompt_chars=args.max_prompt_chars,
    )
    options: dict[str, Any] = {"precision": args.precision} if args.precision is not None else {}
    models = _served_models(args.model)  # every flag checked before any model loads
    if args.replicas is not None and not args.ray:
        raise ValueError(f"--replicas needs --ray, got --replicas {args.replicas} alone")
    # create_app's keywords, which Ray's replicas take too
    app_options: dict[str, Any] = dict(
        api_key=args.api_key or os.environ.get("FEWSTEP_API_KEY") or None,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        cors_origins=args.cors_origin,
    )
    if args.ray:
        return _serve_on_ray(args, models, limits, options, app_options)
    pipelines = {
        name: Pipeline.from_pretrained(path, backend=args.backend, limits=limits, **options)
        for name, path in models.items()
    }
    app = serve.create_app(pipelines, **app_options)
    serve.run(app, host=args.host, port=args.port, drain_timeout=args.drain_timeout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewstep", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="text to image with a model package")
    p.add_argument("prompt")
    p.add_argument(
        "--model",
        default=None,
        help="model package folder (default: the bundled 64x64 scenes model)",
    )
    _add_generation_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="diffusers folder or .safetensors → model package")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--dtype", default="fp32", help="fp32 | fp16")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--config", default=None, help="diffusers folder with configs (single files)")
    _add_lora_arg(p, "folded into the U-Net and text encoder before export")
    p.add_argument(
        "--vae",
        default=None,
        help="tiny autoencoder folder (diffusers AutoencoderTiny: TAESD, TAESDXL) to export as "
        "the VAE decoder and encoder instead of the model's own",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="check a model package and print what it holds")
    p.add_argument("package")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="tiny random model: build, export, generate")
    p.add_argument("prompt", nargs="?", default="a red circle on a blue background")
    p.add_argument("--family", default="sd1")
    p.add_argument("--workdir", default="fewstep-demo")
    _add_generation_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="fewstep vs diffusers on this machine, side by side")
    p.add_argument(
        "--models",
        default="tiny,mid",
        help="comma-separated: tiny, mid, sd15 (SD 1.5's full size), sdxl-mid, sdxl-mid-taesdxl",
    )
    p.add_argument("--steps", default="1,4,25", help="comma-separated step counts")
    p.add_argument("--repeats", type=int, default=3, help="end-to-end runs per step count")
    p.add_argument("--workdir", default="fewstep-bench", help="where models are built")
    p.add_argument("--output", default=None, help="JSON file for the results")
    p.add_argument(
        "--backends",
        default="onnxruntime,openvino-fp32,openvino-bf16",
        help="comma-separated fewstep sides: onnxruntime, onnxruntime-unfused, openvino-fp32, "
        "openvino-bf16, openvino-int8 (the package quantized by fewstep quantize)",
    )
    p.add_argument("--note", default=None, help="appended to the results' `what` field")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="HTTP service with OpenAI's image generation API")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a model package served as NAME; repeatable, the first is the default "
        "(default: default=<the bundled 64x64 scenes model>)",
    )
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--precision", default=None, help="backend precision, passed through")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key", default=None, help="bearer key clients must send (default: $FEWSTEP_API_KEY)"
    )
    p.add_argument("--max-batch", type=int, default=8, help="images per pipeline call")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=2.0,
        help="how long a batch's first request waits for others (batches also form while "
        "the previous one runs)",
    )
    p.add_argument("--max-queue", type=int, default=64, help="queued requests per model")
    p.add_argument(
        "--request-timeout", type=float, default=300.0, help="seconds a request may wait (504)"
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds queued requests get to finish after SIGTERM",
    )
    defaults = Limits()
    p.add_argument("--max-pixels", type=int, default=defaults.max_pixels, help="per image")
    p.add_argument("--max-images", type=int, default=defaults.max_images, help="per request")
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    p.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars)
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin (https://app.example.com) whose pages may call the service; "
        "repeatable (default: none)",
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="serve on Ray Serve replicas (the ray extra; docs/serving-ray.md): a local Ray "
        "cluster, or the one $RAY_ADDRESS names",
    )
    p.add_argument(
        "--replicas", type=int, default=None, help="with --ray: replicas of the app (default 1)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "quantize", help="copy a package with its U-Net quantized to int8 (OpenVINO, NNCF)"
    )
    p.add_argument("package", help="model package folder (not changed)")
    p.add_argument("--out", required=True, help="new package folder (must not exist)")
    p.add_argument(
        "--prompt",
        action="append",
        help="a calibration prompt (repeatable; default: a built-in set of varied prompts)",
    )
    p.add_argument("--prompts-file", help="calibration prompts, one per line")
    p.add_argument("--steps", type=int, help="inference steps per calibration image (default 4)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("lora", help="LoRA files and model packages")
    lora_sub = p.add_subparsers(dest="lora_command", required=True)
    p = lora_sub.add_parser("apply", help="copy a package with LoRAs folded into its weights")
    p.add_argument("package", help="model package folder (not changed)")
    p.add_argument("--out", required=True, help="new package folder (must not exist)")
    _add_lora_arg(p, "folded into the copy")
    p.set_defaults(func=cmd_lora_apply)
    return parser


# Failures that the user's input or environment causes (a bad argument, file or package, a
# missing extra, an unsupported model setting): one line, exit 2. Anything else is fewstep's
# own failure: one line, exit 1. -v adds the traceback to either.
USER_ERRORS = (ValueError, OSError, NotImplementedError, ImportError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"fewstep {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose:
            traceback.print_exc()
        user_error = isinstance(e, USER_ERRORS)
        kind = "" if user_error else f"internal error ({type(e).__name__}): "
        hint = "" if user_error or args.verbose else " (run with -v for the traceback)"
        print(f"fewstep {args.command}: error: {kind}{e}{hint}", file=sys.stderr)
        return 2 if user_error else 1


if __name__ == "__main__":
    sys.exit(main())
