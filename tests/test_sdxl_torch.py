"""SDXL on the torch backend: the diffusers folder's own modules behind the ONNX contract.

References: the onnxruntime backend on the package exported from the same tiny SDXL folder
(graph by graph: input order, output names and order, values) and diffusers'
StableDiffusionXLPipeline in torch fp32 (sdxl_parity.py's cases and runner: the same latents
and noise on both sides), within conftest's image tolerance; with fewstep.kernels swapped in
(Triton's interpreter, conftest) too. fp16 runs on the CPU as well, which is enough to check
which modules it keeps in fp32; CUDA graphs need a GPU (the `gpu` test at the end).
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import IMAGE_TOLERANCE  # noqa: E402
from sdxl_parity import CASES_BY_ID, run_case  # noqa: E402

from fewstep.backends.base import BackendError  # noqa: E402
from fewstep.backends.torch_backend import TorchBackend  # noqa: E402
from fewstep.package import PackageError  # noqa: E402
from fewstep.pipeline import Pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRAPHS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


@pytest.fixture(scope="module")
def torch_pipelines(tiny_model):
    """family -> the tiny folder's Pipeline on the torch backend (CPU, fp32), built once."""
    cache: dict[str, Pipeline] = {}

    def get(family: str) -> Pipeline:
        if family not in cache:
            cache[family] = Pipeline.from_pretrained(tiny_model(family), backend="torch")
        return cache[family]

    return get


def graph_inputs(rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    """Seeded inputs of every SDXL graph: batch 2 (CFG's), a non-square 8×12 latent."""
    unet = {
        "sample": rng.standard_normal((2, 4, 8, 12), dtype=np.float32),
        "timestep": np.array(601.5, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 96), dtype=np.float32),
        "text_embeds": rng.standard_normal((2, 40), dtype=np.float32),
        "time_ids": np.array([[128, 96, 8, 16, 64, 96], [64, 64, 0, 0, 64, 96]], np.float32),
    }
    return {
        "text_encoder": {"input_ids": rng.integers(0, 300, (2, 77), dtype=np.int64)},
        "text_encoder_2": {"input_ids": rng.integers(0, 300, (2, 77), dtype=np.int64)},
        "unet": unet,
        "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 8, 12), dtype=np.float32)},
        "vae_encoder": {"sample": rng.uniform(-1, 1, (1, 3, 64, 96)).astype(np.float32)},
    }


def test_graphs_match_the_onnx_package_names_order_and_values(torch_pipelines, tiny_package):
    """Each graph as exported: the U-Net's inputs in the ONNX order, every output (the
    encoders' hidden_states.0 … .L included) under its name, in the graph's order."""
    ours = torch_pipelines("sdxl").backend
    ort = Pipeline.from_pretrained(tiny_package("sdxl")).backend
    assert all(ours.has_graph(graph) for graph in GRAPHS)
    for graph, feed in graph_inputs(np.random.default_rng(0)).items():
        assert ours.input_names(graph) == ort.input_names(graph), graph
        expected = ort.run(graph, **feed)
        got = ours.run(graph, **feed)
        assert list(got) == list(expected), graph
        for name, value in got.items():
            assert isinstance(value, torch.Tensor) and value.dtype == torch.float32
            err = float(np.abs(value.numpy() - expected[name]).max())
            assert err <= 1e-5 * max(1.0, float(np.abs(expected[name]).max())), (graph, name, err)


@pytest.mark.parametrize(
    "case_id",
    [
        "ddim-cfg-prompt2-negatives-wide",  # guided, prompt_2 and both negatives, non-square
        "euler-default-cfg-sizes-rescale",  # every size conditioning, negative ones; rescale
        "turbo-eulera-1step",  # SDXL-Turbo: Euler-ancestral, trailing, no guidance
    ],
)
def test_matches_diffusers(torch_pipelines, sdxl_references, case_id):
    case = CASES_BY_ID[case_id]
    got, expected = run_case(
        case, torch_pipelines(case.family), sdxl_references(case.family, case.sampler)
    )
    err = float(np.abs(got - expected).max())
    print(f"{case.id}: torch backend vs diffusers max abs error {err:.2e}")
    assert err <= IMAGE_TOLERANCE


