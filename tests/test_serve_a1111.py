"""A1111's API of the HTTP service (fewstep.serve.a1111_api) against live uvicorn servers.

A1111-style JSON requests must give the pipeline's own images, seed + i for image i of
batch_size × n_iter, with each PNG's `parameters` chunk equal to its infotext in `info`;
what fewstep does not do is refused with a 400 naming the field.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serving import decode_png, error_of, live_server  # noqa: E402

from fewstep.image_files import a1111_parameters  # noqa: E402
from fewstep.package import read_manifest  # noqa: E402
from fewstep.samplers import SAMPLERS  # noqa: E402
from fewstep.samplers.a1111 import A1111_SAMPLERS, scheduler_for_a1111  # noqa: E402
from fewstep.serve import create_app  # noqa: E402

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def unet_hash(pipe) -> str:
    return (read_manifest(pipe.path) or {})["files"]["unet/model.onnx"]


@pytest.fixture(scope="module")
def url(pipe) -> Iterator[str]:
    with live_server(create_app({"default": pipe, "other": pipe})) as base:
        yield base


def txt2img(base: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}/sdapi/v1/txt2img", json=body, timeout=60)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


# -- images -----------------------------------------------------------------------------------


def test_txt2img_gives_the_pipelines_images_with_seeds_s_s1_and_their_infotexts(
    url, pipe, unet_hash
):
    body = {
        "prompt": PROMPT,
        "negative_prompt": "green",
        "steps": 2,
        "cfg_scale": 3.0,
        "width": 64,
        "height": 48,
        "seed": 7,
        "batch_size": 2,
        "n_iter": 2,
        "sampler_name": "Euler",
        # what A1111 clients send that changes nothing here
        "save_images": False,
        "do_not_save_grid": True,
        "enable_hr": False,
        "denoising_strength": 0.7,
        "subseed": -1,
        "subseed_strength": 0,
        "styles": [],
        "restore_faces": False,
        "script_name": None,
        "alwayson_scripts": {},
        "s_noise": 1.0,
    }
    response = txt2img(url, body)
    assert response.status_code == 200, response.text
    answer = response.json()
    reference = pipe(
        PROMPT,
        negative_prompt="green",
        num_inference_steps=2,
        guidance_scale=3.0,
        width=64,
        height=48,
        seed=[7, 8, 9, 10],
        num_images_per_prompt=4,
        scheduler="euler",
    )
    images = [decode_png(b64) for b64 in answer["images"]]
    info = json.loads(answer["info"])
    assert len(images) == 4 and info["all_seeds"] == [7, 8, 9, 10]
    for i, (image, expected) in enumerate(zip(images, reference.images, strict=True)):
        assert image.size == (64, 48)
        np.testing.assert_array_equal(pixels(image), np.asarray(expected))
        text = a1111_parameters(
            PROMPT, "green", {**reference.settings, "seed": 7 + i}, "default", unet_hash
        )
        assert image.text["parameters"] == text == info["infotexts"][i]
    assert info["all_prompts"] == [PROMPT] * 4 and info["all_negative_prompts"] == ["green"] * 4
    expected_info = {
        "prompt": PROMPT,
        "negative_prompt": "green",
        "seed": 7,
        "steps": 2,
        "cfg_scale": 3.0,
        "width": 64,
        "height": 48,
        "sampler_name": "Euler",
        "batch_size": 2,
        "sd_model_name": "default",
        "sd_model_hash": unet_hash[:10],
    }
    assert {key: info[key] for key in expected_info} == expected_info
    parameters = answer["parameters"]
    assert parameters == {
        **body,
        "override_settings": {"sd_model_checkpoint": "default"},
    }


def test_defaults_are_the_models_and_random_seeds_are_reported_and_reproduce(url):
    drawn = []
    for seed in ({"seed": -1}, {}):
        answer = txt2img(url, {"prompt": PROMPT, "batch_size": 2, **seed}).json()
        info, parameters = json.loads(answer["info"]), answer["parameters"]
        s = info["seed"]
        assert 0 <= s < 2**32 and info["all_seeds"] == [s, s + 1] == [parameters["seed"], s + 1]
        assert (parameters["steps"], parameters["width"], parameters["height"]) == (4, 64, 64)
        assert parameters["sampler_name"] == info["sampler_name"] == "LCM"  # the model's own
        again = txt2img(url, {"prompt": PROMPT, "batch_size": 2, "seed": s}).json()
        assert again["images"] == answer["images"]
        drawn.append(s)
    assert drawn[0] != drawn[1]


def test_eta_reaches_ddim(url, pipe):
    body = {"prompt": PROMPT, "seed": 3, "steps": 2, "sampler_name": "DDIM", "eta": 0.5}
    answer = txt2img(url, body).json()
    reference = pipe(PROMPT, seed=3, num_inference_steps=2, scheduler="ddim", eta=0.5)
    [image] = [decode_png(b64) for b64 in answer["images"]]
    np.testing.assert_array_equal(pixels(image), np.asarray(reference.images[0]))
    assert answer["parameters"]["eta"] == 0.5


def test_a_model_is_picked_by_name_or_by_its_sd_models_title(url, unet_hash):
    title = f"other [{unet_hash[:10]}]"
    for checkpoint in ("other", title):
        body = {
            "prompt": PROMPT,
            "seed": 1,
            "override_settings": {"sd_model_checkpoint": checkpoint},
        }
        answer = txt2img(url, body).json()
        info = json.loads(answer["info"])
        assert info["sd_model_name"] == "other"
        assert info["infotexts"][0].endswith("Model: other")
        assert answer["parameters"]["override_settings"] == {"sd_model_checkpoint": "other"}


def test_send_images_false_answers_without_images(url):
    answer = txt2img(url, {"prompt": PROMPT, "seed": 2, "send_images": False}).json()
    assert answer["images"] == []
    assert json.loads(answer["info"])["all_seeds"] == [2]


def test_txt2img_batches_with_an_openai_request(pipe):
    app = create_app({"default": pipe}, max_batch=3, max_wait_ms=2000)
    with live_server(app) as base:
        answers = {}

        def send(name, path, body):
            answers[name] = httpx.post(f"{base}{path}", json=body, timeout=60)

        requests = [
            ("a1111", "/sdapi/v1/txt2img", {"prompt": "a", "seed": 1, "batch_size": 2}),
            ("openai", "/v1/images/generations", {"prompt": "b", "seed": 5}),
        ]
        threads = [threading.Thread(target=send, args=r) for r in requests]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        stats = app.state.fewstep.batchers["default"].stats()
    assert answers["a1111"].status_code == answers["openai"].status_code == 200
    assert [(r.requests, r.images) for r in stats] == [(2, 3)]  # one call for both
    images = [decode_png(b64) for b64 in answers["a1111"].json()["images"]]
    alone = pipe("a", seed=[1, 2], num_images_per_prompt=2)
    for image, expected in zip(images, alone.images, strict=True):
        np.testing.assert_array_equal(pixels(image), np.asarray(expected))


# -- the lists --------------------------------------------------------------------------------


def test_samplers_list_is_the_a1111_table(url):
    samplers = httpx.get(f"{url}/sdapi/v1/samplers").json()
    assert samplers == [{"name": name, "aliases": [], "options": {}} for name in A1111_SAMPLERS]
    assert all(scheduler_for_a1111(s["name"]) in SAMPLERS for s in samplers)


def test_sd_models_lists_the_served_models(url, unet_hash):
    models = httpx.get(f"{url}/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["default", "other"]
    first = models[0]
    assert first["title"] == f"default [{unet_hash[:10]}]"
    assert (first["hash"], first["sha256"]) == (unet_hash[:10], unet_hash)
    assert isinstance(first["filename"], str) and first["config"] is None


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"enable_hr": True}, "enable_hr", "hires fix"),
        ({"subseed_strength": 0.5}, "subseed_strength", "variation seeds"),
        ({"seed_resize_from_h": 512}, "seed_resize_from_h", "seed resizing"),
        ({"restore_faces": True}, "restore_faces", "face restoration"),
        ({"tiling": True}, "tiling", "tiling"),
        ({"styles": ["cinematic"]}, "styles", "styles"),
        ({"script_name": "x/y/z plot"}, "script_name", "scripts"),
        ({"alwayson_scripts": {"controlnet": {"args": []}}}, "alwayson_scripts", "scripts"),
        ({"infotext": "a cat\nSteps: 20"}, "infotext", "infotext"),
        ({"init_images": ["iVBORw0KGgo="]}, "init_images", "img2img"),
        ({"s_churn": 0.5}, "s_churn", "s_churn"),
        ({"s_noise": 0.9}, "s_noise", "s_noise"),
        ({"s_min_uncond": 0.2}, "s_min_uncond", "s_min_uncond"),
        ({"scheduler": "Karras"}, "scheduler", "schedule types"),
        ({"refiner_checkpoint": "refiner"}, "refiner_checkpoint", "refiners"),
        ({"enable_hr": 0}, "enable_hr", "hires fix"),  # false only, not a number
        ({"colour": "red"}, "colour", "unknown fields ['colour']"),
        (
            {"override_settings": {"CLIP_stop_at_last_layers": 2}},
            "override_settings.CLIP_stop_at_last_layers",
            "sd_model_checkpoint",
        ),
        ({"override_settings": "default"}, "override_settings", "an object"),
        ({"sampler_name": "Euler b"}, "sampler_name", f"one of {list(A1111_SAMPLERS)}"),
        ({"sampler_index": "k_euler"}, "sampler_index", "'Euler a'"),
        ({"sampler_name": "Euler", "sampler_index": "k_euler"}, "sampler_index", "'Euler a'"),
        ({"sampler_name": "Euler a", "eta": 0.5}, "eta", "eta must be 1 or null for 'Euler a'"),
        ({"sampler_name": "DDIM", "eta": 2}, "eta", "between 0 and 1"),
        ({"eta": "0"}, "eta", "eta must be a number"),
        ({"batch_size": 0}, "batch_size", ">= 1"),
        ({"n_iter": 2.5}, "n_iter", "n_iter must be an integer"),
        ({"batch_size": 8, "n_iter": 9}, "batch_size", "8 × 9 = 72"),
        ({"steps": 0}, "steps", "num_inference_steps must be"),
        ({"cfg_scale": -1}, "cfg_scale", "guidance_scale must be"),
        ({"width": 60}, "width", "multiple of 16"),
        ({"height": "64"}, "height", "height must be an integer"),
        ({"seed": -2}, "seed", "seed must be"),
        ({"prompt": 3}, "prompt", "prompt must be a string"),
        ({"negative_prompt": ["x"]}, "negative_prompt", "must be a string"),
        ({"send_images": "yes"}, "send_images", "true or false"),
    ],
)
def test_refused_fields_are_400_naming_them(url, fields, param, words):
    response = txt2img(url, {"prompt": PROMPT, **fields})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and words in error["message"], error


def test_an_unknown_model_is_404(url):
    body = {"prompt": PROMPT, "override_settings": {"sd_model_checkpoint": "v1-5.safetensors"}}
    response = txt2img(url, body)
    assert response.status_code == 404
    error = error_of(response)
    assert error["param"] == "override_settings.sd_model_checkpoint"
    assert error["code"] == "model_not_found" and "v1-5.safetensors" in error["message"]
