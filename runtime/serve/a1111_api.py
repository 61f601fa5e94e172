"""A1111's web UI API: `POST /sdapi/v1/txt2img`, `POST /sdapi/v1/img2img`,
`GET /sdapi/v1/samplers`, `GET /sdapi/v1/sd-models`, so that A1111 clients can use the service.

txt2img fields used: `prompt`, `negative_prompt`, `steps`, `cfg_scale`, `width`, `height`
(absent or null: the model's defaults, not A1111's 512×512 at 20 steps), `seed` (-1, absent
or null: drawn at random and reported), `batch_size`, `n_iter`, `sampler_name` (or its older
name `sampler_index`; A1111's names from fewstep.samplers.a1111; absent: the model's own
sampler), `eta` (DDIM's; the ancestral and SDE samplers run at eta 1 only, the others have
none), `send_images` (false: no images in the answer) and
`override_settings.sd_model_checkpoint` (a served model's name or its title from sd-models;
absent: the default model).

Image i of batch_size × n_iter uses seed + i, as A1111 numbers them; all of them are ONE
request to the model's batcher, so they batch with other clients' requests. The answer is
A1111's: `images` (base64 PNGs, each with its infotext as the `parameters` chunk; no grid
image), `parameters` (the request's fields with the values used) and `info` (a JSON string,
A1111's `Processed.js()` keys, `infotexts` equal to the PNGs' chunks).

Fields accepted and ignored, as they change no pixel here: `save_images`,
`do_not_save_samples`, `do_not_save_grid`, `override_settings_restore_afterwards`,
`force_task_id`, `comments`; and those that act only with a feature refused below
(`subseed`; `denoising_strength`, `hr_*` and `firstphase_*` of the hires fix; `script_args`;
`s_tmin`/`s_tmax` of s_churn; `refiner_switch_at`). Fields of what fewstep does not do are
accepted only at values that do nothing (`enable_hr` false, `subseed_strength` 0, `styles`
empty, ...; see UNSUPPORTED) and refused otherwise, naming the field, as are unknown fields
and `override_settings` keys other than `sd_model_checkpoint`. Errors come in the service's
error shape (errors.py): A1111 clients read the status and the message.

img2img takes txt2img's fields but the hires fix's, plus `init_images` (base64 PNG, JPEG or
WebP files, a `data:image/...;base64,` prefix allowed; as A1111, the first one is used for
every image), `denoising_strength` (A1111's default 0.75) and `resize_mode` (0, "just
resize", only). `width`/`height` absent or null: the image's size rounded down to the model's
size multiple (A1111: 512×512); given: the image is resized to them (Lanczos). Inpainting is
refused (`mask`, `latent_mask`), as is `initial_noise_multiplier` other than 1 and
`include_init_images`; inpainting's settings that act only with a mask (`mask_blur`,
`inpainting_fill`, ...) and instruct-pix2pix's `image_cfg_scale` are ignored. Bodies of up to
`MAX_IMAGE_BODY_BYTES` are read. The answer is txt2img's with `init_images` and `mask` null in
`parameters` (as A1111 answers) and the infotexts ending in "Denoising strength".
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import fewstep
from fewstep.batching import GenerationRequest, RequestImages
from fewstep.image_files import SAMPLER_LABELS
from fewstep.inputs import check_integer, check_number
from fewstep.samplers import sampler_name_for
from fewstep.samplers.a1111 import A1111_SAMPLERS, scheduler_for_a1111
from fewstep.serve.errors import APIError
from fewstep.serve.pngs import encode_pngs, infotexts
from fewstep.serve.service import (
    MAX_IMAGE_BODY_BYTES,
    Service,
    base64_image_bytes,
    decode_image,
    read_json_body,
)

A1111_RANDOM_SEEDS = 2**32 - 1  # A1111 draws a random seed below this
ETA_ONE_SAMPLERS = ("euler_ancestral", "dpmpp_2m_sde")  # eta 1, as A1111's default for them
USED_FIELDS = (
    "prompt",
    "negative_prompt",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "seed",
    "batch_size",
    "n_iter",
    "sampler_name",
    "sampler_index",
    "eta",
    "send_images",
    "override_settings",
)
IGNORED_FIELDS = (
    "save_images",
    "do_not_save_samples",
    "do_not_save_grid",
    "override_settings_restore_afterwards",
    "force_task_id",
    "comments",
    "subseed",  # acts only with subseed_strength > 0
    "script_args",  # only with script_name
    "denoising_strength",  # in txt2img, only with enable_hr
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
    "firstphase_width",
    "firstphase_height",
    "s_tmin",  # only with s_churn > 0
    "s_tmax",
    "refiner_switch_at",  # only with refiner_checkpoint
)


def _or_default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_false(value: Any) -> bool:
    return value is None or value is False


def is_zero(value: Any) -> bool:
    return value is None or (_number(value) and value == 0)


def is_one(value: Any) -> bool:
    return value is None or (_number(value) and value == 1)


def is_not_positive(value: Any) -> bool:
    return value is None or (_number(value) and value <= 0)


def is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | dict) and len(value) == 0)


def is_automatic(value: Any) -> bool:
    return value is None or value == "Automatic"


def is_no_refiner(value: Any) -> bool:
    return value is None or value in ("", "None")


NULL = {"type": "null"}
# the values that make a field do nothing: as said in messages → (the check, a JSON schema
# of them for the OpenAPI document); null is always one (A1111's default)
NEUTRAL: dict[str, tuple[Callable[[Any], bool], dict[str, Any]]] = {
    "false": (is_false, {"enum": [False, None]}),
    "0": (is_zero, {"enum": [0, None]}),
    "1": (is_one, {"enum": [1, None]}),
    "at most 0": (is_not_positive, {"anyOf": [NULL, {"type": "number", "maximum": 0}]}),
    "empty": (
        is_empty,
        {
            "anyOf": [
                NULL,
                {"type": "string", "maxLength": 0},
                {"type": "array", "maxItems": 0},
                {"type": "object", "maxProperties": 0},
            ]
        },
    ),
    '"Automatic"': (is_automatic, {"enum": ["Automatic", None]}),
    '"None"': (is_no_refiner, {"enum": ["", "None", None]}),
}
# A1111's fields of what fewstep does not do → (what they do, the NEUTRAL values they take)
UNSUPPORTED = {
    "enable_hr": ("the hires fix", "false"),
    "subseed_strength": ("variation seeds", "0"),
    "seed_resize_from_h": ("seed resizing", "at most 0"),
    "seed_resize_from_w": ("seed resizing", "at most 0"),
    "restore_faces": ("face restoration", "false"),
    "tiling": ("tiling", "false"),
    "styles": ("styles", "empty"),
    "script_name": ("scripts", "empty"),
    "alwayson_scripts": ("scripts", "empty"),
    "infotext": ("reading settings from an infotext", "empty"),
    "init_images": ("img2img", "empty"),
    "s_churn": ("s_churn", "0"),
    "s_noise": ("s_noise", "1"),
    "s_min_uncond": ("s_min_uncond", "0"),
    "scheduler": ("schedule types", '"Automatic"'),
    "refiner_checkpoint": ("refiners", '"None"'),
}
KNOWN_FIELDS = frozenset(USED_FIELDS + IGNORED_FIELDS + tuple(UNSUPPORTED))

# img2img: txt2img's fields but the hires fix's (A1111's img2img has none), and its own
TXT2IMG_ONLY = ("enable_hr", "denoising_strength", "init_images") + tuple(
    name for name in IGNORED_FIELDS if name.startswith(("hr_", "firstphase_"))
)
IMG2IMG_USED_FIELDS = (
    *USED_FIELDS,
    "init_images",
    "denoising_strength",
    "resize_mode",
)
IMG2IMG_IGNORED_FIELDS = (
    *(name for name in IGNORED_FIELDS if name not in TXT2IMG_ONLY),
    "mask_blur",  # these act only with a mask
    "mask_blur_x",
    "mask_blur_y",
    "mask_round",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "inpainting_mask_invert",
    "image_cfg_scale",  # only with an instruct-pix2pix model
)
IMG2IMG_UNSUPPORTED = {
    **{name: what for name, what in UNSUPPORTED.items() if name not in TXT2IMG_ONLY},
    "mask": ("inpainting", "empty"),
    "latent_mask": ("inpainting", "empty"),
    "initial_noise_multiplier": ("noise multipliers", "1"),
    "include_init_images": ("returning the input images", "false"),
}
IMG2IMG_KNOWN_FIELDS = frozenset(
    IMG2IMG_USED_FIELDS + IMG2IMG_IGNORED_FIELDS + tuple(IMG2IMG_UNSUPPORTED)
)
A1111_DENOISING_STRENGTH = 0.75  # img2img's default in A1111
RESIZE_MODES = {0: "just resize"}  # the ones done here, of A1111's 0..3
OVERRIDE_SETTINGS = ("sd_model_checkpoint",)

# fewstep's argument names (as its checks' messages start) → A1111's field names
A1111_FIELD_OF = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "height": "height",
    "width": "width",
    "n": "batch_size",
    "num_images_per_prompt": "batch_size",
    "seed": "seed",
    "eta": "eta",
    "scheduler": "sampler_name",
    "image": "init_images",  # img2img
    "strength": "denoising_strength",
}


def param_of(message: str) -> str | None:
    """The A1111 field a fewstep check's message names (it starts with the argument)."""
    if message.startswith("a call makes at most"):  # the images-per-call limit
        return "batch_size"
    match = re.match(r"[A-Za-z_]+", message)
    return A1111_FIELD_OF.get(match.group()) if match else None


