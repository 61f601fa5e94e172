"""The OpenVINO backend: pipeline parity with diffusers (fp32), bf16 against fp32, the per-shape
compile cache and its LRU bound, the disk-cache key, and errors.

References: diffusers' pipelines in torch fp32 on the tiny random-weight models (fp32 parity,
as in test_pipeline_parity.py); the same backend in fp32 (bf16 PSNR); properties of the cache.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

ov = pytest.importorskip("openvino")
torch = pytest.importorskip("torch")

from fewstep.backends.base import BackendError, create_backend  # noqa: E402
from fewstep.backends.ov import PRECISIONS, OpenVINOBackend  # noqa: E402
from fewstep.package import read_manifest, write_manifest  # noqa: E402
from fewstep.pipeline import Pipeline  # noqa: E402

HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
needs_bf16 = pytest.mark.skipif(
    not HAS_BF16, reason="this CPU does not report BF16 in OPTIMIZATION_CAPABILITIES"
)


@pytest.fixture(scope="module")
def ov_pipeline(tiny_package):
    """(family, precision) -> Pipeline on the openvino backend, shared so shapes compile once."""
    cache = {}

    def get(family: str, precision: str = "fp32") -> Pipeline:
        if (family, precision) not in cache:
            cache[family, precision] = Pipeline.from_pretrained(
                tiny_package(family), backend="openvino", precision=precision
            )
        return cache[family, precision]

    return get


# -- fp32: the whole pipeline against diffusers -------------------------------------------------

# (family, sampler, guidance_scale, prompts, num_images_per_prompt, height, width, steps)
CASES = [
    pytest.param("sd1", "ddim", 7.5, ["a red cat"], 1, 64, 64, 4, id="sd1-ddim-cfg-b1"),
    pytest.param("sd1", "ddim", 1.0, ["a red cat", "a dog"], 1, 64, 96, 3, id="sd1-nocfg-b2-wide"),
    pytest.param("sd1", "euler_ancestral", 7.5, ["a cat"], 2, 96, 64, 3, id="sd1-eulera-cfg-n2"),
    pytest.param("sd2", "ddim", 7.5, ["a photo of a cat"], 1, 64, 64, 4, id="sd2-vpred-cfg-b1"),
    pytest.param("sd2", "euler", 1.0, ["a dog"], 2, 64, 96, 2, id="sd2-vpred-nocfg-n2-wide"),
    pytest.param("lcm", "lcm", 8.5, ["a red cat"], 1, 64, 64, 4, id="lcm-w8.5-b1"),
    pytest.param("lcm", "lcm", 1.0, ["a cat", "a dog"], 1, 96, 64, 2, id="lcm-w1-b2-tall"),
    pytest.param("turbo", "euler_ancestral", 0.0, ["a red circle"], 1, 64, 64, 1, id="turbo-1step"),
    pytest.param(
        "turbo", "euler_ancestral", 2.0, ["a cat", "a dog"], 1, 64, 96, 4, id="turbo-cfg-b2-wide"
    ),
]


@pytest.mark.parametrize("family,sampler,guidance,prompts,per_prompt,height,width,steps", CASES)
def test_fp32_pipeline_matches_diffusers(
    tiny_model,
    ov_pipeline,
    parity,
    family,
    sampler,
    guidance,
    prompts,
    per_prompt,
    height,
    width,
    steps,
):
    ours = ov_pipeline(family)
    batch = len(prompts) * per_prompt
    shape = (batch, 4, height // ours.info.vae_scale_factor, width // ours.info.vae_scale_factor)
    latents = np.random.default_rng(7).standard_normal(shape, dtype=np.float32)
    negative = None if family == "lcm" else ["ugly"] * len(prompts)
    kwargs = dict(
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        num_images_per_prompt=per_prompt,
        output_type="np",
    )
    reference = parity.load_diffusers(tiny_model(family), family, sampler)
    ref_kwargs = dict(
        kwargs,
        latents=torch.from_numpy(latents.copy()),
        generator=torch.Generator().manual_seed(11),
    )
    if family != "lcm":
        ref_kwargs["negative_prompt"] = negative
    expected = reference(prompts, **ref_kwargs).images
    got = ours(
        prompts,
        negative_prompt=negative,
        latents=latents,
        generator=parity.noise(11),
        scheduler=sampler,
        **kwargs,
    ).images

    assert got.shape == expected.shape == (batch, height, width, 3)
    assert float(expected.std()) > 1e-3, "reference image is flat: the test would prove nothing"
    err = np.abs(got - expected)
    assert err.max() <= parity.tolerance, (
        f"max abs difference {err.max():.2e} at {np.unravel_index(err.argmax(), err.shape)}"
    )


def test_precision_hint_is_set_explicitly(tiny_package):
    # OpenVINO's own default on a CPU with BF16 is bf16: "fp32" must say f32 to mean it.
    backend = OpenVINOBackend(tiny_package("sd1"), precision="fp32", num_threads=1)
    backend.run("vae_decoder", latent_sample=np.ones((1, 4, 8, 8), np.float32))
    (compiled,) = backend.compiled("vae_decoder").values()
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert str(compiled.get_property("PERFORMANCE_HINT")).endswith("LATENCY")


# -- bf16 against fp32 ----------------------------------------------------------------------------

# Measured (OpenVINO 2026.4.1, AMD EPYC with AVX512_BF16, no AMX): PSNR of bf16 against fp32
# images, each family's own scheduler and default guidance, 4 steps, 64x64, 12 seeds x 5
# prompts = 60 images per family:
#     sd1   min 33.1  p10 35.5  median 37.0  max 40.3 dB
#     sd2   min 34.6  p10 35.6  median 37.7  max 41.1 dB
#     lcm   min 39.2  p10 40.1  median 41.4  max 45.0 dB
#     turbo min 40.6  p10 41.6  median 43.1  max 45.0 dB
# An unrelated image (another seed) is ~12 dB away. Each floor is the worst measured minus 3 dB
# (twice the worst measured squared error), rounded down. The random-weight U-Nets amplify
# rounding along the trajectory: with DDIM's clip_sample on (scheduler="ddim" on the sd1 model's
# PNDM config) sd1 bf16 falls to 15-20 dB at 4 steps, so the test keeps each model's own
# scheduler, the one its users get.
BF16_PSNR_FLOOR_DB = {"sd1": 30.0, "sd2": 31.0, "lcm": 36.0, "turbo": 37.0}
BF16_PROMPTS = ["a red cat", "a blue circle on a green square"]


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of images in 0..1."""
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


