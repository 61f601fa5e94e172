"""What the HTTP service's tests share: a live uvicorn server on 127.0.0.1 in this process,
a pipeline held at a gate, and readers of the service's answers. (`fewstep serve` in a process
of its own: fewstep.benchmarks.served.)"""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator

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
    # Accepted sockets inherit it: without, each answer waits ~40 ms on a delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