# -- the request -----------------------------------------------------------------------------


def check_fields(
    body: dict[str, Any],
    known: frozenset[str] = KNOWN_FIELDS,
    unsupported: dict[str, tuple[str, str]] = UNSUPPORTED,
) -> None:
    """400 naming an unknown field, or one of what fewstep does not do set to act."""
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError(400, f"unknown fields {unknown}; accepted: {sorted(known)}", unknown[0])
    send_images = body.get("send_images")
    if send_images is not None and not isinstance(send_images, bool):
        raise APIError(
            400, f"send_images must be true or false, got {send_images!r:.80}", "send_images"
        )
    for field, (feature, neutral) in unsupported.items():
        does_nothing = NEUTRAL[neutral][0]
        if field in body and not does_nothing(body[field]):
            raise APIError(
                400,
                f"{field}: fewstep does not do {feature}; leave {field} out or {neutral}, "
                f"got {body[field]!r:.80}",
                field,
            )


def model_titles(service: Service) -> dict[str, str]:
    """A1111's checkpoint title of each served model: its name and short hash."""
    titles = {}
    for name in service.models:
        short = short_hash(service.model_hashes[name])
        titles[name] = f"{name} [{short}]" if short else name
    return titles


def short_hash(model_hash: Any) -> str | None:
    return model_hash[:10] if isinstance(model_hash, str) and model_hash else None


