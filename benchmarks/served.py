"""`fewstep serve` in a process of its own, on a free port of 127.0.0.1, for benchmarks and
tests: its own interpreter lock (a load client in the same process would slow it) and its own
signals (SIGTERM can be sent to it)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def status_of(url: str) -> int | None:
    """The status of GET `url`; None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


@contextlib.contextmanager
def served_process(
    args: list[str], log: Path, ready_timeout_s: float = 120
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`fewstep serve <args>`, its output in `log`; yields (base URL, process) once /ready
    answers 200; kills it at the end if it still runs."""
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
            deadline = time.monotonic() + ready_timeout_s
            while status_of(f"{base}/ready") != 200:
                if server.poll() is not None:
                    raise RuntimeError(f"fewstep serve exited: {log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fewstep serve was not ready in {ready_timeout_s} s")
                time.sleep(0.1)
            yield base, server
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(10)