@needs_bf16
@pytest.mark.parametrize("family", ["sd1", "sd2", "lcm", "turbo"])
def test_bf16_psnr_against_fp32(ov_pipeline, family, record_property):
    fp32, bf16 = ov_pipeline(family, "fp32"), ov_pipeline(family, "bf16")
    values = []
    for seed in (0, 1):
        for prompt in BF16_PROMPTS:
            kwargs = dict(num_inference_steps=4, seed=seed, output_type="np")
            values.append(psnr_db(fp32(prompt, **kwargs).images, bf16(prompt, **kwargs).images))
    record_property("bf16_psnr_db", values)
    print(f"{family}: bf16 vs fp32 PSNR {np.round(values, 1).tolist()} dB")
    assert min(values) >= BF16_PSNR_FLOOR_DB[family], (
        f"{family}: bf16 PSNR {min(values):.1f} dB < floor {BF16_PSNR_FLOOR_DB[family]} dB"
    )
    # And bf16 really ran: identical images would mean the precision hint was ignored.
    assert max(values) < 80.0, f"{family}: bf16 images equal fp32 ({max(values):.1f} dB)"


# -- the static-shape compile cache ---------------------------------------------------------------


def _unet_inputs(rng, batch, h, w, cross_dim=32):
    return dict(
        sample=rng.standard_normal((batch, 4, h, w), dtype=np.float32),
        timestep=np.array(501.0, dtype=np.float32),
        encoder_hidden_states=rng.standard_normal((batch, 77, cross_dim), dtype=np.float32),
    )


