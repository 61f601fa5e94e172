"""A generation call's arguments, checked; and the limits that bound what one call may ask.

`check_inputs` is the first step of `Pipeline.__call__` (as `check_inputs` is of diffusers'
pipelines): every argument is checked before any graph runs, and a bad one is a ValueError
that names it, says what is allowed and shows the value given. Numbers may be Python or numpy
scalars alike; a bool is not a number here (`num_inference_steps=True` is a mistake, not 1),
and a string is not a number either (`eta="0.5"`).

img2img's `image` is checked and decoded here too (fewstep.image_inputs), last, since decoding
a file is the costliest check; its size then decides height and width unless they are given.

`Limits` bound the work one call can ask for: pixels per image, images per call (across all
prompts), sampler steps and prompt length. A server takes these from strangers, so the
defaults are what a user of SD-family models asks for (2048² is past SDXL's native 1024²;
A1111's step slider stops at 150), not what the hardware could survive.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from fewstep.image_inputs import ImageInput, check_image
from fewstep.package import ModelInfo

OUTPUT_TYPES = ("pil", "np")
MAX_SEED = 2**64 - 1
MAX_GUIDANCE_SCALE = 100.0
# img2img's default strength per family, as diffusers' img2img pipelines default it
# (StableDiffusionXLImg2ImgPipeline: 0.3; the SD, LCM and SD-Turbo ones: 0.8).
DEFAULT_STRENGTH = 0.8
SDXL_DEFAULT_STRENGTH = 0.3


def default_strength(info: ModelInfo) -> float:
    return SDXL_DEFAULT_STRENGTH if info.family == "sdxl" else DEFAULT_STRENGTH


class NoiseSource(Protocol):
    """What draws initial latents and per-step noise: numpy's Generator fits."""

    def standard_normal(self, size: tuple[int, ...], dtype: Any = ...) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one generation call may ask for; checked before any graph runs."""

    max_pixels: int = 2048 * 2048  # height × width of one image
    max_images: int = 64  # images per call, all prompts together
    max_steps: int = 150  # num_inference_steps
    max_prompt_chars: int = 10_000  # per prompt (CLIP reads 77 tokens; this bounds tokenizing)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{field.name} must be an integer >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CheckedInputs:
    """The arguments of one call, checked and resolved against the model's defaults."""

    prompts: list[str]
    negative_prompts: list[str]
    num_inference_steps: int
    guidance_scale: float | tuple[float, ...]  # one for the call, or one per image
    height: int
    width: int
    num_images_per_prompt: int
    seed: int | tuple[int, ...] | None  # one for the call, or one per image
    generator: NoiseSource | tuple[NoiseSource, ...] | None
    latents: np.ndarray | None  # float32 [B, C, h, w], finite
    eta: float
    guidance_rescale: float
    output_type: str
    scheduler: str | None
    image: ImageInput | None = None  # img2img's input images, at the call's size
    strength: float | None = None  # img2img only: the share of the schedule that runs

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt


def check_integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    """An int or numpy integer in [low, high], else ValueError naming `name`."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok and low <= value and (high is None or value <= high):
        return int(value)
    allowed = f"between {low} and {high}" if high is not None else f">= {low}"
    raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")


def check_number(name: str, value: Any, low: float, high: float) -> float:
    """A finite int/float (Python or numpy) in [low, high], else ValueError naming `name`."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )
    if ok and math.isfinite(value) and low <= value <= high:
        return float(value)
    raise ValueError(f"{name} must be a number between {low:g} and {high:g}, got {value!r}")


def check_text(name: str, value: Any, max_chars: int) -> str:
    """A str that UTF-8 can encode (no lone surrogates) of at most `max_chars` characters."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__} {value!r:.80}")
    if len(value) > max_chars:
        raise ValueError(f"{name} must be at most {max_chars} characters, got {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid text: {e.reason} at index {e.start}") from e
    return value


def check_texts(name: str, value: Any, max_chars: int) -> list[str]:
    """A str, or a non-empty list/tuple of them (not a dict, set or other iterable)."""
    if isinstance(value, str):
        return [check_text(name, value, max_chars)]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"{name} must be a string or a non-empty list of strings, got "
            f"{type(value).__name__} {value!r:.80}"
        )
    return [check_text(f"{name}[{i}]", v, max_chars) for i, v in enumerate(value)]


def check_size(name: str, value: int, multiple: int) -> int:
    size = check_integer(name, value, multiple)
    if size % multiple:
        raise ValueError(
            f"{name} must be a multiple of {multiple} for this model (its VAE and U-Net "
            f"downsample by {multiple} in all), got {size}"
        )
    return size


def check_strength(value: Any) -> float:
    """img2img's strength: a number in (0, 1], the share of the schedule that runs."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )
    if ok and math.isfinite(value) and 0 < value <= 1:
        return float(value)
    raise ValueError(f"strength must be a number in (0, 1] (0 excluded), got {value!r}")


def check_pixels(height: int, width: int, limits: Limits) -> None:
    if height * width > limits.max_pixels:
        raise ValueError(
            f"height × width must be at most {limits.max_pixels} pixels, got "
            f"{height}×{width} = {height * width}"
        )


def check_guidance(name: str, value: Any) -> float:
    return check_number(name, value, 0.0, MAX_GUIDANCE_SCALE)


def check_generator(name: str, value: Any) -> NoiseSource:
    if isinstance(value, np.random.RandomState) or not callable(  # no dtype= in RandomState
        getattr(value, "standard_normal", None)
    ):
        raise ValueError(
            f"{name} must be a numpy Generator (numpy.random.default_rng(seed)) or another "
            f"NoiseSource, got {type(value).__name__}"
        )
    return value


