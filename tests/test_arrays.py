"""The pipeline's image post-processing, per kind of array, against diffusers' own
(VaeImageProcessor.postprocess: denormalize, then numpy_to_pil's × 255, round, uint8)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
image_processor = pytest.importorskip("diffusers.image_processor")

from fewstep.arrays import NUMPY_OPS  # noqa: E402
from fewstep.backends.torch_backend import TorchArrayOps  # noqa: E402

OPS = {"numpy": NUMPY_OPS, "torch": TorchArrayOps(torch.device("cpu"))}


def vae_outputs() -> np.ndarray:
    """[2, 3, 5, 7] VAE outputs: past both ends of -1..1, exact ends, and values whose
    × 255 lands on a half (rounding ties)."""
    rng = np.random.default_rng(0)
    decoded = (rng.standard_normal((2, 3, 5, 7)) * 0.8).astype(np.float32)
    ties = np.array([(k + 0.5) / 255 * 2 - 1 for k in (0, 1, 2, 127, 254)], dtype=np.float32)
    decoded.reshape(-1)[: ties.size + 4] = np.concatenate([ties, [-1.0, 1.0, -3.0, 3.0]])
    return decoded


@pytest.mark.parametrize("kind", list(OPS))
def test_images_match_diffusers_postprocess(kind):
    decoded = vae_outputs()
    processor = image_processor.VaeImageProcessor()
    expected = processor.postprocess(torch.from_numpy(decoded), output_type="np")
    expected_pil = processor.numpy_to_pil(expected)
    ops = OPS[kind]
    array = ops.asarray(decoded)

    images = ops.to_images(array, as_uint8=False)
    assert images.dtype == np.float32 and images.shape == (2, 5, 7, 3)
    np.testing.assert_array_equal(images, expected)
    pixels = ops.to_images(array, as_uint8=True)
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, np.stack([np.asarray(p) for p in expected_pil]))


@pytest.mark.parametrize("kind", list(OPS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_catches_nan_and_infinity(kind, bad):
    ops = OPS[kind]
    decoded = vae_outputs()
    assert ops.all_finite(ops.asarray(decoded))
    decoded[1, 2, 4, 6] = bad
    assert not ops.all_finite(ops.asarray(decoded))
