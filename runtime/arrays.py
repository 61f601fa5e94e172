"""The few array operations the pipeline applies to backend arrays, per kind of array.

A backend hands back arrays of its own kind: numpy for onnxruntime and openvino, torch
tensors on the model's device for the torch backend. The pipeline keeps latents in that
kind from the first U-Net call to the finished images (no host round trip per step), and
reaches the arrays only through `*`, `+`, `-`, `/`, slicing (which numpy and torch share)
and the methods below. Noise is always drawn on the host from numpy's generator and moved in with
`asarray`, so a seed gives the same image on every backend.

A backend declares its operations as `array_ops` (numpy's: `NUMPY_OPS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class ArrayOps(Protocol):
    def asarray(self, array: np.ndarray) -> Any:
        """A host float32/int64 array as this backend's array (on its device)."""
        ...

    def float32(self, x: Any) -> Any:
        """x in float32 (no copy when it already is)."""
        ...

    def concat(self, xs: Sequence[Any]) -> Any:
        """Concatenated along axis 0."""
        ...

    def repeat(self, x: Any, repeats: int) -> Any:
        """Each row repeated `repeats` times in place: [a, b] → [a, a, b, b] (np.repeat)."""
        ...

    def std(self, x: Any, axes: tuple[int, ...]) -> Any:
        """Sample standard deviation (ddof 1) over `axes`, keeping them as size 1."""
        ...

    def synchronize(self) -> None:
        """Wait until queued device work is done (before reading a clock)."""
        ...

    def all_finite(self, x: Any) -> bool:
        """No NaN or infinity in x."""
        ...

    def to_host(self, x: Any) -> np.ndarray:
        """x as a float32 numpy array on the host (img2img samples the VAE encoder's
        latent distribution there, with the host's noise)."""
        ...

    def to_images(self, decoded: Any, as_uint8: bool) -> np.ndarray:
        """VAE output [B, 3, H, W] in -1..1 → host images [B, H, W, 3]: float32
        clip(x / 2 + 0.5, 0, 1), or with `as_uint8` that × 255 rounded half to even (what
        diffusers' numpy_to_pil does). Done where the array lives, so the host receives
        the finished images (a quarter of the bytes as uint8)."""
        ...


class NumpyOps:
    """Host arrays: what onnxruntime and openvino take and return."""

    def asarray(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def float32(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32, copy=False)

    def concat(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs)

    def repeat(self, x: np.ndarray, repeats: int) -> np.ndarray:
        return np.repeat(x, repeats, axis=0)

    def std(self, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        return x.std(axis=axes, keepdims=True, ddof=1)

    def synchronize(self) -> None:
        return None

    def all_finite(self, x: np.ndarray) -> bool:
        return bool(np.isfinite(x).all())

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def to_images(self, decoded: np.ndarray, as_uint8: bool) -> np.ndarray:
        # In place on one buffer, and [B, H, W, 3] as a view (as diffusers' images): several
        # times faster than chained expressions (docs/reference.md#host-image-finishing).
        images = np.divide(decoded, 2, dtype=np.float32)
        images += 0.5
        np.clip(images, 0.0, 1.0, out=images)
        if as_uint8:
            images *= 255
            images = np.round(images, out=images).astype(np.uint8)
        return images.transpose(0, 2, 3, 1)


NUMPY_OPS = NumpyOps()
