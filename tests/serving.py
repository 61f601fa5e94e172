"""What the HTTP service's tests share: a live uvicorn server on 127.0.0.1, a pipeline held at
a gate, and readers of the service's answers."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn
from PIL import Image

from fewstep.pipeline import Pipeline
from fewstep.serve.service import WARM_UP_PROMPT


class GatedPipeline(Pipeline):
    """The default model's pipeline, holding every request's call until `gate` is set."""

    def __init__(self, pipe: Pipeline):
        super().__init__(pipe.info, pipe.tokenizer, pipe.backend, pipe.path, pipe.limits)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[list[str]] = []  # each call's prompts

    def __call__(self, *args, **kwargs):
        if args == (WARM_UP_PROMPT,):  # the service's own warm-up passes
            return super().__call__(*args, **kwargs)
        self.calls.append(list(kwargs["prompt"]))
        self.entered.set()
        assert self.gate.wait(20), "gate never opened"
        return super().__call__(*args, **kwargs)


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """Run `app` on a free port in a thread; yields its base URL once the service is ready
    (warmed up); stops it at the end."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    service = getattr(app.state, "fewstep", None)
    while not server.started or (service is not None and not service.ready):
        assert thread.is_alive() and time.monotonic() < deadline, "server did not get ready"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def error_of(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    image.load()
    return image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def status_of(url: str) -> int | None:
    """The status of GET `url`, None when nothing answers."""
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return None


@contextlib.contextmanager
def served_process(args: list[str], log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`fewstep serve <args>` in its own process (its own interpreter lock, signals of its
    own), its output in `log`; yields (base URL, process) once /ready answers 200."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", "from fewstep.cli import main; raise SystemExit(main())"]
    with open(log, "w") as out:
        server = subprocess.Popen(
            [*command, "serve", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ,
        )
        try:
            deadline = time.monotonic() + 60
            while status_of(f"{base}/ready") != 200:
                assert server.poll() is None, f"the server exited: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "the server did not become ready"
                time.sleep(0.1)
            yield base, server
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(10)