def chosen_model(service: Service, override_settings: Any) -> str:
    """The model `override_settings.sd_model_checkpoint` names (a served name or title)."""
    if override_settings is None:
        override_settings = {}
    if not isinstance(override_settings, dict):
        raise APIError(
            400,
            f"override_settings must be an object, got {override_settings!r:.80}",
            "override_settings",
        )
    unknown = sorted(set(override_settings) - set(OVERRIDE_SETTINGS))
    if unknown:
        raise APIError(
            400,
            f"override_settings {unknown} are not supported; only {list(OVERRIDE_SETTINGS)}",
            f"override_settings.{unknown[0]}",
        )
    checkpoint = override_settings.get("sd_model_checkpoint")
    by_title = {title: name for name, title in model_titles(service).items()}
    if isinstance(checkpoint, str) and checkpoint in by_title:
        checkpoint = by_title[checkpoint]
    return service.model_named(checkpoint, "override_settings.sd_model_checkpoint")


def chosen_scheduler(body: dict[str, Any]) -> str | None:
    """fewstep's scheduler for `sampler_name`, else `sampler_index` (both checked when
    given); None: the model's own."""
    schedulers = []
    for field in ("sampler_name", "sampler_index"):
        if body.get(field) is not None:
            try:
                schedulers.append(scheduler_for_a1111(body[field], field))
            except ValueError as e:
                raise APIError(400, str(e), field) from e
    return schedulers[0] if schedulers else None


