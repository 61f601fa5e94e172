"""The service's web page (fewstep.serve.page): its headers over httpx, and the page itself in
headless Chromium (Debian's `chromium`, driven by playwright) against live servers on the
bundled default model.

The browser tests generate through the page and compare the images it shows, pixel for
pixel, with the pipeline's own; any console error, uncaught exception or CSP violation in
the page fails them (Chromium logs each 4xx answer as a console error: a test names the
status it provokes, and only those pass). Without Chromium they are skipped.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import re
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from serving import live_server  # noqa: E402

from fewstep.inputs import Limits  # noqa: E402
from fewstep.serve import create_app  # noqa: E402
from fewstep.serve.page import offered_sizes  # noqa: E402

PROMPT = "a red circle on a blue background"
KEY = "sk-page-key"
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no `chromium` on PATH (Debian's chromium package)"
)
# What the page must allow; anything looser (another origin, inline code by default) fails.
EXPECTED_CSP = [
    "default-src 'none'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "frame-ancestors 'none'",
]


@pytest.fixture(scope="module")
def url(pipe) -> Iterator[str]:
    with live_server(create_app({"default": pipe})) as base:
        yield base


@pytest.fixture(scope="module")
def keyed_url(pipe) -> Iterator[str]:
    with live_server(create_app({"default": pipe}, api_key=KEY)) as base:
        yield base


def sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# -- over HTTP --------------------------------------------------------------------------------


def test_page_is_html_with_safe_headers_and_needs_no_key(keyed_url):
    response = httpx.get(f"{keyed_url}/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    csp = [d.strip() for d in response.headers["content-security-policy"].split(";")]
    assert set(EXPECTED_CSP) <= set(csp)
    assert "unsafe" not in response.headers["content-security-policy"]
    html = response.text
    [script] = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    [style] = re.findall(r"<style>(.*?)</style>", html, flags=re.DOTALL)
    assert f"script-src {sha256_source(script)}" in csp
    assert f"style-src {sha256_source(style)}" in csp
    assert len(re.findall(r"<script\b", html)) == 1  # no other script, inline or not
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing from elsewhere
    assert '<meta name="viewport" content="width=device-width' in html
    assert "localStorage" not in html and "sessionStorage" not in html


def test_page_settings_need_the_key_and_offer_the_models_sizes(keyed_url, pipe):
    assert httpx.get(f"{keyed_url}/page/settings").status_code == 401
    response = httpx.get(f"{keyed_url}/page/settings", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    info = pipe.info
    assert response.json() == {
        "models": {
            "default": {
                "size": f"{info.default_width}x{info.default_height}",
                "sizes": offered_sizes(info, pipe.limits),
                "num_inference_steps": info.default_num_inference_steps,
                "guidance_scale": info.default_guidance_scale,
                "max_images": pipe.limits.max_images,
            }
        }
    }


def test_offered_sizes_are_multiples_around_the_default_within_the_limit(pipe):
    assert (pipe.info.default_width, pipe.info.default_height, pipe.info.size_multiple) == (
        64,
        64,
        16,
    )
    assert offered_sizes(pipe.info, Limits()) == ["64x64", "64x96", "96x64", "128x128"]
    sd1 = dataclasses.replace(pipe.info, default_width=512, default_height=512, size_multiple=64)
    assert offered_sizes(sd1, Limits()) == ["512x512", "512x768", "768x512", "1024x1024"]
    sd2 = dataclasses.replace(pipe.info, default_width=768, default_height=768, size_multiple=64)
    assert offered_sizes(sd2, Limits(max_pixels=768 * 1152)) == [
        "768x768",
        "768x1152",
        "1152x768",
    ]
    # The default stays even past the limit: it is what "auto" gives.
    assert offered_sizes(sd1, Limits(max_pixels=64 * 64)) == ["512x512"]


# -- in the browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("no `chromium` on PATH (Debian's chromium package)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


# Records CSP violations in the page (Chromium also logs them, but the event is the rule).
RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) =>
  window.__violations.push(e.violatedDirective + " " + e.blockedURI));
"""


class PageProblems:
    """Console errors, uncaught exceptions and CSP violations of one page."""

    def __init__(self, page: Any):
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def check(self, expected: re.Pattern[str] | None = None) -> None:
        """No problems but the console errors matching `expected`."""
        errors = [e for e in self.errors if expected is None or not expected.fullmatch(e)]
        assert errors == []
        assert self.page.evaluate("window.__violations") == []


@pytest.fixture
def open_page(browser) -> Iterator[Any]:
    contexts = []

    def open_(base: str, **context_options: Any) -> tuple[Any, PageProblems]:
        context = browser.new_context(**context_options)
        context.set_default_timeout(10_000)
        contexts.append(context)
        page = context.new_page()
        page.add_init_script(RECORD_VIOLATIONS)
        problems = PageProblems(page)
        page.goto(f"{base}/")
        return page, problems

    yield open_
    for context in contexts:
        context.close()


