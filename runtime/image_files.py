"""Image files as fewstep writes them: PNG, JPEG or WebP, with A1111's generation parameters.

The parameters text (`<prompt>\\nNegative prompt: <neg>\\nSteps: 20, Sampler: Euler a, CFG
scale: 7, Seed: 123, Size: 512x512, Model hash: …, Model: …`, the negative line only when set;
img2img adds `, Denoising strength: 0.75` last, as A1111 writes it) goes where A1111's web UI
writes and reads it: a PNG `parameters` tEXt chunk; for JPEG and WebP, EXIF UserComment in the
UNICODE character code (an 8-byte `UNICODE\\0` prefix, then UTF-16 big-endian).

Files are never half-written and never silently replaced: each image is written to a hidden
temporary file beside its name, then hard-linked to the name, which fails if the name exists
(so two writers cannot take one name); the image then takes the next name (`image-1.png`,
`image-2.png`, …). With `overwrite=True` the image replaces the file of its name instead.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fewstep.samplers.a1111 import A1111_SAMPLERS

# suffix → Pillow format
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
DEFAULT_IMAGE_NAME = "image.png"
EXIF_IFD = 0x8769  # the Exif sub-IFD, which holds UserComment
EXIF_USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\0"
# The pipeline's `settings["sampler"]` (a `scheduler=` value) → A1111's name for it.
SAMPLER_LABELS = {scheduler: label for label, scheduler in A1111_SAMPLERS.items()}


def a1111_parameters(
    prompt: str,
    negative_prompt: str,
    settings: dict[str, Any],
    model_name: str,
    model_hash: str | None = None,
) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = [
        f"Steps: {settings['num_inference_steps']}",
        f"Sampler: {SAMPLER_LABELS.get(settings['sampler'], settings['sampler'])}",
        f"CFG scale: {settings['guidance_scale']:g}",
        f"Seed: {settings['seed']}",
        f"Size: {settings['width']}x{settings['height']}",
    ]
    if model_hash:
        fields.append(f"Model hash: {model_hash[:10]}")
    fields.append(f"Model: {model_name}")
    if settings.get("strength") is not None:  # img2img, after the model as A1111 puts it
        fields.append(f"Denoising strength: {float(settings['strength'])}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def output_path(output: str | os.PathLike) -> Path:
    """Check where images named `output` go, before anything is generated: an existing folder
    takes `image.png` inside it; otherwise the folder must exist and the suffix be an image
    format's. ValueError naming the output otherwise."""
    path = Path(output)
    if path.is_dir():
        path = path / DEFAULT_IMAGE_NAME
    if path.suffix.lower() not in IMAGE_FORMATS:
        raise ValueError(
            f"output must end in one of {', '.join(IMAGE_FORMATS)}, got {str(output)!r}"
        )
    if not path.parent.is_dir():
        raise ValueError(f"output folder {str(path.parent)!r} does not exist (for {str(output)!r})")
    return path


def numbered_names(path: Path) -> Iterator[Path]:
    """path, then path-1, path-2, … (`image.png`, `image-1.png`, …)."""
    yield path
    for i in itertools.count(1):
        yield path.with_name(f"{path.stem}-{i}{path.suffix}")


def encode_image(image: Any, fmt: str, parameters: str, file: Any) -> None:
    """Write a PIL image in `fmt` (a value of IMAGE_FORMATS) to `file` with `parameters`."""
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        meta = PngInfo()
        meta.add_text("parameters", parameters)
        image.save(file, format="PNG", pnginfo=meta)
        return
    image.save(file, format=fmt, exif=user_comment_exif(parameters), quality=95)


def user_comment_exif(text: str) -> bytes:
    """A minimal EXIF block (`Exif\\0\\0`, then a little-endian TIFF whose offsets count from
    its own start) holding only UserComment = `text`.

    Written by hand because Pillow stores a bytes value it has no type for as BYTE, where
    UserComment must be UNDEFINED (type 7) for readers such as piexif to decode it.
    """
    comment = _UNICODE_PREFIX + text.encode("utf-16-be")
    exif_ifd = 8 + 2 + 12 + 4  # after the header and IFD0 (one entry, next-IFD offset)
    data = exif_ifd + 2 + 12 + 4
    return b"".join(
        [
            b"Exif\0\0II*\0" + struct.pack("<I", 8),  # APP1 name; TIFF header, IFD0 at 8
            struct.pack("<HHHII", 1, EXIF_IFD, 4, 1, exif_ifd) + struct.pack("<I", 0),
            struct.pack("<HHHII", 1, EXIF_USER_COMMENT, 7, len(comment), data),
            struct.pack("<I", 0),
            comment,
        ]
    )


def save_images(
    images: Sequence[Any], path: str | os.PathLike, parameters: str, overwrite: bool = False
) -> list[Path]:
    """Write PIL `images` under the names `numbered_names(path)` gives, in its suffix's format
    with `parameters` in the metadata; returns the paths written.

    Without `overwrite` each image takes the next name that no file has; with it, the first
    len(images) names, replacing what is there.
    """
    path = Path(path)
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"output must end in one of {', '.join(IMAGE_FORMATS)}, got {str(path)!r}")
    names = numbered_names(path)
    written: list[Path] = []
    for image in images:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                encode_image(image, fmt, parameters, f)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would follow the name
            for name in names:
                if overwrite:
                    os.replace(tmp, name)
                    break
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, name)  # fails when the name is taken: the next one is tried
                    break
            written.append(name)
        finally:
            tmp.unlink(missing_ok=True)
    return written


def read_parameters(path: str | os.PathLike) -> str | None:
    """The A1111 parameters text of an image fewstep (or A1111) wrote, or None."""
    from PIL import Image

    with Image.open(path) as image:
        if image.format == "PNG":
            return image.info.get("parameters")
        comment = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(_UNICODE_PREFIX):
        return comment[len(_UNICODE_PREFIX) :].decode("utf-16-be")
    return None
