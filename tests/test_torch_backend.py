"""The torch backend on the CPU: one pipeline, two backends.

References: the onnxruntime backend on the package exported from the same diffusers folder
(same seed, same image, graph by graph and end to end), diffusers' own pipelines (conftest's
parity cases and helpers, as for onnxruntime in test_pipeline_parity.py), and, for
fewstep.kernels swapped in (Triton's interpreter, conftest), the torch backend in fp64: the
kernels' image error must stay within 2 × the fp32 torch backend's own error against it, plus
one fp32 rounding.
CUDA graphs and fp16 need a GPU: the `gpu` tests at the end (and benchmarks/gpu_suite.py).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from fewstep.backends.base import BackendError, create_backend  # noqa: E402
from fewstep.backends.torch_backend import (  # noqa: E402
    DTYPE_NAMES,
    KERNEL_NAMES,
    TorchBackend,
    parse_device,
    parse_dtype,
)
from fewstep.export.testing import make_tiny_model  # noqa: E402
from fewstep.package import PackageError  # noqa: E402
from fewstep.pipeline import Pipeline  # noqa: E402

FAMILIES = ("sd1", "sd2", "lcm", "turbo")

pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture(scope="module")
def pipelines(tiny_model, tiny_package):
    """(family, backend) -> Pipeline, built once per module."""
    cache: dict[tuple[str, str], Pipeline] = {}

    def get(family: str, backend: str) -> Pipeline:
        if (family, backend) not in cache:
            if backend == "torch":
                cache[family, backend] = Pipeline.from_pretrained(
                    tiny_model(family), backend="torch", device="cpu"
                )
            else:
                cache[family, backend] = Pipeline.from_pretrained(tiny_package(family))
        return cache[family, backend]

    return get


# -- against onnxruntime: same seed, same image ------------------------------------------------

# (family, call arguments): each family's defaults, plus the CFG, rescale and noise paths
ORT_CASES = [
    pytest.param("sd1", dict(num_inference_steps=4), id="sd1-plms-cfg"),
    pytest.param(
        "sd1",
        dict(
            num_inference_steps=3,
            guidance_scale=5.0,
            guidance_rescale=0.7,
            num_images_per_prompt=2,
            scheduler="euler_ancestral",
        ),
        id="sd1-eulera-rescale-n2",
    ),
    pytest.param("sd2", dict(num_inference_steps=3, height=64, width=96), id="sd2-vpred-cfg-wide"),
    pytest.param("lcm", dict(num_inference_steps=4), id="lcm-4steps"),
    pytest.param("turbo", dict(), id="turbo-1step"),
    pytest.param("turbo", dict(num_inference_steps=2, guidance_scale=2.0), id="turbo-2steps-cfg"),
]


@pytest.mark.parametrize(("family", "kwargs"), ORT_CASES)
def test_same_seed_same_image_as_onnxruntime(pipelines, parity, family, kwargs):
    prompt = ["a red cat", "a blue circle"]
    ort = pipelines(family, "onnxruntime")(prompt, seed=1234, output_type="np", **kwargs)
    ours = pipelines(family, "torch")(prompt, seed=1234, output_type="np", **kwargs)
    err = parity.max_error(ours.images, ort.images)
    print(f"{family} {kwargs}: torch vs onnxruntime max abs error {err:.2e}")
    assert err <= parity.tolerance
    assert ours.seed == ort.seed == 1234
    other = pipelines(family, "torch")(prompt, seed=1235, output_type="np", **kwargs)
    assert np.abs(other.images - ours.images).max() > 0.05  # the seed matters


@pytest.mark.parametrize("family", ["sd2", "lcm"])
def test_graphs_match_onnxruntime_names_and_values(pipelines, family):
    ort, ours = pipelines(family, "onnxruntime").backend, pipelines(family, "torch").backend
    rng = np.random.default_rng(0)
    info = pipelines(family, "torch").info
    cross = 32  # the tiny models' cross_attention_dim
    inputs = {
        "text_encoder": {"input_ids": rng.integers(0, 300, (2, 77), dtype=np.int64)},
        "unet": {
            "sample": rng.standard_normal((2, 4, 8, 16), dtype=np.float32),
            "timestep": np.array(601.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, cross), dtype=np.float32),
        },
        "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32)},
        "vae_encoder": {"sample": rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)},
    }
    if info.guidance_embedding_dim:
        dim = info.guidance_embedding_dim
        inputs["unet"]["timestep_cond"] = rng.standard_normal((2, dim), dtype=np.float32)
    for graph, feed in inputs.items():
        assert ours.input_names(graph) == ort.input_names(graph)
        expected = ort.run(graph, **feed)
        got = ours.run(graph, **feed)
        assert set(got) == set(expected), graph
        for name, value in got.items():
            assert isinstance(value, torch.Tensor) and value.dtype == torch.float32
            err = np.abs(value.numpy() - expected[name]).max()
            scale = np.abs(expected[name]).max()
            assert err <= 1e-5 * max(1.0, scale), f"{graph}.{name}: {err:.2e}"


def test_run_refuses_unknown_and_missing_inputs(pipelines):
    backend = pipelines("sd1", "torch").backend
    with pytest.raises(BackendError, match="unknown \\['timestep_cond'\\]"):
        backend.run(
            "unet",
            sample=np.zeros((1, 4, 8, 8), np.float32),
            timestep=np.array(1.0, np.float32),
            encoder_hidden_states=np.zeros((1, 77, 32), np.float32),
            timestep_cond=np.zeros((1, 32), np.float32),
        )
    with pytest.raises(BackendError, match="missing \\['encoder_hidden_states'\\]"):
        backend.run("unet", sample=np.zeros((1, 4, 8, 8), np.float32), timestep=1.0)
    with pytest.raises(BackendError, match="vae_decoder failed on inputs latent_sample"):
        backend.run("vae_decoder", latent_sample=np.zeros((1, 3, 8, 8), np.float32))


# -- against diffusers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parity_case",
    [
        "sd1-ddim-cfg-b1-square",
        "sd1-ddim-eta-cfg-n2-tall",
        "sd1-eulera-cfg-b2",
        "sd2-vpred-ddim-cfg-b1",
        "turbo-eulera-1step",
        "turbo-euler-n2",
        "lcm-w8.5-b1",
        "lcm-w1-b2-wide",
    ],
    indirect=True,
)
def test_matches_diffusers(pipelines, parity, parity_case):
    got, expected = parity.run_case(pipelines(parity_case.family, "torch"), parity_case)
    err = parity.max_error(got, expected)
    print(f"{parity_case.id}: torch backend vs diffusers max abs error {err:.2e}")
    assert err <= parity.tolerance


# -- fewstep.kernels in Triton's interpreter -----------------------------------------------------


def test_kernels_in_interpreter_match_within_kernel_error(
    tiny_model, pipelines, parity, kernel_calls
):
    folder = tiny_model("sd1")
    kwargs = dict(num_inference_steps=1, guidance_scale=7.5, seed=5, output_type="np")
    ref64 = Pipeline.from_pretrained(folder, backend="torch", dtype="fp64")
    fp32 = pipelines("sd1", "torch")
    patched = Pipeline.from_pretrained(folder, backend="torch", kernels=True)
    assert patched.backend.kernels and patched.backend.patch_report["unet"].total > 0

    expected = ref64("a red cat", **kwargs).images
    torch_fp32 = fp32("a red cat", **kwargs).images
    assert kernel_calls == {"group_norm": 0, "attention": 0, "geglu": 0, "layer_norm": 0}
    got = patched("a red cat", **kwargs).images
    assert all(calls > 0 for calls in kernel_calls.values())  # every kernel ran, no fallbacks

    err_torch = parity.max_error(torch_fp32, expected)
    err_kernel = parity.max_error(got, expected)
    tol = 2 * err_torch + np.finfo(np.float32).eps  # images are in 0..1
    print(f"kernels: image err {err_kernel:.2e}, fp32 torch err {err_torch:.2e}, tol {tol:.2e}")
    assert err_kernel <= tol


def test_auto_kernels_patch_every_kernel_tuned(tiny_model):
    """kernels="auto" (the CUDA default): every kernel swapped in, each op tuned per shape
    (fewstep.kernels.tuning; untimed in the interpreter, so it runs each op's first
    candidate); the CPU's default stays torch's ops alone."""
    from fewstep.kernels.patch import FusedGroupNorm

    tuned = TorchBackend(tiny_model("sd1"), kernels="auto")
    assert tuned.tune_kernels and tuned.kernels == KERNEL_NAMES
    norms = [m for m in tuned.unet.modules() if isinstance(m, FusedGroupNorm)]
    assert norms and all(m.tune for m in norms)
    plain = TorchBackend(tiny_model("sd1"))
    assert not plain.tune_kernels and plain.kernels == () and plain.patch_report == {}


def test_kernels_without_interpreter_fall_back_with_a_log(tiny_model, monkeypatch, caplog):
    import fewstep.kernels._interpreter as interpreter

    monkeypatch.setattr(interpreter, "INTERPRETED", False)
    with caplog.at_level("WARNING", logger="fewstep.backends.torch_backend"):
        backend = TorchBackend(tiny_model("sd1"), kernels=True)
    assert not backend.kernels and backend.patch_report == {}
    assert "TRITON_INTERPRET=1" in caplog.text


# -- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(dtype="fp8"), "dtype must be one of"),
        (dict(dtype=torch.int32), "dtype must be one of"),
        (dict(dtype=16), "dtype must be one of"),
        (dict(device="tpu"), "device must be one of"),
        (dict(device="gpu:0"), "device must be one of"),
        (dict(device="cuda:99"), "device="),
        (dict(kernels="yes"), "kernels must be True, False, .auto. or some of"),
        (dict(kernels=("group_norm", "flash")), "kernels must be True, False, .auto. or some of"),
        (dict(compile="yes"), "compile must be True or False"),
        (dict(cuda_graphs=1), "cuda_graphs must be True or False"),
        (dict(precision="fp16"), "takes no option \\['precision'\\]"),
    ],
    ids=lambda v: None if isinstance(v, dict) else v,
)
def test_bad_arguments_raise_value_error_naming_them(tiny_model, options, match):
    with pytest.raises(ValueError, match=match):
        Pipeline.from_pretrained(tiny_model("sd1"), backend="torch", **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_a_value_error(tiny_model):
    with pytest.raises(ValueError, match="device='cuda' but torch sees no CUDA GPU"):
        create_backend("torch", tiny_model("sd1"), device="cuda")


def test_cudnn_benchmark_is_on_only_inside_and_restored(monkeypatch):
    """CUDA calls autotune convolutions (static shapes); the caller's setting comes back, even
    after an error, and CPU calls leave it alone."""
    from fewstep.backends.torch_backend import cudnn_benchmark

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with cudnn_benchmark(True):
        assert torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.benchmark
    with pytest.raises(RuntimeError), cudnn_benchmark(True):
        raise RuntimeError("a failing call")
    assert not torch.backends.cudnn.benchmark
    with cudnn_benchmark(False):
        assert not torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # a caller's own choice is kept
    with cudnn_benchmark(False):
        assert torch.backends.cudnn.benchmark


@pytest.mark.parametrize(
    ("canonical", "expected"),
    [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)],
)
def test_dtype_spellings_and_defaults(canonical, expected):
    cpu = parse_device("cpu")
    for spelling in DTYPE_NAMES[canonical]:
        assert parse_dtype(spelling.upper(), cpu) is expected
    assert parse_dtype(expected, cpu) is expected
    assert parse_dtype(None, cpu) is torch.float32  # fp16 is the default on CUDA only
    assert parse_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_folders_are_checked_for_their_backend(tiny_model, tiny_package):
    with pytest.raises(PackageError, match="is an ONNX model package"):
        Pipeline.from_pretrained(tiny_package("sd1"), backend="torch")
    with pytest.raises(PackageError, match="model.onnx"):
        Pipeline.from_pretrained(tiny_model("sd1"))  # onnxruntime needs an exported package


def test_timings_and_outputs_are_host_side(pipelines):
    out = pipelines("turbo", "torch")("a red circle", seed=3, output_type="np", timings=True)
    assert isinstance(out.images, np.ndarray) and out.images.dtype == np.float32
    assert len(out.timings_ms["unet_call"]) == 1 and out.timings_ms["total"] > 0
    assert len(out.timings_ms["sampler_step"]) == 1
    pil = pipelines("turbo", "torch")("a red circle", seed=3).images  # made on the device
    np.testing.assert_array_equal(np.asarray(pil[0]), (out.images[0] * 255).round())


# -- GPU: CUDA graphs, fp16, kernels (run by benchmarks/gpu_suite.py's checks too) --------------


@pytest.mark.gpu  # conftest runs it where torch sees a CUDA GPU
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graphs_and_kernels_match_eager_fp16(tiny_model, family):
    kwargs = dict(num_inference_steps=2, seed=9, output_type="np")
    eager = Pipeline.from_pretrained(
        tiny_model(family), backend="torch", device="cuda", kernels=False, cuda_graphs=False
    )
    expected = eager("a red cat", **kwargs).images
    for kernels in (None, True):  # the defaults, then every kernel
        fast = Pipeline.from_pretrained(
            tiny_model(family), backend="torch", device="cuda", kernels=kernels
        )
        got = fast("a red cat", **kwargs).images
        again = fast("a red cat", **kwargs).images  # replays the captured graphs
        assert fast.backend.capture_ms and np.array_equal(got, again)
        assert fast.backend.tune_kernels == (kernels is None)
        assert np.abs(got - expected).max() <= 2e-2  # fp16: one image step is 1/255


def test_compile_matches_eager_on_cpu(tmp_path):
    """compile=True (Inductor on the CPU here) computes the same U-Net step and decode."""
    folder = make_tiny_model(tmp_path / "tiny", "sd1")
    rng = np.random.default_rng(0)
    inputs = {
        "sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
        "timestep": np.array(500.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }
    latent = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    eager = TorchBackend(folder, device="cpu")
    compiled = TorchBackend(folder, device="cpu", compile=True)
    for graph, graph_inputs in (("unet", inputs), ("vae_decoder", {"latent_sample": latent})):
        want = next(iter(eager.run(graph, **graph_inputs).values()))
        got = next(iter(compiled.run(graph, **graph_inputs).values()))
        # fp32; Inductor reorders sums: a few ulps of the outputs' scale
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)
