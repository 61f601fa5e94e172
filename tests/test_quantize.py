"""`fewstep quantize`: a package whose U-Net is int8 (NNCF on OpenVINO), made and refused.

The int8 graph must really compute in int8 (OpenVINO's compiled model runs int8 layers), stay
close to the fp32 U-Net it came from, and run only where it can: the openvino backend takes it,
onnxruntime and LoRA folding refuse it by name. Bad input fails before calibration starts and
a failure leaves nothing behind.
"""

import json

import numpy as np
import pytest

pytest.importorskip("nncf")
pytest.importorskip("openvino")

from fewstep.export import quantize as quantize_module  # noqa: E402
from fewstep.export.quantize import quantize_package  # noqa: E402
from fewstep.package import PackageError, verify_package  # noqa: E402
from fewstep.pipeline import Pipeline  # noqa: E402

PROMPTS = ["a red circle on a blue background", "two green squares"]
STEPS = 2


@pytest.fixture(scope="module")
def int8_package(tiny_package, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "package"
    return quantize_package(tiny_package("sd1"), out, PROMPTS, STEPS, progress=False)


def test_the_int8_package_replaces_the_unet_and_says_so(tiny_package, int8_package):
    source = tiny_package("sd1")
    manifest = verify_package(int8_package)  # every file hashed and intact
    unet = manifest["graphs"]["unet"]
    assert unet["precision"] == "int8" and unet["format"] == "openvino"
    assert "max_abs_error" not in unet  # the export verified the fp32 graph, not this one
    assert sorted(p.name for p in (int8_package / "unet").iterdir()) == [
        "config.json",
        "openvino_model.bin",
        "openvino_model.xml",
    ]
    calibration = manifest["quantization"]["calibration"]
    assert calibration["prompts"] == PROMPTS and calibration["num_inference_steps"] == STEPS
    # the other graphs are the source's, byte for byte
    source_files = json.loads((source / "fewstep.json").read_text())["files"]
    for rel, digest in manifest["files"].items():
        if not rel.startswith("unet/"):
            assert source_files[rel] == digest, rel


def test_the_int8_unet_runs_int8_layers_close_to_fp32(tiny_package, int8_package):
    import openvino as ov

    core = ov.Core()
    fp32 = core.read_model(str(tiny_package("sd1") / "unet" / "model.onnx"))
    int8 = core.read_model(str(int8_package / "unet" / "openvino_model.xml"))
    assert any(op.get_type_name() == "FakeQuantize" for op in int8.get_ops())
    # a U-Net call of a prompt the calibration did not see, from the middle of its sampling
    unseen = quantize_module.calibration_inputs(tiny_package("sd1"), ["a yellow cross"], 4)
    inputs = unseen[len(unseen) // 2]
    outputs = {}
    for name, model in (("fp32", fp32), ("int8", int8)):
        model.reshape({k: v.shape for k, v in inputs.items()})
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        outputs[name] = compiled(inputs)[0]
        if name == "int8":  # what OpenVINO chose to run: int8 layers are there
            precisions = {
                op.get_rt_info()["runtimePrecision"].astype(str)
                for op in compiled.get_runtime_model().get_ops()
            }
            assert "i8" in precisions or "u8" in precisions, precisions
    # relative L2 error: 0.080 measured on this model; one with wrong scales would be near 1
    error = np.linalg.norm(outputs["int8"] - outputs["fp32"]) / np.linalg.norm(outputs["fp32"])
    assert 0 < error < 0.12


def test_openvino_runs_it_and_onnxruntime_refuses_it_by_name(int8_package):
    pipe = Pipeline.from_pretrained(int8_package, backend="openvino")
    image = pipe("a red circle", num_inference_steps=2, seed=0, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    with pytest.raises(PackageError, match=r"openvino_model\.xml.*backend='openvino'"):
        Pipeline.from_pretrained(int8_package, backend="onnxruntime")


def test_loras_do_not_fold_into_an_int8_unet(int8_package, tmp_path):
    from fewstep.lora import apply_loras_to_package

    lora = tmp_path / "any.safetensors"  # never read: the package is refused first
    lora.write_bytes(b"")
    with pytest.raises(PackageError, match="quantized to int8.*fewstep lora apply"):
        apply_loras_to_package(int8_package, [(lora, 1.0)], tmp_path / "out")


def test_bad_input_fails_before_calibration(tiny_package, int8_package, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(quantize_module, "calibration_inputs", never)
    source = tiny_package("sd1")
    out = tmp_path / "out"
    for prompts in ([], "one string", ["ok", "  "], [3]):
        with pytest.raises(ValueError, match="prompts"):
            quantize_package(source, out, prompts, progress=False)
    for steps in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            quantize_package(source, out, PROMPTS, steps, progress=False)
    with pytest.raises(ValueError, match="out must be outside the package"):
        quantize_package(source, source / "int8", PROMPTS, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ValueError, match="new or empty folder"):
        quantize_package(source, tmp_path / "full", PROMPTS, progress=False)
    with pytest.raises(PackageError, match="already quantized"):
        quantize_package(int8_package, out, PROMPTS, progress=False)
    assert not out.exists() and (tmp_path / "full" / "x").read_text() == "keep"


def test_a_failed_quantization_leaves_nothing(tiny_package, tmp_path, monkeypatch):
    import nncf

    def fails(*args, **kwargs):
        raise RuntimeError("statistics failed")

    monkeypatch.setattr(nncf, "quantize", fails)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="statistics failed"):
        quantize_package(tiny_package("sd1"), out, PROMPTS[:1], 1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_calibration_keeps_every_unet_call_of_every_prompt(tiny_package):
    package = tiny_package("sd1")
    samples = quantize_module.calibration_inputs(package, PROMPTS, STEPS)
    pipe = Pipeline.from_pretrained(package, backend="openvino")
    calls = []
    run = pipe.backend.run

    def counting(graph, **inputs):
        calls.append(graph)
        return run(graph, **inputs)

    pipe.backend.run = counting
    pipe(PROMPTS[0], num_inference_steps=STEPS, seed=0, output_type="np")
    per_image = calls.count("unet")
    assert len(samples) == per_image * len(PROMPTS)
    first = samples[0]
    assert set(first) == {"sample", "timestep", "encoder_hidden_states"}
    assert first["sample"].shape[0] == 2  # the default guidance: CFG's two halves
    # prompt 1 starts from seed 1's latents, not prompt 0's
    assert not np.array_equal(samples[0]["sample"], samples[per_image]["sample"])


def test_info_shows_the_int8_unet_and_its_calibration(int8_package, capsys):
    from fewstep.cli import main

    assert main(["info", str(int8_package)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["graphs"]["unet"]["precision"] == "int8"
    assert printed["quantization"]["calibration"]["prompts"] == PROMPTS


def test_an_int8_weights_file_linked_out_of_the_package_is_refused(int8_package, tmp_path):
    """The IR's weights are read from beside it: a link leading out of the package is refused
    before OpenVINO reads anything (the package comes from strangers like every input)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(int8_package, copy)
    outside = tmp_path / "elsewhere.bin"
    (copy / "unet" / "openvino_model.bin").rename(outside)
    (copy / "unet" / "openvino_model.bin").symlink_to(outside)
    with pytest.raises(PackageError, match=r"openvino_model\.bin.*outside"):
        Pipeline.from_pretrained(copy, backend="openvino")
