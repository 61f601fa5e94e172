"""The HTTP service against its own OpenAPI document (`GET /openapi.json`, fewstep.serve.openapi).

schemathesis reads the document from a live server on 127.0.0.1 (with an API key, so the
bearer scheme is exercised too) and sends what it derives from it: the coverage phase's
boundary values, missing fields and undeclared methods, then fuzzed bodies, valid and not.
Every answer must be documented (status, content type, headers, body schema), no answer may
be a 5xx, bodies outside the schema must be refused and the key must be enforced. The served
model has small limits so that the images it makes stay tiny and larger asks are 400s.

Not checked: that every body valid under the schema is accepted (a schema cannot say
height × width ≤ the pixel limit, nor that "WxH" sizes are multiples of the model's). The
image endpoints (A1111's img2img, OpenAI's edits) never answer 200 here: a generated image is
no image file; each answer must still be documented and no 5xx; fewer of them are sent
(IMAGE_EXAMPLES) to keep the run short.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
schemathesis = pytest.importorskip("schemathesis")

from schemathesis.engine import events  # noqa: E402
from serving import error_of, live_server  # noqa: E402

from fewstep import Limits  # noqa: E402
from fewstep.package import default_model  # noqa: E402
from fewstep.pipeline import Pipeline  # noqa: E402
from fewstep.serve import a1111_api, create_app, openai_api  # noqa: E402
from fewstep.serve.openapi import document  # noqa: E402

KEY = "sk-schema-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = Limits(max_pixels=64 * 64, max_steps=4, max_images=2)
MIN_REQUESTS = 1000
IMAGE_ENDPOINTS = ("POST /sdapi/v1/img2img", "POST /v1/images/edits")
IMAGE_EXAMPLES = 40
CHECKS = (  # each must have run on the answers
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "ignored_auth",
    "unsupported_method",
)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, object]]:
    pipe = Pipeline.from_pretrained(default_model(), limits=LIMITS)
    app = create_app({"default": pipe}, api_key=KEY, max_wait_ms=0)
    with live_server(app) as base:
        yield base, app


def run_schemathesis(base: str) -> tuple[list, collections.Counter, collections.Counter, list]:
    """schemathesis' engine on the served document: (interactions as (operation, status),
    checks run by name, statuses by operation, failures)."""
    config = schemathesis.Config.from_dict(
        {
            "headers": AUTH,
            "seed": 0,
            "workers": 1,
            "generation": {"max-examples": 150, "deterministic": True, "mode": "all"},
            "phases": {"stateful": {"enabled": False}},
            # positive_data_acceptance: see the module docstring
            "checks": {"positive_data_acceptance": {"enabled": False}},
            "operations": [
                {
                    "include-name": name,
                    "generation": {"max-examples": IMAGE_EXAMPLES},
                }
                for name in IMAGE_ENDPOINTS
            ],
        }
    )
    # Read here rather than with from_url, which leaves out the operation serving the document.
    served_document = httpx.get(f"{base}/openapi.json", headers=AUTH).json()
    schema = schemathesis.openapi.from_dict(served_document, config=config)
    schema.config.update(base_url=base)
    interactions, checks_run, failures = [], collections.Counter(), []
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(("error", repr(event)))
        if not isinstance(event, events.ScenarioFinished):
            continue
        recorder = event.recorder
        for interaction in recorder.interactions.values():
            status = interaction.response.status_code if interaction.response else None
            interactions.append((recorder.label, status))
        for checks in recorder.checks.values():
            for check in checks:
                checks_run[check.name] += 1
                if check.failure_info is not None:
                    failures.append((check.name, check.failure_info.failure))
    statuses = collections.Counter(interactions)
    return interactions, checks_run, statuses, failures


def test_schemathesis_finds_the_service_as_documented(served, caplog):
    base, _ = served
    # fuzzed prompts past CLIP's 77 tokens: a warning each, not what this test reads
    caplog.set_level(logging.ERROR, logger="fewstep.tokenizer")
    started = time.monotonic()
    interactions, checks_run, statuses, failures = run_schemathesis(base)
    elapsed = time.monotonic() - started
    assert not failures, failures[:5]
    assert len(interactions) >= MIN_REQUESTS, (len(interactions), elapsed)
    assert all(checks_run[name] > 0 for name in CHECKS), checks_run
    assert not [s for s in statuses if s[1] is None or s[1] >= 500], statuses
    doc = httpx.get(f"{base}/openapi.json", headers=AUTH).json()
    documented = {
        f"{method.upper()} {path}" for path, item in doc["paths"].items() for method in item
    }
    answered = {label for label, status in statuses if status == 200}
    assert answered == documented - set(IMAGE_ENDPOINTS), statuses
    assert statuses[("POST /sdapi/v1/txt2img", 400)] > 0
    assert statuses[("POST /v1/images/generations", 400)] > 0
    assert all(statuses[(label, 400)] > 0 for label in IMAGE_ENDPOINTS), statuses


def test_the_document_describes_every_route_and_method(served):
    base, app = served
    doc = httpx.get(f"{base}/openapi.json", headers=AUTH).json()
    routes = {route.path: {m.lower() for m in route.methods if m != "HEAD"} for route in app.routes}
    assert {path: set(item) for path, item in doc["paths"].items()} == routes
    assert doc["openapi"].startswith("3.1")
    assert httpx.get(f"{base}/openapi.json").status_code == 401  # keyed like the others


def test_the_document_follows_the_served_limits_and_key(served, pipe_without_key):
    _, app = served
    doc = document(app.state.fewstep)
    txt2img = doc["paths"]["/sdapi/v1/txt2img"]["post"]
    body = txt2img["requestBody"]["content"]["application/json"]["schema"]["properties"]
    width = body["width"]["anyOf"][0]
    assert (width["multipleOf"], width["minimum"], width["maximum"]) == (16, 16, 64 * 64 // 16)
    assert body["steps"]["anyOf"][0]["maximum"] == 4
    assert body["batch_size"]["anyOf"][0]["maximum"] == 2
    assert doc["security"] == [{"bearer": []}] and "401" in txt2img["responses"]
    headers = txt2img["responses"]["429"]["headers"]
    assert headers["Retry-After"]["required"] is True
    assert doc["paths"]["/health"]["get"]["security"] == []
    open_doc = document(create_app({"default": pipe_without_key}).state.fewstep)
    assert "security" not in open_doc
    assert all(
        "401" not in op["responses"] for item in open_doc["paths"].values() for op in item.values()
    )


@pytest.fixture(scope="module")
def pipe_without_key() -> Pipeline:
    return Pipeline.from_pretrained(default_model())


def test_the_documented_bodies_hold_every_field_the_apis_know(served):
    _, app = served
    paths = document(app.state.fewstep)["paths"]
    edit_fields = openai_api.EDIT_KNOWN_FIELDS - {"image[]", "mask", "stream"}
    for path, fields, media_type in [
        ("/v1/images/generations", openai_api.KNOWN_FIELDS, "application/json"),
        ("/sdapi/v1/txt2img", a1111_api.KNOWN_FIELDS, "application/json"),
        ("/sdapi/v1/img2img", a1111_api.IMG2IMG_KNOWN_FIELDS, "application/json"),
        ("/v1/images/edits", edit_fields, "multipart/form-data"),
    ]:
        schema = paths[path]["post"]["requestBody"]["content"][media_type]["schema"]
        assert set(schema["properties"]) == fields
        assert schema["additionalProperties"] is False  # unknown fields are refused


# -- what fuzzing the document found ---------------------------------------------------------


def test_a_wrong_method_is_405_with_allow(served):
    base, _ = served
    response = httpx.delete(f"{base}/v1/models", headers=AUTH)
    assert response.status_code == 405
    assert "GET" in response.headers["Allow"]
    assert error_of(response)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/images/generations", {"prompt": "x", "n": 10**7}, "n"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 10**7}, "batch_size"),
    ],
)
def test_a_huge_image_count_is_refused_at_once(served, path, body, param):
    base, _ = served
    started = time.monotonic()
    response = httpx.post(f"{base}{path}", json=body, headers=AUTH, timeout=5)
    assert time.monotonic() - started < 1
    assert response.status_code == 400 and error_of(response)["param"] == param