def test_compiles_once_per_static_shape(tiny_package):
    backend = OpenVINOBackend(tiny_package("sd1"))
    rng = np.random.default_rng(0)
    inputs = _unet_inputs(rng, 2, 8, 8)
    first = backend.run("unet", **inputs)["out_sample"]
    second = backend.run("unet", **inputs)["out_sample"]
    unet_compiles = [entry for entry in backend.compile_log if entry[0] == "unet"]
    assert len(unet_compiles) == 1
    np.testing.assert_array_equal(first, second)
    assert np.abs(first).max() > 0.1, "a flat output would prove nothing"

    backend.run("unet", **_unet_inputs(rng, 2, 8, 12))  # new size
    backend.run("unet", **_unet_inputs(rng, 1, 8, 8))  # new batch
    backend.run("unet", **inputs)  # back to the first: cached
    assert len([e for e in backend.compile_log if e[0] == "unet"]) == 3
    assert sorted(dict(shapes)["sample"] for shapes in backend.compiled("unet")) == [
        (1, 4, 8, 8),
        (2, 4, 8, 8),
        (2, 4, 8, 12),
    ]


def test_threads_share_one_compile_and_get_their_own_results(tiny_package):
    backend = OpenVINOBackend(tiny_package("sd1"))
    rng = np.random.default_rng(1)
    feeds = [_unet_inputs(rng, 2, 16, 8) for _ in range(6)]
    expected = [OpenVINOBackend(tiny_package("sd1")).run("unet", **f)["out_sample"] for f in feeds]
    got: list = [None] * len(feeds)
    start = threading.Barrier(len(feeds))

    def worker(i):
        start.wait()
        got[i] = backend.run("unet", **feeds[i])["out_sample"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(feeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(backend.compile_log) == 1  # nothing else ran on this backend
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)


# -- the bounded (LRU) cache ----------------------------------------------------------------------


def _unet_feed(size):
    return _unet_inputs(np.random.default_rng(0), 1, *size)


def _cached_unet_sizes(backend):
    """Latent sizes of the U-Net's cached compiled models, least recently used first."""
    return [dict(shapes)["sample"][2:] for shapes in backend.compiled("unet")]


def _compiled_unet_sizes(backend):
    """Latent sizes of every U-Net compile so far, in order."""
    return [dict(shapes)["sample"][2:] for g, shapes, _ in backend.compile_log if g == "unet"]


def test_least_recently_used_shape_is_evicted_and_recompiled(tiny_package):
    backend = OpenVINOBackend(tiny_package("sd1"), max_compiled_shapes=2)
    a, b, c = (8, 8), (8, 12), (12, 8)
    first = backend.run("unet", **_unet_feed(a))["out_sample"]
    backend.run("unet", **_unet_feed(b))
    backend.run("unet", **_unet_feed(a))  # a hit: a is now the most recently used
    backend.run("unet", **_unet_feed(c))  # evicts b, not a
    assert _cached_unet_sizes(backend) == [a, c]
    assert _compiled_unet_sizes(backend) == [a, b, c]

    backend.run("unet", **_unet_feed(b))  # back again: recompiled, and a goes
    again = backend.run("unet", **_unet_feed(c))["out_sample"]
    assert _compiled_unet_sizes(backend) == [a, b, c, b]
    assert _cached_unet_sizes(backend) == [b, c]
    backend.run("unet", **_unet_feed(a))
    assert _compiled_unet_sizes(backend) == [a, b, c, b, a]
    np.testing.assert_array_equal(backend.run("unet", **_unet_feed(a))["out_sample"], first)
    assert again.shape == (1, 4, 12, 8)
    # Each graph has its own limit: the U-Net's sizes did not evict the text encoder.
    backend.run("text_encoder", input_ids=np.ones((1, 77), np.int64))
    assert len(backend.compiled("text_encoder")) == 1 and len(backend.compiled("unet")) == 2


def test_no_limit_keeps_every_shape(tiny_package):
    batches = range(1, 11)  # more shapes than the default limit, 8
    unbounded = OpenVINOBackend(tiny_package("sd1"), max_compiled_shapes=None)
    default = OpenVINOBackend(tiny_package("sd1"))
    for batch in batches:
        for backend in (unbounded, default):
            backend.run("text_encoder", input_ids=np.ones((batch, 77), np.int64))
    assert len(unbounded.compiled("text_encoder")) == len(batches)
    assert len(default.compiled("text_encoder")) == 8
    assert len(unbounded.compile_log) == len(default.compile_log) == len(batches)


def test_a_call_on_an_evicted_model_still_finishes(tiny_package):
    backend = OpenVINOBackend(tiny_package("sd1"), max_compiled_shapes=1)
    inputs = _unet_feed((8, 8))
    expected = backend.run("unet", **inputs)["out_sample"]
    # What a call holds between finding its model and running it: then the model is evicted.
    shapes = tuple((name, tuple(np.shape(inputs[name]))) for name in backend.input_names("unet"))
    entry = backend._compiled("unet", shapes)
    backend.run("unet", **_unet_feed((8, 12)))
    assert _cached_unet_sizes(backend) == [(8, 12)]
    assert entry._idle == [], "an evicted model kept its idle infer requests"
    np.testing.assert_array_equal(entry.infer(inputs)["out_sample"], expected)
    assert entry._idle == [], "a request went back into an evicted model's pool"


def test_eviction_under_concurrent_calls(tiny_package):
    # The VAE decoder: the quickest graph to compile, and shapes keep being recompiled here.
    rng = np.random.default_rng(4)
    sizes = [(8, 8), (8, 12), (12, 8)]
    feeds = {s: rng.standard_normal((1, 4, *s), dtype=np.float32) for s in sizes}
    reference = OpenVINOBackend(tiny_package("sd1"), max_compiled_shapes=None)
    expected = {s: reference.run("vae_decoder", latent_sample=feeds[s])["sample"] for s in sizes}
    backend = OpenVINOBackend(tiny_package("sd1"), max_compiled_shapes=2)
    # Each thread walks the three sizes from its own start, so shapes keep being evicted,
    # some while other threads run on them.
    plans = [[sizes[(first + k) % 3] for k in range(3)] for first in (0, 1, 2, 0, 1, 2)]
    errors: list = []
    start = threading.Barrier(len(plans))

    def worker(plan):
        start.wait()
        for size in plan:
            try:
                got = backend.run("vae_decoder", latent_sample=feeds[size])["sample"]
                np.testing.assert_array_equal(got, expected[size])
            except Exception as e:  # reported below, with the size
                errors.append((size, e))

    threads = [threading.Thread(target=worker, args=(plan,)) for plan in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a call hung"
    assert not errors, errors
    assert len(backend.compiled("vae_decoder")) == 2
    assert len(backend.compile_log) >= 3


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "8"])
def test_bad_max_compiled_shapes_is_a_value_error(tiny_package, value):
    message = rf"max_compiled_shapes must be an integer >= 1 or None .*got {value!r}"
    with pytest.raises(ValueError, match=message):
        OpenVINOBackend(tiny_package("sd1"), max_compiled_shapes=value)
    with pytest.raises(ValueError, match=message):
        Pipeline.from_pretrained(tiny_package("sd1"), backend="openvino", max_compiled_shapes=value)