def per_image(name: str, value: Any, batch: int, check: Callable[[str, Any], Any]) -> Any:
    """One checked value, or a list/tuple of one per image (prompts × num_images_per_prompt,
    in that order) as a tuple: what lets requests with their own seeds and guidance share a
    batch and each get the images it would get alone."""
    if not isinstance(value, (list, tuple)):
        return check(name, value)
    if len(value) != batch:
        raise ValueError(
            f"{name} as a list must have one entry per image ({batch}), got {len(value)}"
        )
    return tuple(check(f"{name}[{i}]", v) for i, v in enumerate(value))


def check_latents(value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Float latents of `shape` with finite values → float32 (a copy when cast)."""
    try:
        array = np.asarray(value)
    except Exception as e:  # whatever the object's __array__ raises
        raise ValueError(f"latents must be a float array, got {type(value).__name__}: {e}") from e
    if array.dtype.kind not in "fiu":
        raise ValueError(f"latents must be a real float array, got dtype {array.dtype}")
    if array.shape != shape:
        raise ValueError(
            f"latents must have shape {shape} for this batch and size, got {array.shape}"
        )
    with np.errstate(over="ignore"):  # an overflow becomes inf, refused next
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise ValueError(f"latents must be finite in float32, got {bad} NaN or infinite values")
    return array


def check_inputs(
    *,
    prompt: Any,
    negative_prompt: Any,
    num_inference_steps: Any,
    guidance_scale: Any,
    height: Any,
    width: Any,
    num_images_per_prompt: Any,
    seed: Any,
    generator: Any,
    latents: Any,
    eta: Any,
    guidance_rescale: Any,
    output_type: Any,
    scheduler: Any,
    info: ModelInfo,
    samplers: Sequence[str],
    limits: Limits,
    image: Any = None,
    strength: Any = None,
) -> CheckedInputs:
    """Check one call's arguments; None for steps, guidance, height or width takes the
    model's default. With `image` (img2img, fewstep.image_inputs) the size is the image's
    unless height and width say otherwise, and `strength` defaults to `default_strength`."""
    if num_inference_steps is None:
        num_inference_steps = info.default_num_inference_steps
    if guidance_scale is None:
        guidance_scale = info.default_guidance_scale
    if image is None:
        height = info.default_height if height is None else height
        width = info.default_width if width is None else width
    prompts = check_texts("prompt", prompt, limits.max_prompt_chars)
    if negative_prompt is None:
        negatives = [""] * len(prompts)
    elif isinstance(negative_prompt, str):
        negatives = [check_text("negative_prompt", negative_prompt, limits.max_prompt_chars)]
        negatives *= len(prompts)
    else:
        negatives = check_texts("negative_prompt", negative_prompt, limits.max_prompt_chars)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"negative_prompt must have one entry per prompt ({len(prompts)}), "
                f"got {len(negatives)}"
            )
    steps = check_integer("num_inference_steps", num_inference_steps, 1, limits.max_steps)
    if height is not None:
        height = check_size("height", height, info.size_multiple)
    if width is not None:
        width = check_size("width", width, info.size_multiple)
    if height is not None and width is not None:
        check_pixels(height, width, limits)
    per_prompt = check_integer("num_images_per_prompt", num_images_per_prompt, 1)
    if len(prompts) * per_prompt > limits.max_images:
        raise ValueError(
            f"a call makes at most {limits.max_images} images, got {len(prompts)} prompts × "
            f"num_images_per_prompt {per_prompt} = {len(prompts) * per_prompt}"
        )
    if image is None and strength is not None:
        raise ValueError(f"strength is for img2img: pass it with an image, got {strength!r} alone")
    if image is not None:
        strength = check_strength(default_strength(info) if strength is None else strength)
        if latents is not None:
            raise ValueError("pass either image (img2img) or latents, not both")
    eta = check_number("eta", eta, 0.0, 1.0)
    guidance_rescale = check_number("guidance_rescale", guidance_rescale, 0.0, 1.0)
    if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if scheduler is not None and (not isinstance(scheduler, str) or scheduler not in samplers):
        raise ValueError(f"scheduler must be one of {tuple(samplers)}, got {scheduler!r}")
    batch = len(prompts) * per_prompt
    guidance = per_image("guidance_scale", guidance_scale, batch, check_guidance)
    if isinstance(guidance, tuple) and len({g > 1 for g in guidance}) > 1:
        raise ValueError(
            "guidance_scale values must all be > 1 (guided) or all <= 1 (unguided) in one "
            f"call, got {list(guidance)}"
        )
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        seed = per_image("seed", seed, batch, lambda name, v: check_integer(name, v, 0, MAX_SEED))
    if generator is not None:
        generator = per_image("generator", generator, batch, check_generator)
    image_input = None
    if image is not None:  # last: decoding files is the costly check
        image_input = check_image(
            image,
            prompts=len(prompts),
            per_prompt=per_prompt,
            multiple=info.size_multiple,
            max_pixels=limits.max_pixels,
            height=height,
            width=width,
        )
        height, width = image_input.height, image_input.width
        check_pixels(height, width, limits)
    checked_latents = None
    if latents is not None:
        scale = info.vae_scale_factor
        shape = (batch, info.latent_channels, height // scale, width // scale)
        checked_latents = check_latents(latents, shape)
    return CheckedInputs(
        prompts=prompts,
        negative_prompts=negatives,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        num_images_per_prompt=per_prompt,
        seed=seed,
        generator=generator,
        latents=checked_latents,
        eta=eta,
        guidance_rescale=guidance_rescale,
        output_type=output_type,
        scheduler=scheduler,
        image=image_input,
        strength=strength,
    )