def ddim_eta(eta: Any, sampler: str) -> float:
    """fewstep's eta: DDIM's is A1111's (default 0); the ancestral and SDE samplers run at
    A1111's default eta of 1 only; the others take none, so it changes nothing there (it is
    still checked)."""
    if eta is None:
        return 0.0
    try:
        eta = check_number("eta", eta, 0.0, 1.0)
    except ValueError as e:
        raise APIError(400, str(e), "eta") from e
    if sampler.removesuffix("_karras") in ETA_ONE_SAMPLERS and eta != 1:
        label = SAMPLER_LABELS.get(sampler, sampler)
        raise APIError(400, f"eta must be 1 or null for {label!r} here, got {eta:g}", "eta")
    return eta if sampler == "ddim" else 0.0


def image_count(body: dict[str, Any], max_images: int) -> tuple[int, int]:
    """(batch_size, n_iter), each >= 1 and together within the model's images per call."""
    try:
        batch_size = check_integer("batch_size", _or_default(body.get("batch_size"), 1), 1)
        n_iter = check_integer("n_iter", _or_default(body.get("n_iter"), 1), 1)
    except ValueError as e:
        raise APIError(400, str(e), str(e).split()[0]) from e
    if batch_size * n_iter > max_images:
        raise APIError(
            400,
            f"batch_size × n_iter must be at most {max_images} images for this model, got "
            f"{batch_size} × {n_iter} = {batch_size * n_iter}",
            "batch_size",
        )
    return batch_size, n_iter


def random_or(seed: Any) -> Any:
    """A1111's seed: -1 or null draws one at random; any other value is checked later."""
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed == -1):
        return secrets.randbelow(A1111_RANDOM_SEEDS)
    return seed


@dataclasses.dataclass(frozen=True)
class Txt2Img:
    """A checked txt2img request: ONE GenerationRequest of batch_size × n_iter images, and
    fewstep's name of the sampler it runs."""

    gen: GenerationRequest
    batch_size: int
    n_iter: int
    sampler: str


def generation_request(
    body: dict[str, Any], service: Service, model: str | None = None, **img2img: Any
) -> tuple[str, Txt2Img]:
    """The model and the checked request of a txt2img body (400 naming the first bad
    field, 404 for a model not served). img2img: its `model` (`img2img_model`) and the
    request's `image` and `strength`."""
    if model is None:
        check_fields(body)
        model = chosen_model(service, body.get("override_settings"))
    pipe = service.models[model]
    batch_size, n_iter = image_count(body, pipe.limits.max_images)
    scheduler = chosen_scheduler(body)
    info = pipe.info
    sampler = scheduler or sampler_name_for(info.scheduler_class, info.scheduler_config)
    eta = ddim_eta(body.get("eta"), sampler)
    given: dict[str, Any] = {
        "num_inference_steps": body.get("steps"),
        "guidance_scale": body.get("cfg_scale"),
        "height": body.get("height"),
        "width": body.get("width"),
    }
    try:
        gen = GenerationRequest(
            prompt=_or_default(body.get("prompt"), ""),
            negative_prompt=_or_default(body.get("negative_prompt"), ""),
            seed=random_or(body.get("seed")),
            n=batch_size * n_iter,
            scheduler=scheduler,
            eta=eta,
            **given,
            **img2img,
        )
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e), param_of(str(e))) from e
    return model, Txt2Img(gen, batch_size, n_iter, sampler)


# -- the answer ------------------------------------------------------------------------------


def resolved_fields(request: Txt2Img, images: RequestImages, model: str) -> dict[str, Any]:
    """The values the images were made with, under A1111's field names."""
    gen, settings = request.gen, images.settings
    guidance = settings["guidance_scale"]
    return {
        "prompt": gen.prompt,
        "negative_prompt": gen.negative_prompt,
        "steps": settings["num_inference_steps"],
        "cfg_scale": guidance[0] if isinstance(guidance, list) else guidance,
        "width": settings["width"],
        "height": settings["height"],
        "seed": gen.seed,
        "batch_size": request.batch_size,
        "n_iter": request.n_iter,
        "sampler_name": SAMPLER_LABELS.get(settings["sampler"], settings["sampler"]),
        "override_settings": {"sd_model_checkpoint": model},
        **({"eta": gen.eta} if request.sampler == "ddim" else {}),  # else as given
        **({"denoising_strength": settings["strength"]} if "strength" in settings else {}),
    }


