"""fewstep.export.shared_weights: a diffusers folder that is also its model package, each
weight stored once. References: the package exported apart (the same images on onnxruntime
and OpenVINO) and diffusers (loads the folder, the same weights as its source)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
onnx = pytest.importorskip("onnx")

from fewstep.export.shared_weights import combine_with_diffusers_folder  # noqa: E402
from fewstep.package import PackageError, verify_package, weight_bytes  # noqa: E402
from fewstep.pipeline import Pipeline  # noqa: E402


@pytest.fixture(scope="module")
def combined(tiny_model, tiny_package, tmp_path_factory):
    out = tmp_path_factory.mktemp("combined") / "model"
    combine_with_diffusers_folder(tiny_package("sd1"), tiny_model("sd1"), out)
    return out


def _image(folder, **options):
    pipe = Pipeline.from_pretrained(folder, **options)
    return pipe("a red cat", seed=3, num_inference_steps=3, output_type="np").images[0]


def test_stores_the_weights_once(tiny_model, tiny_package, combined):
    manifest = verify_package(combined)
    assert manifest is not None
    for graph in ("unet", "text_encoder"):
        model = onnx.load(str(combined / graph / "model.onnx"), load_external_data=False)
        inline = [
            t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
        ]
        assert all(int(np.prod(t.dims)) <= 16 for t in inline), [(t.name, t.dims) for t in inline]
        assert manifest["shared_weights"][graph]["transposed"] > 0  # the MatMul weights too
    apart = weight_bytes(tiny_model("sd1")) + weight_bytes(tiny_package("sd1"))
    saved = sum(r["bytes_before"] - r["bytes_after"] for r in manifest["shared_weights"].values())
    assert saved > 0 and weight_bytes(combined) == apart - saved


# The same weights and graph; a runtime may multiply by Wᵀ made by the Transpose node in
# another summation order than by the stored Wᵀ: float32 rounding, ~2e-6 on [0, 1] images.
ROUNDING = 1e-5


def test_runs_as_the_package_apart(tiny_package, combined):
    got, expected = _image(combined), _image(tiny_package("sd1"))
    assert expected.std() > 0.01
    np.testing.assert_allclose(got, expected, rtol=0, atol=ROUNDING)


def test_openvino_runs_it_as_the_package_apart(tiny_package, combined):
    pytest.importorskip("openvino")
    got = _image(combined, backend="openvino")
    expected = _image(tiny_package("sd1"), backend="openvino")
    np.testing.assert_allclose(got, expected, rtol=0, atol=ROUNDING)


def test_diffusers_loads_it_as_its_source(tiny_model, combined):
    ours = diffusers.DiffusionPipeline.from_pretrained(combined, local_files_only=True)
    source = diffusers.DiffusionPipeline.from_pretrained(tiny_model("sd1"), local_files_only=True)
    for name in ("unet", "text_encoder", "vae"):
        a, b = getattr(ours, name).state_dict(), getattr(source, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    image = Pipeline.from_pretrained(combined, backend="torch")("a red cat", seed=0).images[0]
    assert image.size == (64, 64)


def test_mismatched_precisions_are_refused_and_nothing_is_left(tiny_model, tmp_path):
    from fewstep.export import export_package

    fp16 = export_package(tiny_model("sd1"), tmp_path / "fp16", dtype="fp16", progress=False)
    with pytest.raises(PackageError, match="package's dtype"):
        combine_with_diffusers_folder(fp16, tiny_model("sd1"), tmp_path / "out" / "model")
    assert list((tmp_path / "out").iterdir()) == []
    (tmp_path / "out" / "model").mkdir()
    with pytest.raises(FileExistsError):
        combine_with_diffusers_folder(fp16, tiny_model("sd1"), tmp_path / "out" / "model")
