"""Fuzzing a generation call: whatever a caller passes, the call succeeds or raises ValueError.

Each argument is drawn from a mix of good values and the bad ones callers send (wrong types,
bools, numpy scalars, NaN and infinities, out-of-range numbers, lone surrogates, odd sizes,
malformed latents, foreign generators). Any other exception type fails the test. Successful
calls run the tiny model for real at 16-32 px and 1-2 steps, so an argument that passes the
checks and then breaks a graph or a sampler is caught too. (Hypothesis runs derandomized,
conftest.py: CI sees the same cases every run.)
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fewstep.pipeline import Pipeline
from fewstep.samplers import SAMPLERS

EXAMPLES = 1200


@pytest.fixture(scope="module")
def sd1(tiny_package):
    return Pipeline.from_pretrained(tiny_package("sd1"))


def numbers(good: st.SearchStrategy, numpy_type: type) -> tuple[st.SearchStrategy, ...]:
    """(good values and numpy scalars of them, the wrong things sent for a number)."""
    return (
        st.one_of(good, good.map(numpy_type)),
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=64),
            st.integers(-(2**70), 2**70),
            st.booleans(),
            st.sampled_from(["0.5", "7", None, [1.0], {"x": 1}, 1j]),
        ),
    )


texts = st.text(max_size=40)
prompts = (
    st.one_of(texts, st.lists(texts, min_size=1, max_size=3)),
    st.one_of(
        st.sampled_from(["a \ud800 cat", "\udfff", "x" * 10_001]),
        st.lists(st.one_of(texts, st.integers(), st.none()), min_size=0, max_size=3),
        st.sampled_from([None, 123, 4.5, {"a": "b"}, {"a"}, b"bytes"]),
    ),
)
sizes = (
    st.sampled_from([16, 32, np.int32(16), np.uint8(32)]),
    st.sampled_from([0, -16, 8, 24, 40, 72, 17, 10**6, True, 16.0, "32"]),
)
ARGUMENTS = {  # name: (good values, bad values)
    "negative_prompt": (st.one_of(st.none(), prompts[0]), prompts[1]),
    "num_inference_steps": numbers(st.integers(1, 2), np.int64),
    "guidance_scale": numbers(st.floats(0.0, 12.0), np.float32),
    "height": sizes,
    "width": sizes,
    "num_images_per_prompt": numbers(st.integers(1, 2), np.int64),
    "seed": numbers(st.integers(0, 2**64 - 1), np.uint64),
    "eta": numbers(st.floats(0.0, 1.0), np.float32),
    "guidance_rescale": numbers(st.floats(0.0, 1.0), np.float32),
    "output_type": (st.sampled_from(["np", "pil"]), st.sampled_from(["latent", None, 1, ["np"]])),
    "scheduler": (
        st.sampled_from([None, *SAMPLERS]),
        st.sampled_from(["pndm", "DDIMScheduler", 3]),
    ),
    "generator": (
        st.builds(np.random.default_rng, st.integers(0, 9)),
        st.sampled_from([42, np.random.RandomState(0), "rng", object()]),
    ),
}


def good_or_bad(draw: st.DrawFn, strategies: tuple[st.SearchStrategy, st.SearchStrategy]):
    """A bad value one time in ten, so that about a quarter of all calls are good through
    and through and run."""
    good, bad = strategies
    return draw(bad) if draw(st.integers(0, 9)) == 0 else draw(good)


@st.composite
def call_arguments(draw: st.DrawFn) -> dict:
    args: dict = {"prompt": good_or_bad(draw, prompts)}
    for name, strategies in ARGUMENTS.items():
        if draw(st.booleans()):
            args[name] = good_or_bad(draw, strategies)
    # Small sizes and steps whenever the draw left them out, so successes stay fast.
    args.setdefault("height", 16)
    args.setdefault("width", 16)
    args.setdefault("num_inference_steps", 1)
    if draw(st.integers(0, 4)) == 0:
        args["latents"] = draw(latents(args))
    return args


@st.composite
def latents(draw: st.DrawFn, args: dict) -> object:
    """Latents of the right shape when the sizes are ints (values maybe poisoned), or junk."""
    h, w = args["height"], args["width"]
    per_prompt = args.get("num_images_per_prompt", 1)
    prompt = args["prompt"]
    batch = max(len(prompt), 1) if isinstance(prompt, list) else 1
    if not all(type(v) is int and 0 < v <= 64 for v in (h, w, per_prompt)):
        return draw(st.sampled_from(["noise", None, [[1, 2], [3]], np.zeros(3)]))
    shape = (batch * per_prompt, 4, max(h // 8, 1), max(w // 8, 1))
    array = np.random.default_rng(draw(st.integers(0, 9))).standard_normal(shape)
    poison = draw(st.sampled_from([None, np.nan, np.inf, 1e39, 1j]))
    if poison is not None:
        array = array.astype(np.result_type(array, poison))
        array.flat[draw(st.integers(0, array.size - 1))] = poison
    if draw(st.integers(0, 5)) == 0:
        array = array[..., :-1]  # wrong shape
    return array


def test_any_call_succeeds_or_raises_value_error(sd1, capsys):
    outcomes: collections.Counter[str] = collections.Counter()
    unexpected: list[tuple[dict, BaseException]] = []

    @settings(max_examples=EXAMPLES)
    @given(call_arguments())
    def call(args: dict) -> None:
        try:
            out = sd1(**args)
        except ValueError:
            outcomes["ValueError"] += 1
            return
        except Exception as e:  # recorded, then failed below with the arguments
            outcomes[type(e).__name__] += 1
            unexpected.append((args, e))
            return
        outcomes["succeeded"] += 1
        size = (out.settings["height"], out.settings["width"])
        shapes = {np.asarray(image).shape for image in out.images}
        assert shapes == {(*size, 3)}
        assert len(out.images) % len(out.settings["prompt"]) == 0

    call()
    with capsys.disabled():
        print(f"\nfuzzed Pipeline.__call__: {sum(outcomes.values())} calls, {dict(outcomes)}")
    assert not unexpected, [(args, repr(e)) for args, e in unexpected[:5]]
    assert sum(outcomes.values()) >= 1000
    assert outcomes["succeeded"] >= 100 and outcomes["ValueError"] >= 500