IMAGES_LOADED = """(count) => {
  const images = [...document.querySelectorAll("#images img")];
  return images.length === count && images.every((i) => i.complete && i.naturalWidth > 0);
}"""

SHOWN_IMAGES = """() => [...document.querySelectorAll("#images figure")].map((f) => ({
  width: f.querySelector("img").naturalWidth,
  height: f.querySelector("img").naturalHeight,
  src: f.querySelector("img").src,
  href: f.querySelector("a").href,
  download: f.querySelector("a").download,
  caption: f.querySelector("figcaption").textContent,
}))"""


def generate_in_page(page: Any, seed: int | None, n: int = 2, **fields: str) -> list[dict]:
    """Fill the form (ids as in index.html), click Generate, wait for `n` images."""
    page.wait_for_selector("#go:enabled")  # the models are listed
    page.fill("#prompt", PROMPT)
    page.fill("#n", str(n))
    page.fill("#seed", "" if seed is None else str(seed))
    for field, value in fields.items():
        page.fill(f"#{field}", value)
    page.click("#go")
    page.wait_for_function(IMAGES_LOADED, arg=n, timeout=30_000)
    shown: list[dict] = page.evaluate(SHOWN_IMAGES)
    return shown


def pixels_of(data_url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :])))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def as_pil_uint8(images: np.ndarray) -> np.ndarray:
    """The pipeline's float images as its "pil" output rounds them (fewstep.arrays)."""
    return np.round(images * np.float32(255)).astype(np.uint8)


@needs_chromium
def test_page_generates_the_pipelines_images(open_page, url, pipe):
    page, problems = open_page(url)
    seed = 2**60 + 7  # past 2**53: the page must send the seed's digits exactly
    shown = generate_in_page(page, seed, steps="2", guidance="3", negative="green")
    reference = pipe(
        PROMPT,
        negative_prompt="green",
        num_inference_steps=2,
        guidance_scale=3.0,
        num_images_per_prompt=2,
        seed=[seed, seed + 1],
        output_type="np",
    ).images
    assert len(shown) == 2
    for i, image in enumerate(shown):
        assert (image["width"], image["height"]) == (64, 64)
        np.testing.assert_array_equal(pixels_of(image["src"]), as_pil_uint8(reference[i]))
        assert image["href"] == image["src"]
        assert image["download"] == f"fewstep-{seed + i}.png"
        assert image["caption"] == f"seed {seed + i}"
    assert page.input_value("#size") == "64x64"
    assert page.is_hidden("#key-form") and page.is_hidden("#error")
    problems.check()


@needs_chromium
def test_page_shows_the_services_errors(open_page, url):
    page, problems = open_page(url)
    generate_in_page(page, 5, n=1)
    page.fill("#steps", "151")  # past Limits.max_steps: the service refuses it
    page.click("#go")
    page.wait_for_selector("#error:visible")
    assert "num_inference_steps must be an integer" in page.text_content("#error")
    assert "got 151" in page.text_content("#error")
    page.fill("#steps", "")
    page.fill("#seed", "-1")  # refused by the page before any request
    page.click("#go")
    page.wait_for_function("() => document.querySelector('#error').textContent.includes('-1')")
    assert "seed must be a whole number" in page.text_content("#error")
    problems.check(re.compile(r"Failed to load resource: .* status of 400 .*"))


@needs_chromium
def test_page_asks_for_the_key_and_sends_it(open_page, keyed_url, pipe):
    page, problems = open_page(keyed_url)
    page.wait_for_selector("#key-form:visible")
    assert page.get_attribute("#key", "type") == "password"
    assert page.is_disabled("#go")
    assert "API key" in page.text_content("#error")
    page.fill("#key", "wrong")
    page.click("#key-form button")
    page.wait_for_function("() => document.querySelector('#error').textContent !== ''")
    assert "missing or wrong API key" in page.text_content("#error")
    assert page.is_visible("#key-form") and page.is_disabled("#go")
    page.fill("#key", KEY)
    page.click("#key-form button")
    page.wait_for_selector("#key-form", state="hidden")
    shown = generate_in_page(page, 9, n=1)
    reference = pipe(PROMPT, seed=9, output_type="np").images
    np.testing.assert_array_equal(pixels_of(shown[0]["src"]), as_pil_uint8(reference[0]))
    storage = page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]")
    assert storage == [0, 0, ""]
    problems.check(re.compile(r"Failed to load resource: .* status of 401 .*"))


@needs_chromium
def test_page_fits_a_phone_without_sideways_scrolling(open_page, url):
    phone = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
    page, problems = open_page(url, device_scale_factor=3, **phone)
    page.wait_for_selector("#go:enabled")
    scroll_width = "document.scrollingElement.scrollWidth"
    assert page.evaluate(scroll_width) <= 390
    generate_in_page(page, 1, n=4)
    page.fill("#seed", "9" * 60)  # a long word in the error message
    page.click("#go")
    page.wait_for_selector("#error:visible")
    assert page.evaluate(scroll_width) <= 390
    problems.check(re.compile(r"Failed to load resource: .* status of 400 .*"))
