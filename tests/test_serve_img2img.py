"""img2img through the HTTP service: A1111's `POST /sdapi/v1/img2img` and OpenAI's
`POST /v1/images/edits` (multipart, with the openai client) against live uvicorn servers.

Each request must give the pixels of a direct `Pipeline.__call__(image=..., strength=...,
seed=[s, s+1, ...])` call on the tiny sd1 package (which has a VAE encoder), alone or batched
with another client's request; what fewstep does not do (masks, other resize modes), bad
images and a model without an encoder are 400s naming the field; bodies past the image
endpoints' bound are 413s.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")  # python-multipart: Starlette's form parser
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from PIL import Image  # noqa: E402
from serving import GatedPipeline, decode_png, error_of, live_server  # noqa: E402

from fewstep.package import default_model  # noqa: E402
from fewstep.pipeline import Pipeline  # noqa: E402
from fewstep.serve import create_app  # noqa: E402
from fewstep.serve.service import MAX_BODY_BYTES, MAX_IMAGE_BODY_BYTES  # noqa: E402

PROMPT = "a red circle"
SETTINGS = dict(num_inference_steps=4, guidance_scale=3.0)


def picture_png(height: int, width: int, seed: int) -> bytes:
    """A PNG of gradients plus noise, so the encoder sees structure."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    pixels = (base + rng.integers(0, 56, (height, width, 3))).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


IMAGE = picture_png(32, 48, 1)  # height 32, width 48: multiples of the tiny model's 16


@pytest.fixture(scope="module")
def tiny(tiny_package) -> Pipeline:
    return Pipeline.from_pretrained(tiny_package("sd1"))


@pytest.fixture(scope="module")
def url(tiny) -> Iterator[str]:
    plain = Pipeline.from_pretrained(default_model())
    plain.backend.has_graph = lambda graph: graph != "vae_encoder"  # as if it had no VAE encoder
    with live_server(create_app({"tiny": tiny, "plain": plain})) as base:
        yield base


def reference(pipe: Pipeline, image: bytes, strength: float, seed: int, n: int, **more) -> list:
    output = pipe(
        PROMPT,
        image=image,
        strength=strength,
        seed=[seed + i for i in range(n)],
        num_images_per_prompt=n,
        **{**SETTINGS, **more},
    )
    return [np.asarray(image) for image in output.images]


def img2img(base: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}/sdapi/v1/img2img", json=body, timeout=60)


def a1111_body(**more) -> dict:
    return {
        "prompt": PROMPT,
        "init_images": [base64.b64encode(IMAGE).decode()],
        "steps": 4,
        "cfg_scale": 3.0,
        "seed": 11,
        "denoising_strength": 0.5,
        **more,
    }


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_png(b64).convert("RGB"))


# -- images -----------------------------------------------------------------------------------


def test_a1111_img2img_gives_the_pipelines_images_and_says_the_strength(url, tiny):
    prefixed = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    body = a1111_body(init_images=[prefixed], batch_size=2, resize_mode=0, mask=None, mask_blur=4)
    response = img2img(url, body)
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = reference(tiny, IMAGE, 0.5, 11, 2)
    assert len(answer["images"]) == 2
    for b64, want in zip(answer["images"], expected, strict=True):
        np.testing.assert_array_equal(pixels(b64), want)
        assert decode_png(b64).text["parameters"].endswith("Denoising strength: 0.5")
    info = json.loads(answer["info"])
    assert info["denoising_strength"] == 0.5 and info["all_seeds"] == [11, 12]
    assert (info["width"], info["height"]) == (48, 32)  # the image's size
    assert answer["parameters"]["init_images"] is None  # as A1111: not sent back
    assert answer["parameters"]["denoising_strength"] == 0.5


def test_a1111_img2img_default_strength_is_a1111s_and_size_resizes(url, tiny):
    body = a1111_body(width=32, height=32, seed=3)
    del body["denoising_strength"]
    response = img2img(url, body)
    assert response.status_code == 200, response.text
    (b64,) = response.json()["images"]
    expected = reference(tiny, IMAGE, 0.75, 3, 1, height=32, width=32)
    np.testing.assert_array_equal(pixels(b64), expected[0])


def test_openai_edits_give_the_pipelines_images(url, tiny):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    result = client.images.edit(
        image=("picture.png", IMAGE, "image/png"),
        prompt=PROMPT,
        model="tiny",
        n=2,
        extra_body={"seed": 21, "strength": 0.75, **SETTINGS, "negative_prompt": "blue"},
    )
    expected = reference(tiny, IMAGE, 0.75, 21, 2, negative_prompt="blue")
    assert len(result.data) == 2
    for item, want in zip(result.data, expected, strict=True):
        np.testing.assert_array_equal(pixels(item.b64_json), want)


