"""Dynamic batching (fewstep.batching): gathered requests get their own images, and the queue's
edges (full, failing call, cancelled request, close) behave.

The parity test runs the tiny sd1 package; the others use a stub pipeline that records its
calls and can be held at a gate, so that what is queued at each moment is known.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from fewstep.batching import (
    Batcher,
    BatchRecord,
    Closed,
    GenerationRequest,
    QueueFull,
)
from fewstep.inputs import Limits
from fewstep.package import default_model
from fewstep.pipeline import Pipeline

BOUND = 1e-5  # as tests/test_per_image.py: bit-identical measured, float32 rounding allowed


class StubPipeline:
    """Records each call; holds every call at `gate` until it is set; raises on a prompt
    containing "boom"; returns "prompt#seed" strings as images."""

    def __init__(self, open_gate: bool = True):
        self.calls: list[dict] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if open_gate:
            self.gate.set()

    def __call__(self, prompt, seed, **kwargs):
        self.calls.append(dict(prompt=prompt, seed=seed, **kwargs))
        self.entered.set()
        assert self.gate.wait(10), "gate never opened"
        if any("boom" in p for p in prompt):
            raise RuntimeError("boom in the batch")
        return SimpleNamespace(images=[f"{p}#{s}" for p, s in zip(prompt, seed, strict=True)])


def expected(request: GenerationRequest) -> list[str]:
    return [f"{request.prompt}#{s}" for s in request.seeds]


def hold_worker(stub: StubPipeline, batcher: Batcher):
    """Submit a full batch that keeps the worker busy at the gate; the queue is then empty."""
    future = batcher.submit(GenerationRequest("hold", seed=0, n=batcher.max_batch))
    assert stub.entered.wait(5)
    assert batcher.queued() == 0
    return future


# -- the real pipeline ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1(tiny_package):
    return Pipeline.from_pretrained(tiny_package("sd1"))


def test_requests_from_threads_get_what_their_own_call_gives(sd1):
    common = dict(num_inference_steps=2, height=32, width=32, scheduler="euler_ancestral")
    requests = [
        GenerationRequest(f"prompt {i}", seed=100 * i + 7, n=1 + i % 2, guidance_scale=g, **common)
        for i, g in enumerate([3.0, 7.5, 5.0, 2.0, 9.0, 4.0])
    ]
    # two unguided ones: another batch key (the U-Net batch is not doubled)
    requests += [
        GenerationRequest(f"plain {i}", seed=i, guidance_scale=1.0, negative_prompt="x", **common)
        for i in range(2)
    ]
    batcher = Batcher(sd1, max_batch=8, max_wait_ms=300, output_type="np")
    start = threading.Barrier(len(requests))
    futures: list = [None] * len(requests)

    def client(i: int) -> None:
        start.wait()
        futures[i] = batcher.submit(requests[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [f.result(timeout=60) for f in futures]
    assert batcher.close(timeout=10)

    for request, images in zip(requests, results, strict=True):
        alone = sd1(
            request.prompt,
            negative_prompt=request.negative_prompt,
            seed=request.seeds,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.n,
            output_type="np",
            **common,
        )
        assert len(images) == request.n
        np.testing.assert_allclose(np.stack(images), alone.images, rtol=0, atol=BOUND)
    records = batcher.stats()
    assert sum(r.requests for r in records) == len(requests)
    assert max(r.requests for r in records) > 1  # some requests did share a call
    assert all(r.images <= 8 and r.ok for r in records)


def test_a_request_the_model_refuses_fails_at_submit(sd1):
    with Batcher(sd1) as batcher:
        with pytest.raises(ValueError, match="height must be a multiple of 16"):
            batcher.submit(GenerationRequest("a", seed=1, height=36, width=32))
        with pytest.raises(ValueError, match="scheduler must be one of"):
            batcher.submit(GenerationRequest("a", seed=1, scheduler="nope"))
        assert batcher.queued() == 0 and batcher.stats() == []


# -- the queue, with a stub pipeline ----------------------------------------------------------


def test_gathered_call_has_per_image_arguments_and_results_split_back():
    stub = StubPipeline(open_gate=False)
    records: list[BatchRecord] = []
    batcher = Batcher(stub, max_batch=4, max_wait_ms=0, on_batch=records.append)
    hold_worker(stub, batcher)
    a = GenerationRequest("a", seed=10, n=2, guidance_scale=7.5, negative_prompt="na")
    b = GenerationRequest("b", seed=20, n=1, guidance_scale=3.0)
    c = GenerationRequest("c", seed=30, n=2, guidance_scale=5.0)  # does not fit with a and b
    big = GenerationRequest("big", seed=40, n=6, guidance_scale=5.0)  # over max_batch: alone
    futures = [batcher.submit(r) for r in (a, b, c, big)]
    stub.gate.set()
    for request, future in zip((a, b, c, big), futures, strict=True):
        assert future.result(timeout=5) == expected(request)
    assert batcher.close(timeout=5)
    first = stub.calls[1]
    assert first["prompt"] == ["a", "a", "b"]
    assert first["negative_prompt"] == ["na", "na", ""]
    assert first["seed"] == [10, 11, 20]
    assert first["guidance_scale"] == [7.5, 7.5, 3.0]
    assert first["num_images_per_prompt"] == 1
    assert [call["prompt"] for call in stub.calls[2:]] == [["c", "c"], ["big"] * 6]
    assert [(r.requests, r.images) for r in records] == [(1, 4), (2, 3), (1, 2), (1, 6)]


def test_queue_full_raises_at_once():
    stub = StubPipeline(open_gate=False)
    batcher = Batcher(stub, max_batch=1, max_queue=2)
    hold_worker(stub, batcher)
    queued = [batcher.submit(GenerationRequest(f"q{i}", seed=i)) for i in range(2)]
    t0 = time.perf_counter()
    with pytest.raises(QueueFull, match="maximum of 2"):
        batcher.submit(GenerationRequest("one too many", seed=9))
    assert time.perf_counter() - t0 < 0.05
    queued[0].cancel()  # a cancelled request frees its place
    late = batcher.submit(GenerationRequest("late", seed=5))
    stub.gate.set()
    assert late.result(timeout=5) == ["late#5"]
    assert batcher.close(timeout=5)


def test_failing_call_fails_only_its_batch():
    stub = StubPipeline(open_gate=False)
    batcher = Batcher(stub, max_batch=8, max_wait_ms=0)
    hold_worker(stub, batcher)
    boom = batcher.submit(GenerationRequest("boom", seed=1))
    same_batch = batcher.submit(GenerationRequest("fine", seed=2))
    other_key = batcher.submit(GenerationRequest("other", seed=3, height=64))
    stub.gate.set()
    for future in (boom, same_batch):
        with pytest.raises(RuntimeError, match="boom in the batch"):
            future.result(timeout=5)
    assert other_key.result(timeout=5) == ["other#3"]
    assert batcher.submit(GenerationRequest("next", seed=4)).result(timeout=5) == ["next#4"]
    assert batcher.close(timeout=5)
    assert [r.ok for r in batcher.stats()] == [True, False, True, True]


def test_cancelled_queued_request_is_not_computed():
    stub = StubPipeline(open_gate=False)
    batcher = Batcher(stub, max_batch=8, max_wait_ms=0)
    hold_worker(stub, batcher)
    kept = batcher.submit(GenerationRequest("kept", seed=1))
    dropped = batcher.submit(GenerationRequest("dropped", seed=2))
    assert dropped.cancel()
    stub.gate.set()
    assert kept.result(timeout=5) == ["kept#1"]
    assert batcher.close(timeout=5)
    assert [call["prompt"] for call in stub.calls] == [["hold"] * 8, ["kept"]]


def test_close_drains_queued_work_then_refuses():
    stub = StubPipeline(open_gate=False)
    batcher = Batcher(stub, max_batch=8, max_wait_ms=10_000)
    held = hold_worker(stub, batcher)
    # other sizes, other keys: each batch would wait for more of its kind if not closing
    futures = [
        batcher.submit(GenerationRequest(f"q{i}", seed=i, height=8 * (i + 1))) for i in range(3)
    ]
    threading.Timer(0.1, stub.gate.set).start()
    t0 = time.perf_counter()
    assert batcher.close(drain=True, timeout=5)
    assert time.perf_counter() - t0 < 5  # closing does not wait out max_wait_ms
    assert held.result(timeout=0) == [f"hold#{i}" for i in range(8)]
    assert [f.result(timeout=0) for f in futures] == [[f"q{i}#{i}"] for i in range(3)]
    with pytest.raises(Closed):
        batcher.submit(GenerationRequest("after", seed=1))


def test_close_without_drain_cancels_queued_work():
    stub = StubPipeline(open_gate=False)
    batcher = Batcher(stub, max_batch=1)
    held = hold_worker(stub, batcher)
    queued = batcher.submit(GenerationRequest("queued", seed=1))
    threading.Timer(0.1, stub.gate.set).start()
    assert batcher.close(drain=False, timeout=5)
    assert held.result(timeout=0) == ["hold#0"]  # the running batch finishes
    assert queued.cancelled()
    assert [call["prompt"] for call in stub.calls] == [["hold"]]


# -- requests and buckets ---------------------------------------------------------------------


def test_batch_key_and_seeds():
    base = GenerationRequest("a", seed=7, n=3, guidance_scale=7.5, height=64, width=64)
    assert base.seeds == [7, 8, 9]
    shares = GenerationRequest("b", seed=1, guidance_scale=2.0, negative_prompt="x", height=64)
    assert GenerationRequest("b", seed=1, guidance_scale=2.0, height=64, width=64).batch_key == (
        base.batch_key
    )
    assert shares.batch_key != base.batch_key  # width differs
    for change in (
        dict(guidance_scale=1.0),  # unguided
        dict(guidance_scale=None),  # the model's default, unknown here
        dict(num_inference_steps=4),
        dict(scheduler="ddim"),
        dict(eta=0.5),
        dict(guidance_rescale=0.7),
    ):
        other = GenerationRequest("a", seed=7, **{**dict(guidance_scale=7.5), **change})
        assert other.batch_key != GenerationRequest("a", seed=7, guidance_scale=7.5).batch_key


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(seed=-1), "seed must be an integer between 0 and"),
        (dict(seed=2**64 - 2, n=3), "seed must be an integer between 0 and"),  # seed+2 overflows
        (dict(seed=1, n=0), "n must be an integer >= 1"),
        (dict(seed=1, guidance_scale="7"), "guidance_scale must be a number"),
        (dict(seed=1, eta=2.0), "eta must be a number between 0 and 1"),
        (dict(seed=True), "seed must be an integer"),
    ],
)
def test_request_fields_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationRequest("a", **kwargs)


def test_calls_are_padded_to_the_batch_sizes_and_the_padding_dropped():
    stub = StubPipeline(open_gate=False)
    batcher = Batcher(stub, max_batch=8, max_wait_ms=0, batch_sizes=(1, 2, 4, 8))
    held = hold_worker(stub, batcher)  # 8 images: a full batch, no padding
    three = batcher.submit(GenerationRequest("three", seed=10, n=3))
    two = batcher.submit(GenerationRequest("two", seed=20, n=2))
    stub.gate.set()
    assert held.result(timeout=5) == ["hold#" + str(i) for i in range(8)]
    assert three.result(timeout=5) == ["three#10", "three#11", "three#12"]
    assert two.result(timeout=5) == ["two#20", "two#21"]
    assert batcher.close(timeout=5)
    # 5 images padded to 8 with copies of the last one
    assert stub.calls[1]["prompt"] == ["three"] * 3 + ["two"] * 5
    assert stub.calls[1]["seed"] == [10, 11, 12, 20, 21, 21, 21, 21]
    assert [r.images for r in batcher.stats()] == [8, 5]


def test_padding_changes_no_image_and_stays_within_the_limits(sd1):
    request = GenerationRequest("a red circle", seed=5, n=3, num_inference_steps=2, height=32)
    limited = Pipeline(sd1.info, sd1.tokenizer, sd1.backend, sd1.path, Limits(max_images=6))
    with Batcher(limited, max_batch=8, batch_sizes=(1, 2, 4, 8), output_type="np") as batcher:
        assert batcher.max_batch == 6 and batcher.batch_sizes == (1, 2, 4)
        padded = batcher.submit(request).result(timeout=60)
    alone = sd1(
        "a red circle",
        seed=[5, 6, 7],
        num_images_per_prompt=3,
        num_inference_steps=2,
        height=32,
        output_type="np",
    )
    np.testing.assert_allclose(np.stack(padded), alone.images, rtol=0, atol=BOUND)
    assert padded.settings["seed"] == [5, 6, 7]


# -- img2img ----------------------------------------------------------------------------------


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 RGB image [H, W, 3]: gradients plus noise, so the encoder sees structure."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return (base + rng.integers(0, 56, (height, width, 3))).astype(np.uint8)


def test_img2img_requests_batched_get_what_their_own_call_gives(sd1):
    common = dict(num_inference_steps=4, scheduler="euler_ancestral", guidance_scale=3.0)
    # 40×36 rounds down to 32×32 on this model (multiple 16): shares a call with the 32×32 one
    a = GenerationRequest("a", seed=3, n=2, image=picture(40, 36, 1), strength=0.5, **common)
    b = GenerationRequest("b", seed=9, image=picture(32, 32, 2), strength=0.5, **common)
    c = GenerationRequest("c", seed=5, image=picture(32, 32, 3), strength=0.75, **common)
    d = GenerationRequest("d", seed=1, height=32, width=32, **common)  # txt2img: its own call
    with Batcher(sd1, max_batch=8, max_wait_ms=300, output_type="np") as batcher:
        futures = [batcher.submit(r) for r in (a, b, c, d)]
        results = [f.result(timeout=60) for f in futures]
    assert sorted((r.requests, r.images) for r in batcher.stats()) == [(1, 1), (1, 1), (2, 3)]
    for request, images in zip((a, b, c), results[:3], strict=True):
        alone = sd1(
            request.prompt,
            image=request.image,
            strength=request.strength,
            seed=request.seeds,
            num_images_per_prompt=request.n,
            output_type="np",
            **common,
        )
        assert len(images) == request.n and images.settings["strength"] == request.strength
        np.testing.assert_allclose(np.stack(images), alone.images, rtol=0, atol=BOUND)
    assert results[0][0].shape == (32, 32, 3)


def test_img2img_requests_the_model_refuses_fail_at_submit(sd1):
    no_encoder = Pipeline.from_pretrained(default_model())
    no_encoder.backend.has_graph = lambda graph: graph != "vae_encoder"  # as if it had none
    image = picture(32, 32, 0)
    with Batcher(no_encoder) as batcher, pytest.raises(ValueError, match="vae_encoder"):
        batcher.submit(GenerationRequest("a", seed=1, image=image))
    with Batcher(sd1) as batcher:
        with pytest.raises(ValueError, match="num_inference_steps × strength must be at least 1"):
            batcher.submit(
                GenerationRequest("a", seed=1, image=image, strength=0.2, num_inference_steps=2)
            )
        with pytest.raises(ValueError, match="image height must be at least 16"):
            batcher.submit(GenerationRequest("a", seed=1, image=picture(8, 32, 0)))
        assert batcher.queued() == 0 and batcher.stats() == []


def test_img2img_call_has_an_image_per_image_and_the_strength():
    stub = StubPipeline(open_gate=False)
    batcher = Batcher(stub, max_batch=8, max_wait_ms=0, batch_sizes=(4,))
    hold_worker(stub, batcher)
    one, two = picture(16, 16, 1), picture(16, 16, 2)
    a = batcher.submit(GenerationRequest("a", seed=1, n=2, image=one, strength=0.6))
    b = batcher.submit(GenerationRequest("b", seed=5, image=two, strength=0.6))
    plain = batcher.submit(GenerationRequest("plain", seed=7))
    stub.gate.set()
    assert a.result(timeout=5) == ["a#1", "a#2"] and b.result(timeout=5) == ["b#5"]
    assert plain.result(timeout=5) == ["plain#7"]
    assert batcher.close(timeout=5)
    call = stub.calls[1]
    assert [id(image) for image in call["image"]] == [id(one), id(one), id(two), id(two)]
    assert call["strength"] == 0.6 and call["seed"] == [1, 2, 5, 5]  # padded to 4
    assert "image" not in stub.calls[2] and "strength" not in stub.calls[2]


def test_img2img_batch_keys_separate_what_cannot_share_a_call():
    image = picture(40, 36, 0)
    base = GenerationRequest("a", seed=1, image=image, strength=0.5)
    assert GenerationRequest("b", seed=9, image=picture(40, 36, 1), strength=0.5).batch_key == (
        base.batch_key
    )
    for other in (
        GenerationRequest("a", seed=1),  # txt2img
        GenerationRequest("a", seed=1, image=image, strength=0.6),
        GenerationRequest("a", seed=1, image=image),  # the default strength, 0.8
        GenerationRequest("a", seed=1, image=picture(48, 36, 0), strength=0.5),
        GenerationRequest("a", seed=1, image=image, strength=0.5, height=64, width=64),
    ):
        assert other.key_for(16) != base.key_for(16)
    # the size after the model's rounding decides: 40×36 and 32×32 both become 32×32 at 16
    small = GenerationRequest("a", seed=1, image=picture(32, 32, 0), strength=0.5)
    assert small.key_for(16) == base.key_for(16) and small.key_for(8) != base.key_for(8)
    # given height and width decide alone; the image's own size then does not matter
    sized = dict(strength=0.5, height=64, width=64)
    assert GenerationRequest("a", seed=1, image=image, **sized).key_for(16) == GenerationRequest(
        "a", seed=1, image=picture(16, 16, 0), **sized
    ).key_for(16)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(strength=0.5), "strength is for img2img"),
        (dict(image=picture(8, 8, 0), strength=0), r"strength must be a number in \(0, 1\]"),
        (dict(image=np.zeros((8, 8))), "image must be a PIL image or a numpy array"),
        (dict(image=b"png bytes"), "image must be a PIL image or a numpy array"),
    ],
)
def test_img2img_request_fields_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationRequest("a", seed=1, **kwargs)