def _perturb_unet(package):
    """Change one weight of the package's U-Net graph and rewrite its manifest."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    path = package / "unet" / "model.onnx"
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if numpy_helper.to_array(i).size > 100)
    weights = numpy_helper.to_array(init).copy()
    weights.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    onnx.save(model, str(path))
    manifest = read_manifest(package)
    manifest.pop("files")
    write_manifest(package, manifest)


def test_disk_cache_key_follows_the_graph(tiny_package, tmp_path):
    package = shutil.copytree(tiny_package("sd1"), tmp_path / "package")
    cache = tmp_path / "cache"
    before = OpenVINOBackend(package, cache_dir=cache)
    inputs = _unet_inputs(np.random.default_rng(2), 2, 8, 8)
    out_before = before.run("unet", **inputs)["out_sample"]
    key = before.cache_key("unet")
    assert key.startswith("unet-")
    assert any((cache / key).iterdir()), "OpenVINO wrote no cache blob"

    _perturb_unet(package)
    after = OpenVINOBackend(package, cache_dir=cache)
    assert after.cache_key("unet") != key
    assert after.cache_key("text_encoder") == before.cache_key("text_encoder")
    out_after = after.run("unet", **inputs)["out_sample"]
    assert not np.array_equal(out_after, out_before), "the stale compiled U-Net was reused"

    # Without a manifest (an optimum package) the key is computed from the files: the same.
    (package / "fewstep.json").unlink()
    assert OpenVINOBackend(package).cache_key("unet") == after.cache_key("unet")
    # A second backend on the same cache loads the blob and computes the same thing.
    again = OpenVINOBackend(package, cache_dir=cache).run("unet", **inputs)["out_sample"]
    np.testing.assert_array_equal(again, out_after)


def test_generate_with_openvino_does_not_import_torch(tiny_package, tmp_path):
    precision = "bf16" if HAS_BF16 else "fp32"
    script = (
        "import sys\n"
        "from fewstep.cli import main\n"
        f"rc = main(['generate', 'a red cat', '--model', {str(tiny_package('turbo'))!r},\n"
        f"    '--backend', 'openvino', '--precision', {precision!r}, '--seed', '1',\n"
        f"    '-o', {str(tmp_path / 'cat.png')!r}])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "    ('torch', 'diffusers', 'transformers'))\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(rc or bool(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout
    assert (tmp_path / "cat.png").is_file()


# -- errors ----------------------------------------------------------------------------------------


def test_bad_precision_is_a_value_error(tiny_package):
    with pytest.raises(
        ValueError, match=r"precision must be one of \('fp32', 'bf16'\), got 'fp16'"
    ):
        OpenVINOBackend(tiny_package("sd1"), precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        Pipeline.from_pretrained(tiny_package("sd1"), backend="openvino", precision="int8")
    with pytest.raises(ValueError, match="num_threads must be an integer >= 1"):
        OpenVINOBackend(tiny_package("sd1"), num_threads=0)
    assert PRECISIONS == ("fp32", "bf16")


def test_bf16_on_a_cpu_without_it_names_what_it_supports(tiny_package, monkeypatch):
    class CoreWithoutBF16(ov.Core):
        def get_property(self, device, name, *args):
            if name == "OPTIMIZATION_CAPABILITIES":
                return ["FP32", "INT8"]
            return super().get_property(device, name, *args)

    monkeypatch.setattr(ov, "Core", CoreWithoutBF16)
    with pytest.raises(ValueError, match=r"precision 'bf16' is not supported .* \['fp32'\]"):
        OpenVINOBackend(tiny_package("sd1"), precision="bf16")


def test_missing_openvino_names_the_extra(tiny_package, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ImportError, match=r"pip install 'fewstep\[openvino\]'"):
        OpenVINOBackend(tiny_package("sd1"))


def test_unknown_and_missing_inputs_and_bad_shapes_are_backend_errors(tiny_package):
    backend = OpenVINOBackend(tiny_package("sd1"))
    inputs = _unet_inputs(np.random.default_rng(3), 1, 8, 8)
    with pytest.raises(BackendError, match=r"unet has no input 'text_embeds'"):
        backend.run("unet", text_embeds=np.zeros((1, 32), np.float32), **inputs)
    del inputs["timestep"]
    with pytest.raises(BackendError, match=r"unet needs input\(s\) \['timestep'\]"):
        backend.run("unet", **inputs)
    inputs = _unet_inputs(np.random.default_rng(3), 1, 8, 8, cross_dim=48)
    with pytest.raises(
        BackendError, match=r"unet failed on inputs .*encoder_hidden_states\[1, 77, 48\]"
    ):
        backend.run("unet", **inputs)
    with pytest.raises(ValueError, match="graph must be one of"):
        backend.run("controlnet", sample=inputs["sample"])


def test_backend_options_are_checked_by_name(tiny_package):
    with pytest.raises(ValueError, match=r"backend 'onnxruntime' takes no option \['precision'\]"):
        create_backend("onnxruntime", tiny_package("sd1"), precision="bf16")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fewstep.cli",
            "generate",
            "x",
            "--model",
            str(tiny_package("sd1")),
            "--precision",
            "bf16",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "takes no option ['precision']" in proc.stderr, proc.stderr