@pytest.mark.parametrize("case_id", ["turbo-eulera-1step", "ddim-cfg-prompt2-negatives-wide"])
def test_kernels_in_interpreter_match_diffusers(tiny_model, sdxl_references, kernel_calls, case_id):
    """fewstep.kernels in the SDXL U-Net (deeper transformer blocks, the added embedding)
    and VAE: every kernel runs, none falls back, and the image stays diffusers'."""
    case = dataclasses.replace(CASES_BY_ID[case_id], steps=1)  # the interpreter is slow
    patched = Pipeline.from_pretrained(tiny_model(case.family), backend="torch", kernels=True)
    assert patched.backend.patch_report["unet"].total > 0
    assert patched.backend.patch_report["vae"].total > 0
    got, expected = run_case(case, patched, sdxl_references(case.family, case.sampler))
    assert all(calls > 0 for calls in kernel_calls.values()), kernel_calls
    err = float(np.abs(got - expected).max())
    print(f"{case.id}, kernels: torch backend vs diffusers max abs error {err:.2e}")
    assert err <= IMAGE_TOLERANCE


def test_fp16_keeps_the_sdxl_vae_in_fp32(tiny_model, torch_pipelines):
    """diffusers' SDXL rule (force_upcast): text encoders and U-Net in fp16, the VAE's decoder
    and encoder in fp32, so they compute exactly what the fp32 backend's do; SD 1.x keeps
    its VAE in fp16, as diffusers' SD pipelines run it."""
    fp16 = TorchBackend(tiny_model("sdxl"), dtype="fp16")
    fp32 = torch_pipelines("sdxl").backend
    dtypes = {n: getattr(fp16, n).dtype for n in ("text_encoder", "text_encoder_2", "unet", "vae")}
    assert dtypes == {
        "text_encoder": torch.float16,
        "text_encoder_2": torch.float16,
        "unet": torch.float16,
        "vae": torch.float32,
    }
    feeds = graph_inputs(np.random.default_rng(1))
    for graph in ("vae_decoder", "vae_encoder"):
        (got,) = fp16.run(graph, **feeds[graph]).values()
        (expected,) = fp32.run(graph, **feeds[graph]).values()
        assert torch.equal(got, expected), graph
    (unet16,) = fp16.run("unet", **feeds["unet"]).values()
    (unet32,) = fp32.run("unet", **feeds["unet"]).values()
    assert 0 < float((unet16 - unet32).abs().max()) < 1e-2  # fp16 rounding, nothing more
    assert TorchBackend(tiny_model("sd1"), dtype="fp16").vae.dtype == torch.float16


def test_sdxl_graph_and_inputs_are_checked_by_name(torch_pipelines):
    sdxl = torch_pipelines("sdxl").backend
    feed = graph_inputs(np.random.default_rng(2))["unet"]
    without = {k: v for k, v in feed.items() if k != "time_ids"}
    with pytest.raises(BackendError, match=r"missing \['time_ids'\]"):
        sdxl.run("unet", **without)
    sd1 = torch_pipelines("sd1").backend
    assert not sd1.has_graph("text_encoder_2")
    with pytest.raises(ValueError, match=r"graph must be one of .* got 'text_encoder_2'"):
        sd1.run("text_encoder_2", input_ids=np.zeros((1, 77), np.int64))
    with pytest.raises(BackendError, match=r"unknown \['text_embeds', 'time_ids'\]"):
        sd1.run("unet", **feed)


def test_sdxl_folder_without_text_encoder_2_is_refused_by_name(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model("sdxl"), folder, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(PackageError, match=r"text_encoder_2/config\.json"):
        TorchBackend(folder)


@pytest.mark.gpu  # conftest runs it where torch sees a CUDA GPU
@pytest.mark.parametrize("family", ["sdxl", "sdxl_turbo"])
def test_cuda_graphs_and_kernels_match_eager_fp16(tiny_model, family):
    """The CUDA defaults on SDXL: both text encoders, the U-Net step (text_embeds, time_ids
    among its static inputs) and the VAE decoder captured, the VAE kept in fp32."""
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, seed=9, output_type="np")
    eager = Pipeline.from_pretrained(
        tiny_model(family), backend="torch", device="cuda", kernels=False, cuda_graphs=False
    )
    expected = eager("a red cat", **kwargs).images
    for kernels in (None, True):  # the defaults, then every kernel
        fast = Pipeline.from_pretrained(
            tiny_model(family), backend="torch", device="cuda", kernels=kernels
        )
        assert fast.backend.vae.dtype == torch.float32 and fast.backend.unet.dtype == torch.float16
        got = fast("a red cat", **kwargs).images
        again = fast("a red cat", **kwargs).images  # replays the captured graphs
        captured = {label.split()[0] for label in fast.backend.capture_ms}
        assert captured == {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
        assert np.array_equal(got, again)
        assert np.abs(got - expected).max() <= 2e-2  # fp16: one image step is 1/255
