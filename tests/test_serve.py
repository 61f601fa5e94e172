"""The HTTP service (fewstep.serve) against live uvicorn servers on 127.0.0.1.

The images come through the real `openai` client and must equal the pipeline's own; the
error cases are checked with httpx, since the openai client turns them into its own
exceptions. Three servers share the bundled default model: an open one, one with an API key,
and one whose pipeline is held at a gate with a queue of one, to fill the queue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")


from serving import GatedPipeline, decode_png, error_of, live_server  # noqa: E402
from starlette.middleware.cors import CORSMiddleware  # noqa: E402

from fewstep.image_files import a1111_parameters  # noqa: E402
from fewstep.inputs import Limits  # noqa: E402
from fewstep.package import default_model, read_manifest  # noqa: E402
from fewstep.serve import MAX_BODY_BYTES, create_app  # noqa: E402
from training import scenes  # noqa: E402

PROMPT = "a red circle on a blue background"
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def url(pipe) -> Iterator[str]:
    with live_server(create_app({"default": pipe})) as base:
        yield base


@pytest.fixture(scope="module")
def keyed_url(pipe) -> Iterator[str]:
    with live_server(create_app({"default": pipe}, api_key=KEY)) as base:
        yield base


def post(base: str, body=None, content=None, headers=None) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/images/generations", json=body, content=content, headers=headers, timeout=30
    )


# -- images -----------------------------------------------------------------------------------


def test_openai_client_gets_the_pipelines_images_with_a1111_parameters(url, pipe):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(
        model="default",
        prompt=PROMPT,
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 3},
    )
    images = [decode_png(d.b64_json) for d in result.data]
    reference = pipe(PROMPT, seed=[3, 4], num_images_per_prompt=2)
    assert len(images) == 2
    unet_hash = (read_manifest(pipe.path) or {}).get("files", {}).get("unet/model.onnx")
    for i, (image, expected) in enumerate(zip(images, reference.images, strict=True)):
        assert image.size == (64, 64)
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
        settings = {**reference.settings, "seed": 3 + i}
        assert image.text["parameters"] == a1111_parameters(
            PROMPT, "", settings, "default", unet_hash
        )
        # the colours asked for are there, as the default model's own analyzer reads them
        seen = scenes.analyze(image)
        assert seen["background"] == "blue"
        assert "red" in [o["color"] for o in seen["objects"]]
    assert isinstance(result.created, int)


def test_fewstep_fields_reach_the_pipeline_and_ignored_openai_fields_pass(url, pipe):
    body = {
        "prompt": PROMPT,
        "seed": 11,
        "num_inference_steps": 2,
        "guidance_scale": 3.0,
        "negative_prompt": "green",
        "scheduler": "euler",
        "quality": "hd",
        "style": "vivid",
        "user": "someone",
    }
    response = post(url, body)
    assert response.status_code == 200, response.text
    [item] = response.json()["data"]
    reference = pipe(
        PROMPT,
        seed=11,
        num_inference_steps=2,
        guidance_scale=3.0,
        negative_prompt="green",
        scheduler="euler",
    )
    image = decode_png(item["b64_json"])
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(reference.images[0]))
    assert "Steps: 2, Sampler: Euler, CFG scale: 3, Seed: 11" in image.text["parameters"]
    assert "Negative prompt: green" in image.text["parameters"]


# -- the other endpoints ----------------------------------------------------------------------


def test_health_ready_and_models(url):
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").status_code == 200
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list"
    [entry] = models["data"]
    assert entry["id"] == "default" and entry["object"] == "model"
    assert entry["owned_by"] == "fewstep" and isinstance(entry["created"], int)


def test_ready_is_503_until_started(pipe):
    from starlette.testclient import TestClient

    app = create_app({"default": pipe})
    client = TestClient(app)  # without `with`, the lifespan has not run: no batchers yet
    assert client.get("/ready").status_code == 503
    assert client.get("/health").status_code == 200
    with client:  # the warm-up runs beside the server: /ready turns 200 when it is done
        deadline = time.monotonic() + 30
        while client.get("/ready").status_code == 503:
            assert client.get("/health").status_code == 200
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.01)
        assert client.get("/ready").status_code == 200
    assert app.state.fewstep.ready is False  # closed at shutdown


def test_key_is_required_everywhere_but_health(keyed_url):
    good = {"Authorization": f"Bearer {KEY}"}
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in [("GET", "/ready"), ("GET", "/v1/models")]:
            response = httpx.request(method, f"{keyed_url}{path}", headers=headers)
            assert response.status_code == 401, (path, headers)
            assert error_of(response)["code"] == "invalid_api_key"
        assert post(keyed_url, {"prompt": PROMPT}, headers=headers).status_code == 401
    assert httpx.get(f"{keyed_url}/health").status_code == 200
    assert httpx.get(f"{keyed_url}/v1/models", headers=good).status_code == 200
    client = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=KEY, max_retries=0)
    assert len(client.images.generate(prompt=PROMPT, extra_body={"seed": 1}).data) == 1


# -- errors -----------------------------------------------------------------------------------


def test_unknown_model_is_404(url):
    response = post(url, {"prompt": PROMPT, "model": "dall-e-3"})
    assert response.status_code == 404
    error = error_of(response)
    assert error["param"] == "model" and "dall-e-3" in error["message"]


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": PROMPT, "size": "64by64"}, "size", "WIDTHxHEIGHT"),
        ({"prompt": PROMPT, "size": "60x64"}, "size", "width must be a multiple"),
        ({"prompt": PROMPT, "n": 0}, "n", "n must be an integer >= 1"),
        ({"prompt": PROMPT, "colour": "red"}, "colour", "unknown fields ['colour']"),
        ({"prompt": PROMPT, "response_format": "url"}, "response_format", "b64_json"),
        ({"prompt": 3}, "prompt", "prompt must be a string"),
        ({"n": 1}, "prompt", "prompt is required"),
        ({"prompt": PROMPT, "scheduler": "nope"}, "scheduler", "scheduler must be one of"),
    ],
)
def test_bad_values_are_400_naming_the_field(url, body, param, words):
    response = post(url, body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and words in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_malformed_body_is_400(url, content):
    response = post(url, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in error_of(response)["message"]


def test_oversized_body_is_413(url):
    big = {"prompt": "x" * (MAX_BODY_BYTES + 1)}
    assert post(url, big).status_code == 413

    def chunks():  # no Content-Length: the cap holds while reading
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b" " * 1024

    response = httpx.post(f"{url}/v1/images/generations", content=chunks(), timeout=30)
    assert response.status_code == 413
    assert "at most" in error_of(response)["message"]


def test_full_queue_is_429_at_once(pipe):
    gated = GatedPipeline(pipe)
    app = create_app({"default": gated}, max_batch=1, max_queue=1)
    with live_server(app) as base:
        results: dict[str, httpx.Response] = {}

        def send(name: str) -> None:
            results[name] = post(base, {"prompt": PROMPT, "seed": 5})

        running = threading.Thread(target=send, args=("running",))
        running.start()
        assert gated.entered.wait(10)  # the worker holds the first request
        queued = threading.Thread(target=send, args=("queued",))
        queued.start()
        batcher = app.state.fewstep.batchers["default"]
        deadline = time.monotonic() + 10
        while batcher.queued() < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with httpx.Client() as client:
            client.get(f"{base}/health")  # connect first: time only the answer
            t0 = time.perf_counter()
            response = client.post(f"{base}/v1/images/generations", json={"prompt": PROMPT})
            elapsed = time.perf_counter() - t0
        gated.gate.set()
        running.join(20)
        queued.join(20)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"
    assert error_of(response)["type"] == "rate_limit_error"
    assert elapsed < 0.05, elapsed
    assert results["running"].status_code == 200 and results["queued"].status_code == 200
    assert results["running"].json()["data"] == results["queued"].json()["data"]  # same seed


# -- the command ------------------------------------------------------------------------------


def test_cli_serve_builds_the_app_from_its_flags(monkeypatch):
    import fewstep.serve
    from fewstep.cli import main

    served = {}
    monkeypatch.setattr(
        fewstep.serve, "run", lambda app, host, port, drain_timeout: served.update(locals())
    )
    monkeypatch.setenv("FEWSTEP_API_KEY", "from-env")
    argv = ["serve", "--model", f"scenes={default_model()}", "--port", "8123", "--max-queue", "3"]
    argv += ["--request-timeout", "9", "--drain-timeout", "7", "--max-images", "5"]
    argv += ["--max-pixels", "4096", "--max-steps", "12", "--max-prompt-chars", "100"]
    argv += ["--cors-origin", "https://app.example.com"]
    assert main(argv) == 0
    cors = [m for m in served["app"].user_middleware if m.cls is CORSMiddleware]
    assert [m.kwargs["allow_origins"] for m in cors] == [["https://app.example.com"]]
    service = served["app"].state.fewstep
    assert list(service.models) == ["scenes"] and service.api_key == "from-env"
    assert service.batcher_options == {"max_batch": 8, "max_wait_ms": 2.0, "max_queue": 3}
    assert service.request_timeout == 9.0 and served["drain_timeout"] == 7.0
    assert service.models["scenes"].limits == Limits(4096, 5, 12, 100)
    assert (served["host"], served["port"]) == ("127.0.0.1", 8123)
    assert main(["serve", "--api-key", "flag"]) == 0  # the flag wins; the default model
    assert list(served["app"].state.fewstep.models) == ["default"]
    assert served["app"].state.fewstep.api_key == "flag"


@pytest.mark.parametrize("spec", ["scenes", "=path", "scenes="])
def test_cli_serve_refuses_a_bad_model_flag(spec, capsys):
    from fewstep.cli import main

    assert main(["serve", "--model", spec]) == 2
    assert f"--model must be NAME=PATH, got {spec!r}" in capsys.readouterr().err


def test_cli_serve_without_the_extra_names_it(monkeypatch, capsys):
    import sys

    from fewstep.cli import main

    monkeypatch.setitem(sys.modules, "fewstep.serve", None)  # import fails as if not installed
    assert main(["serve"]) == 2
    assert "pip install 'fewstep[serve]'" in capsys.readouterr().err


# -- CORS ---------------------------------------------------------------------------------------


def test_no_cors_headers_unless_origins_are_named(url, pipe):
    origin = {"Origin": "https://app.example.com"}
    plain = httpx.get(f"{url}/v1/models", headers=origin, timeout=10)
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
    app = create_app({"default": pipe}, cors_origins=["https://app.example.com"])
    with live_server(app) as base:
        allowed = httpx.get(f"{base}/v1/models", headers=origin, timeout=10)
        preflight = httpx.options(
            f"{base}/v1/images/generations",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
            timeout=10,
        )
        other = httpx.get(f"{base}/v1/models", headers={"Origin": "https://evil.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert preflight.status_code == 200
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("origins", [["*"], ["app.example.com"], "https://a.example", [3]])
def test_cors_origins_must_be_origins(pipe, origins):
    with pytest.raises(ValueError, match="cors_origins"):
        create_app({"default": pipe}, cors_origins=origins)
