"""Stage display for the export and quantize commands: one line when a stage starts, one
with its seconds when done.

Plain lines on stderr rather than a tqdm bar: the stages are few and long (a real U-Net
exports for minutes) and torch prints its own warnings in between, which would tear a bar.
Disabled, the same lines go to the module logger at INFO; the timings are kept either way
(they go into the manifest).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

logger = logging.getLogger("fewstep.export")


class StageLog:
    def __init__(self, stages: list[str], enabled: bool = True, tool: str = "export"):
        self.stages = list(stages)
        self.tool = tool  # the command whose stages these are: `fewstep <tool>`
        self.enabled = enabled
        self.seconds: dict[str, float] = {}

    def note(self, line: str) -> None:
        if self.enabled:
            print(f"fewstep {self.tool}: {line}", file=sys.stderr, flush=True)
        else:
            logger.info(line)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        assert name in self.stages, f"undeclared stage {name!r}"
        tag = f"[{self.stages.index(name) + 1}/{len(self.stages)}] {name}"
        self.note(f"{tag} ...")
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.note(f"{tag} done in {self.seconds[name]:.1f} s")
