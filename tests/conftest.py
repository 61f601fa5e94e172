import os

# Triton kernels run in the interpreter on CPU-only machines; this must be set
# before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """family -> path of a tiny random-weight diffusers folder (built once per session)."""
    from fewstep.testing import make_tiny_model

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_tiny_model(tmp_path_factory.mktemp(family) / "model", family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, tiny_model):
    """family -> path of the tiny model exported to a fewstep package (fp32)."""
    from fewstep.export import export_package

    cache = {}

    def get(family: str):
        if family not in cache:
            out = tmp_path_factory.mktemp(f"{family}-pkg") / "package"
            cache[family] = export_package(tiny_model(family), out, progress=False)
        return cache[family]

    return get