def test_concurrent_img2img_requests_share_one_call_and_each_gets_its_own_images(tiny):
    gated = GatedPipeline(tiny)
    app = create_app({"tiny": gated}, max_wait_ms=0)
    service = app.state.fewstep
    other = picture_png(32, 48, 2)  # another image of the same size: the same batch key
    with live_server(app) as base:
        holder = threading.Thread(target=img2img, args=(base, a1111_body(prompt="hold")))
        holder.start()  # keeps the worker at the gate while the two below queue
        assert gated.entered.wait(10)
        bodies = [
            a1111_body(seed=5),
            a1111_body(seed=8, init_images=[base64.b64encode(other).decode()]),
        ]
        answers: list = [None, None]

        def client(i: int) -> None:
            answers[i] = img2img(base, bodies[i])

        clients = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for thread in clients:
            thread.start()
        while service.batchers["tiny"].queued() < 2:
            threading.Event().wait(0.01)
        gated.gate.set()
        for thread in [holder, *clients]:
            thread.join(60)
        records = service.batchers["tiny"].stats()
    assert [(r.requests, r.images) for r in records] == [(1, 1), (2, 2)]
    assert gated.calls[-1] == [PROMPT, PROMPT]
    for answer, image, seed in zip(answers, (IMAGE, other), (5, 8), strict=True):
        assert answer.status_code == 200, answer.text
        (b64,) = answer.json()["images"]
        np.testing.assert_array_equal(pixels(b64), reference(tiny, image, 0.5, seed, 1)[0])


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, param, words",
    [
        (dict(mask="aGVsbG8="), "mask", "inpainting"),
        (dict(resize_mode=1), "resize_mode", "just resize"),
        (dict(init_images=["not base64!"]), "init_images", "base64"),
        (dict(init_images=[base64.b64encode(b"no image").decode()]), "init_images", "PNG"),
        (dict(init_images=[]), "init_images", "list of base64 images"),
        (dict(init_images=None), "init_images", "list of base64 images"),
        (dict(denoising_strength=0), "denoising_strength", "strength must be"),
        (dict(steps=1, denoising_strength=0.5), "steps", "num_inference_steps × strength"),
        (dict(enable_hr=True), "enable_hr", "unknown fields"),  # txt2img's hires fix
        (
            dict(override_settings={"sd_model_checkpoint": "plain"}),
            "init_images",
            "vae_encoder",
        ),
    ],
)
def test_a1111_img2img_refusals_name_the_field(url, change, param, words):
    response = img2img(url, {**a1111_body(), **change})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and words in error["message"], error


def edit(base: str, files: dict, data: dict) -> httpx.Response:
    return httpx.post(f"{base}/v1/images/edits", files=files, data=data, timeout=60)


@pytest.mark.parametrize(
    "files, data, param, words",
    [
        ({"image": IMAGE, "mask": IMAGE}, {}, "mask", "no inpainting"),
        ({}, {}, "image", "image file"),
        ({"image": b"no image"}, {}, "image", "PNG"),
        ({"image": IMAGE}, {"n": "two"}, "n", "integer"),
        ({"image": IMAGE}, {"strength": "1.5"}, "strength", "strength must be"),
        ({"image": IMAGE}, {"colour": "red"}, "colour", "unknown fields"),
        ({"image": IMAGE}, {"model": "plain"}, "image", "vae_encoder"),
    ],
)
def test_openai_edit_refusals_name_the_field(url, files, data, param, words):
    response = edit(url, files, {"prompt": PROMPT, **data})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and words in error["message"], error


def test_image_bodies_have_their_own_bound(url):
    # past the JSON bound, within the image bound: read (then refused for its field)
    padded = a1111_body(prompt="x" * (MAX_BODY_BYTES + 1), steps=1, denoising_strength=0.5)
    assert img2img(url, padded).status_code == 400
    txt2img = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x" * MAX_BODY_BYTES})
    assert txt2img.status_code == 413
    huge = "A" * MAX_IMAGE_BODY_BYTES
    response = img2img(url, a1111_body(init_images=[huge]))
    assert (
        response.status_code == 413 and str(MAX_IMAGE_BODY_BYTES) in error_of(response)["message"]
    )
    response = edit(url, {"image": b"\0" * MAX_IMAGE_BODY_BYTES}, {"prompt": PROMPT})
    assert response.status_code == 413


def test_a_streamed_body_past_the_bound_is_413(url):
    chunk = b"A" * (1 << 20)

    def body():
        yield b'{"init_images": ["'
        for _ in range(MAX_IMAGE_BODY_BYTES // len(chunk) + 1):
            yield chunk

    response = httpx.post(f"{url}/sdapi/v1/img2img", content=body(), timeout=60)
    assert response.status_code == 413
