"""img2img's input images: what `Pipeline(…, image=…)` takes, checked and made into the VAE
encoder's input; and the latents sampled from what the encoder returns.

`image` is one of
- a PIL image;
- a numpy array [H, W, 3] (uint8 0..255, or float 0..1), or a batch of them [N, H, W, 3];
- the path (str or os.PathLike) or the bytes of a PNG, JPEG or WebP file;
- a list or tuple of these, each one image;
and holds one image for the whole call, one per prompt (for that prompt's
`num_images_per_prompt` images) or one per generated image.

Files come from strangers when a server passes them on, so they are opened defensively: only
Pillow's PNG, JPEG and WebP decoders are tried; a file may hold at most
`max_file_bytes(max_pixels)` bytes; the size in its header must be at most `Limits.max_pixels`
before any pixel is decoded (which refuses decompression bombs; Pillow's own bomb check stays
on above that); a truncated or corrupt file is a ValueError naming `image`. A file's image is
turned upright by its EXIF orientation and converted to RGB, as diffusers' `load_image` does;
of an animation, the first frame is used. PIL images and arrays given as such are bounded by
`max_pixels` too, and converted to RGB without turning (as diffusers takes them); 16- and
32-bit modes are refused rather than clipped.

Size, as diffusers' `VaeImageProcessor.preprocess`: each image is resized to the first one's
size rounded down to a multiple, or to `height` × `width` when the call gives them; PIL images
with Lanczos, arrays with nearest neighbour (torch's `interpolate`, which diffusers uses for
arrays). An image already at that size is not resampled. Deviation: diffusers rounds down to a
multiple of the VAE's factor (8); fewstep rounds to the model's size multiple (the VAE's
factor times the U-Net's downsampling, 64 for SD 1.x), the sizes its graphs take. Pixels are
x / 255 for 8-bit input, then 2x − 1: float32 [N, 3, H, W], the encoder's input.

Latents: the VAE encoder returns the mean and log-variance of a diagonal Gaussian per image;
the image's latents are one sample of it, mean + exp(½·clip(logvar, −30, 20))·z (diffusers'
`DiagonalGaussianDistribution.sample`), times the VAE's scaling factor, with z drawn from the
call's noise source where diffusers draws it from its generator (`sample_image_latents`).
A tiny autoencoder (diffusers' AutoencoderTiny) returns the latents themselves: they are
only scaled, and no noise is drawn (`scaled_image_latents`).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FILE_FORMATS = ("PNG", "JPEG", "WEBP")  # the Pillow decoders a file may use
# The most bytes a file needs per pixel (16-bit RGBA stored uncompressed), and room for its
# metadata and an embedded colour profile.
FILE_BYTES_PER_PIXEL = 8
FILE_OVERHEAD_BYTES = 1 << 20
# VaeImageProcessor's default: Lanczos for PIL images.
PIL_RESAMPLE = "LANCZOS"
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


def max_file_bytes(max_pixels: int) -> int:
    """The largest image file taken for an image of at most `max_pixels` pixels."""
    return FILE_BYTES_PER_PIXEL * max_pixels + FILE_OVERHEAD_BYTES


@dataclasses.dataclass(frozen=True, eq=False)
class ImageInput:
    """A call's input images, checked: the VAE encoder's input, and which of them each
    generated image starts from."""

    pixels: np.ndarray  # float32 [N, 3, H, W] in -1..1
    rows: tuple[int, ...]  # per generated image (prompts × num_images_per_prompt): its row

    @property
    def height(self) -> int:
        return int(self.pixels.shape[2])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[3])


def check_image(
    value: Any,
    *,
    prompts: int,
    per_prompt: int,
    multiple: int,
    max_pixels: int,
    height: int | None = None,
    width: int | None = None,
    name: str = "image",
) -> ImageInput:
    """`value` (module docstring) checked, decoded and resized: ValueError naming `name`.

    `height`/`width`, when given, are the size to resize to (already checked); otherwise the
    first image's size rounded down to `multiple`.
    """
    entries = _entries(value, name)
    rows = image_rows(len(entries), prompts, per_prompt, name)
    images = [decoded_image(entry, label, max_pixels) for entry, label in entries]
    first_height, first_width = _size(images[0])
    size = (
        _rounded(first_height, multiple, name, "height") if height is None else height,
        _rounded(first_width, multiple, name, "width") if width is None else width,
    )
    pixels = np.stack([_resized_pixels(image, size) for image in images])  # [N, H, W, 3]
    pixels = pixels.transpose(0, 3, 1, 2) * np.float32(2.0) - np.float32(1.0)
    return ImageInput(np.ascontiguousarray(pixels, dtype=np.float32), rows)


def image_rows(count: int, prompts: int, per_prompt: int, name: str = "image") -> tuple[int, ...]:
    """For each generated image, which of `count` input images it starts from: all from one,
    one per prompt (each for that prompt's images), or one each."""
    batch = prompts * per_prompt
    if count == 1:
        return (0,) * batch
    if count == batch:
        return tuple(range(batch))
    if count == prompts:
        return tuple(i for i in range(prompts) for _ in range(per_prompt))
    raise ValueError(
        f"{name} must be one image, one per prompt ({prompts}) or one per generated image "
        f"({batch}), got {count}"
    )


def sample_image_latents(
    moments: np.ndarray,
    rows: Sequence[int],
    draw: Callable[[tuple[int, ...]], np.ndarray],
    per_image: bool,
    scaling_factor: float,
) -> np.ndarray:
    """The clean latents of each generated image, float32 [B, C, h, w]: a sample of the VAE
    encoder's distribution (`moments` [N, 2C, h, w], mean then log-variance) of its input
    image (`rows`), times `scaling_factor`.

    z comes from `draw(shape)`, as diffusers' img2img pipelines draw it from their generator:
    with a noise source per image (`per_image`; diffusers: a list of generators) each
    generated image draws its own z; with one source, one z of each input image is drawn
    (diffusers encodes the given images as one batch) and shared by the images made from it.
    """
    mean, logvar = np.split(np.asarray(moments, dtype=np.float32), 2, axis=1)
    std = np.exp(np.float32(0.5) * np.clip(logvar, *LOGVAR_RANGE))
    index = np.asarray(rows, dtype=np.int64)
    if per_image:
        mean, std = mean[index], std[index]
        sample = mean + std * draw(tuple(mean.shape))
    else:
        sample = (mean + std * draw(tuple(mean.shape)))[index]
    return (np.float32(scaling_factor) * sample).astype(np.float32, copy=False)


def scaled_image_latents(
    latents: np.ndarray, rows: Sequence[int], scaling_factor: float
) -> np.ndarray:
    """The clean latents of each generated image, float32 [B, C, h, w], from a tiny
    autoencoder's latents of the input images ([N, C, h, w]): its input image's (`rows`),
    times `scaling_factor` (diffusers' `retrieve_latents` returns an AutoencoderTiny's
    `latents` as they are)."""
    index = np.asarray(rows, dtype=np.int64)
    sample = np.asarray(latents, dtype=np.float32)[index]
    return (np.float32(scaling_factor) * sample).astype(np.float32, copy=False)


# -- entries ------------------------------------------------------------------------------


def _entries(value: Any, name: str) -> list[tuple[Any, str]]:
    """(one image's value, its name in messages) for each image in `value`, undecoded."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name} must hold at least one image, got an empty list")
        entries = []
        for i, item in enumerate(value):
            if isinstance(item, (list, tuple)) or (isinstance(item, np.ndarray) and item.ndim == 4):
                raise ValueError(
                    f"{name}[{i}] must be one image, got {type(item).__name__} "
                    f"{getattr(item, 'shape', '')}"
                )
            entries.append((item, f"{name}[{i}]"))
        return entries
    if isinstance(value, np.ndarray) and value.ndim == 4:
        if not len(value):
            raise ValueError(f"{name} must hold at least one image, got shape {value.shape}")
        return [(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return [(value, name)]


def decoded_image(value: Any, name: str, max_pixels: int) -> Any:
    """One image as a loaded RGB PIL image or a float32 [H, W, 3] array in 0..1."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return _rgb(value, name, max_pixels, upright=False)
    if isinstance(value, np.ndarray):
        return _array_image(value, name, max_pixels)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        _check_file_bytes(len(data), name, None, max_pixels)
        return _open(data, name, f"{len(data)} bytes", max_pixels)
    if isinstance(value, (str, os.PathLike)):
        return _open(_read_file(value, name, max_pixels), name, repr(str(value)), max_pixels)
    raise ValueError(
        f"{name} must be a PIL image, a numpy array [height, width, 3], a path or the bytes "
        f"of a PNG, JPEG or WebP file, or a list of them, got {type(value).__name__}"
    )


def _check_pixels(width: int, height: int, name: str, max_pixels: int) -> None:
    if width < 1 or height < 1 or width * height > max_pixels:
        raise ValueError(
            f"{name} must have between 1 and {max_pixels} pixels, got {width}×{height} "
            f"(width × height) = {width * height}"
        )


def _check_file_bytes(size: int, name: str, path: str | None, max_pixels: int) -> None:
    limit = max_file_bytes(max_pixels)
    if size > limit:
        where = f" ({path})" if path else ""
        raise ValueError(
            f"{name} must be an image file of at most {limit} bytes (for at most {max_pixels} "
            f"pixels), got {'more than ' if path else ''}{size} bytes{where}"
        )


def _read_file(path_like: str | os.PathLike, name: str, max_pixels: int) -> bytes:
    """The file's bytes: a regular file, read no further than the size limit."""
    path = Path(path_like)
    if not path.is_file():
        raise ValueError(f"{name} must be an image file, got {str(path_like)!r}: no such file")
    limit = max_file_bytes(max_pixels)
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ValueError(f"{name} file {str(path_like)!r} could not be read: {e}") from e
    _check_file_bytes(len(data), name, repr(str(path_like)), max_pixels)
    return data


def _open(data: bytes, name: str, label: str, max_pixels: int) -> Any:
    """The file image in `data`, upright and RGB; its header's size is checked first."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data), formats=FILE_FORMATS)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name} ({label}) is refused as a decompression bomb: {e}") from e
    except Exception as e:  # Pillow raises many kinds for a file it cannot identify
        raise ValueError(f"{name} ({label}) is not a PNG, JPEG or WebP image: {e}") from e
    with image:
        return _rgb(image, name, max_pixels, upright=True, label=label)


def _rgb(image: Any, name: str, max_pixels: int, upright: bool, label: str = "") -> Any:
    """A loaded RGB copy of a PIL image, its size checked before its pixels are decoded."""
    from PIL import ImageOps

    _check_pixels(image.width, image.height, name, max_pixels)
    mode = str(image.mode)
    if mode in ("I", "F") or mode.startswith("I;"):
        raise ValueError(
            f"{name} must have 8-bit pixels (RGB, RGBA, L, P, …), got mode {mode!r}; convert "
            "it to 8-bit RGB first"
        )
    try:
        if upright:
            image = ImageOps.exif_transpose(image)
        return image.convert("RGB") if image.mode != "RGB" else image.copy()
    except Exception as e:  # truncated or corrupt data: OSError, SyntaxError, zlib errors, …
        where = f" ({label})" if label else ""
        raise ValueError(f"{name}{where} could not be decoded: {e}") from e


def _array_image(array: np.ndarray, name: str, max_pixels: int) -> np.ndarray:
    """[H, W, 3] uint8 or float 0..1 → float32 in 0..1."""
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"{name} as an array must be [height, width, 3] (RGB) or [N, height, width, 3], "
            f"got shape {array.shape}"
        )
    _check_pixels(array.shape[1], array.shape[0], name, max_pixels)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    if array.dtype.kind != "f":
        raise ValueError(
            f"{name} as an array must be uint8 (0..255) or float (0..1), got dtype {array.dtype}"
        )
    with np.errstate(over="ignore"):  # an overflow becomes inf, refused next
        values = array.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(values).all() and low >= 0.0 and high <= 1.0):
        raise ValueError(
            f"{name} as a float array must hold finite values in 0..1, got {low:g}..{high:g}"
        )
    return values


# -- size ---------------------------------------------------------------------------------


def _size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image or an [H, W, 3] array."""
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    return int(image.height), int(image.width)


def _rounded(size: int, multiple: int, name: str, side: str) -> int:
    rounded = size - size % multiple
    if rounded < multiple:
        raise ValueError(
            f"{name} {side} must be at least {multiple} pixels for this model (sizes are "
            f"rounded down to a multiple of {multiple}), got {size}"
        )
    return rounded


def _resized_pixels(image: Any, size: tuple[int, int]) -> np.ndarray:
    """float32 [H, W, 3] in 0..1 at `size` (height, width)."""
    height, width = size
    if isinstance(image, np.ndarray):
        rows = _nearest_indices(image.shape[0], height)
        cols = _nearest_indices(image.shape[1], width)
        return image[rows][:, cols]
    if (image.height, image.width) != size:
        from PIL import Image

        resample = getattr(Image.Resampling, PIL_RESAMPLE)
        image = image.resize((width, height), resample=resample, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255.0)


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source indices of torch's nearest `interpolate` (CPU): ⌊i · (in / out)⌋ in float32,
    capped at in − 1."""
    if size_in == size_out:
        return np.arange(size_in)
    scale = np.float32(size_in) / np.float32(size_out)
    index = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, size_in - 1)
