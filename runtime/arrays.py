"""The few array operations the pipeline applies to backend arrays, per kind of array.

A backend hands back arrays of its own kind: numpy for onnxruntime and openvino, torch
tensors on the model's device for the torch backend. The pipeline keeps latents in that
kind from the first U-Net call to the VAE (no host round trip per step), and reaches the
arrays only through `*`, `+`, `-`, `/`, slicing (which numpy and torch share) and the
methods below. Noise is always drawn on the host from numpy's generator and moved in with
`asarray`, so a seed gives the same image on every backend.

A backend declares its operations as `array_ops`; one without them works on numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class ArrayOps(Protocol):
    def asarray(self, array: np.ndarray) -> Any:
        """A host float32/int64 array as this backend's array (on its device)."""
        ...

    def to_numpy(self, x: Any) -> np.ndarray:
        """Back to the host (waits for the device)."""
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


class NumpyOps:
    """Host arrays: what onnxruntime and openvino take and return."""

    def asarray(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

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


NUMPY_OPS = NumpyOps()


def array_ops(backend: Any) -> ArrayOps:
    """The backend's array operations; numpy's for a backend that declares none."""
    ops: ArrayOps = getattr(backend, "array_ops", NUMPY_OPS)
    return ops
