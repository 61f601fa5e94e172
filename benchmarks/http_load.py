"""A lean HTTP/1.1 load client on asyncio streams, for fewstep's service on loopback.

Connections are opened and kept alive before anything is timed, each carries one request at a
time, and the time of a request runs from writing it to reading its last byte. Lean on
purpose: on a 2-core box a full client (httpx) spends about 3 ms of CPU per request, which a
load test would otherwise count as the server's time.

Limits: plain HTTP on a host and port; JSON bodies; answers must carry Content-Length (the
service's always do); no redirects, no TLS, no chunked bodies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes
    seconds: float  # from writing the request to reading its last byte

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One keep-alive connection to `base_url` ("http://host:port")."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, base_url: str) -> Connection:
        url = urlsplit(base_url)
        if url.scheme != "http" or url.hostname is None or url.port is None:
            raise ValueError(f"base_url must be http://HOST:PORT, got {base_url!r}")
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        return cls(reader, writer, f"{url.hostname}:{url.port}")

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Answer:
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        started = time.perf_counter()
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        answer_headers = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                answer_headers[name.strip().lower()] = value.strip()
        if "content-length" not in answer_headers:
            raise ValueError(f"an answer without Content-Length to {method} {path}")
        content = await self.reader.readexactly(int(answer_headers["content-length"]))
        seconds = time.perf_counter() - started
        return Answer(int(status_line.split()[1]), answer_headers, content, seconds)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def post_each_at_once(
    base_url: str, path: str, bodies: Sequence[Any], headers: dict[str, str] | None = None
) -> list[Answer]:
    """Every body POSTed at the same moment, each on its own connection opened beforehand."""
    connections = [await Connection.open(base_url) for _ in bodies]
    try:
        return list(
            await asyncio.gather(
                *(
                    c.request("POST", path, b, headers)
                    for c, b in zip(connections, bodies, strict=True)
                )
            )
        )
    finally:
        for connection in connections:
            await connection.close()


async def post_closed_loop(
    base_url: str,
    path: str,
    bodies: Sequence[Any],
    concurrency: int,
    time_limit_s: float,
    headers: dict[str, str] | None = None,
) -> list[Answer]:
    """`concurrency` clients, each POSTing its next body as soon as its last is answered,
    until the bodies run out or `time_limit_s` has passed (no new request starts after)."""
    queue = list(reversed(bodies))
    answers: list[Answer] = []
    deadline = time.perf_counter() + time_limit_s

    async def client(connection: Connection) -> None:
        while queue and time.perf_counter() < deadline:
            answers.append(await connection.request("POST", path, queue.pop(), headers))

    connections = [await Connection.open(base_url) for _ in range(concurrency)]
    try:
        await asyncio.gather(*(client(c) for c in connections))
    finally:
        for connection in connections:
            await connection.close()
    return answers
