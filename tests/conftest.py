import os

# Triton kernels run in the interpreter on CPU-only machines; this must be set
# before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Fuzz tests draw the same cases on every run (a CI failure reproduces), keep no example
# database in the tree, and time whole pipeline calls, so no per-example deadline.
settings.register_profile(
    "fewstep",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile("fewstep")


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


class GraphRan(AssertionError):
    """A graph ran: every input check had passed."""


class NoGraphBackend:
    """Stands in for a backend to prove that bad input fails before any graph runs."""

    name = "none"

    def run(self, graph, **inputs):
        raise GraphRan(f"graph {graph} ran")

    def has_graph(self, graph):
        return True


@pytest.fixture
def guarded():
    """pipeline -> the same model on a backend that fails any graph it is asked to run (with
    GraphRan), so a test can tell a refused input (ValueError) from one that passed."""
    from fewstep.pipeline import Pipeline

    def make(pipe, **kwargs):
        return Pipeline(pipe.info, pipe.tokenizer, NoGraphBackend(), pipe.path, **kwargs)

    make.GraphRan = GraphRan
    return make