def info_json(
    resolved: dict[str, Any], texts: list[str], model: str, model_hash: Any, seeds: list[int]
) -> str:
    """A1111's `info`: the JSON text of its `Processed.js()`, for fewstep's images."""
    n = len(seeds)
    info = {
        "prompt": resolved["prompt"],
        "all_prompts": [resolved["prompt"]] * n,
        "negative_prompt": resolved["negative_prompt"],
        "all_negative_prompts": [resolved["negative_prompt"]] * n,
        "seed": resolved["seed"],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": resolved["width"],
        "height": resolved["height"],
        "sampler_name": resolved["sampler_name"],
        "cfg_scale": resolved["cfg_scale"],
        "steps": resolved["steps"],
        "batch_size": resolved["batch_size"],
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model,
        "sd_model_hash": short_hash(model_hash),
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": resolved.get("denoising_strength"),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": [],
        "job_timestamp": datetime.datetime.now().strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"fewstep {fewstep.__version__}",
    }
    return json.dumps(info)


# -- the endpoints ---------------------------------------------------------------------------


def img2img_model(body: dict[str, Any], service: Service) -> str:
    """The model of an img2img body, its fields checked (not yet the image)."""
    check_fields(body, IMG2IMG_KNOWN_FIELDS, IMG2IMG_UNSUPPORTED)
    resize_mode = body.get("resize_mode")
    if resize_mode is not None and (
        not isinstance(resize_mode, int) or isinstance(resize_mode, bool) or resize_mode != 0
    ):
        raise APIError(
            400,
            f"resize_mode must be 0 (just resize) or null here; fewstep does not crop or "
            f"fill (A1111's 1..3), got {resize_mode!r:.80}",
            "resize_mode",
        )
    strength = body.get("denoising_strength")
    if strength is not None and not _number(strength):
        raise APIError(
            400,
            f"denoising_strength must be a number in (0, 1], got {strength!r:.80}",
            "denoising_strength",
        )
    return chosen_model(service, body.get("override_settings"))


def first_init_image(body: dict[str, Any]) -> bytes:
    """The file bytes of `init_images[0]` (A1111 uses the first image only)."""
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise APIError(
            400,
            f"init_images must be a list of base64 images (the first is used), got {images!r:.80}",
            "init_images",
        )
    return base64_image_bytes(images[0], "init_images")


async def txt2img(request: Request, service: Service) -> Response:
    body = await read_json_body(request)
    model, checked = generation_request(body, service)
    return await answer(request, service, body, model, checked)


async def img2img(request: Request, service: Service) -> Response:
    body = await read_json_body(request, MAX_IMAGE_BODY_BYTES)
    model = img2img_model(body, service)
    data = first_init_image(body)
    image = await decode_image(data, "init_images", service.models[model])
    strength = _or_default(body.get("denoising_strength"), A1111_DENOISING_STRENGTH)
    model, checked = generation_request(body, service, model, image=image, strength=strength)
    # as A1111 answers: the images given are not sent back
    body = {**body, "init_images": None, "mask": None}
    return await answer(request, service, body, model, checked)


async def answer(
    request: Request, service: Service, body: dict[str, Any], model: str, checked: Txt2Img
) -> Response:
    """A1111's answer to a checked request: its images, parameters and info."""
    gen = checked.gen
    images = await service.generate(model, gen, request, param_of)
    model_hash = service.model_hashes[model]
    texts = infotexts(images, gen, model, model_hash)
    send_images = body.get("send_images") is not False
    pngs = await service.encode(model, encode_pngs, images, texts) if send_images else []
    resolved = resolved_fields(checked, images, model)
    return JSONResponse(
        {
            "images": pngs,
            "parameters": {**body, **resolved},
            "info": info_json(resolved, texts, model, model_hash, gen.seeds),
        }
    )


async def samplers(request: Request, service: Service) -> Response:
    return JSONResponse([{"name": name, "aliases": [], "options": {}} for name in A1111_SAMPLERS])


async def sd_models(request: Request, service: Service) -> Response:
    titles = model_titles(service)
    models = []
    for name, pipe in service.models.items():
        model_hash = service.model_hashes[name]
        path = getattr(pipe, "path", None)
        models.append(
            {
                "title": titles[name],
                "model_name": name,
                "hash": short_hash(model_hash),
                "sha256": model_hash if isinstance(model_hash, str) else None,
                "filename": Path(path).name if path is not None else name,
                "config": None,
            }
        )
    return JSONResponse(models)
