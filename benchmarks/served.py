"""`fewstep serve` in a process of its own, on 127.0.0.1, for benchmarks and tests: its own
interpreter lock (a load client in the same process would slow it) and its own signals
(SIGTERM can be sent to it).

The server is started with `--port 0` and binds a port the OS finds free; the URL it serves is
read from its log ("Uvicorn running on http://...", or with `--ray` "serving N replica(s) on
http://..."). A port picked here and handed over would be free only when picked: another
process (one of Ray's, started by the server itself) could bind it before the server does.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# The line naming the address served: uvicorn's (`fewstep serve`) or serve_on_ray's (`--ray`).
SERVING_ON = re.compile(r"(?:Uvicorn running|serving \d+ replica\(s\)) on (https?://[^\s/]+)")


def status_of(url: str) -> int | None:
    """The status of GET `url`; None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


def served_address(log_text: str) -> str | None:
    """The base URL a `fewstep serve` log names as served (the first such line); None before."""
    found = SERVING_ON.search(log_text)
    return found.group(1) if found else None


@contextlib.contextmanager
def served_process(
    args: list[str], log: Path, ready_timeout_s: float = 120
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`fewstep serve <args>`, its output in `log`; yields (base URL, process) once /ready
    answers 200; kills it at the end if it still runs."""
    command = [sys.executable, "-c", "from fewstep.cli import main; raise SystemExit(main())"]
    with open(log, "w") as out:
        server = subprocess.Popen(
            [*command, "serve", "--port", "0", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ,
        )
        try:
            deadline = time.monotonic() + ready_timeout_s
            base = _wait_for(
                lambda: served_address(log.read_text(errors="replace")), server, log, deadline
            )
            _wait_for(lambda: status_of(f"{base}/ready") == 200 or None, server, log, deadline)
            yield base, server
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(10)


def _wait_for(
    found: Callable[[], T | None], server: subprocess.Popen[bytes], log: Path, deadline: float
) -> T:
    """`found()` once it is not None, polled while the server runs, until `deadline`."""
    while (value := found()) is None:
        if server.poll() is not None:
            raise RuntimeError(f"fewstep serve exited: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewstep serve was not ready in time: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return value
