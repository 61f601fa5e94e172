"""The repository's kernels/ folder imported as a top-level `kernels` (the checkout root on
sys.path, as `python -m …` from it puts it) hands over the Hugging Face `kernels` package
when one is installed (transformers probes for it and imports names from it), else
fewstep.kernels itself."""

from __future__ import annotations

import importlib.metadata
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_top_level_kernels_is_the_installed_package_or_fewsteps():
    probe = "import sys; sys.path.insert(0, sys.argv[1]); import kernels; print(kernels.__name__)"
    out = subprocess.run(
        [sys.executable, "-c", probe, str(ROOT)], capture_output=True, text=True, check=True
    )
    try:
        importlib.metadata.version("kernels")
        expected = "kernels"  # the Hugging Face package, from site-packages
    except importlib.metadata.PackageNotFoundError:
        expected = "fewstep.kernels"
    assert out.stdout.strip() == expected
