"""The GPU suite's correctness checks (benchmarks/gpu_checks.py) as tests.

Every kernel against its fp64 reference by the rule of tests/test_kernels.py (err <= 2 ·
err_torch_same_precision + one rounding step): at full SD1.5/SD2 shapes on a CUDA GPU
(`gpu`-marked, `pytest -m gpu`), and at the suite's scaled-down shapes on the CPU in Triton's
interpreter (TRITON_INTERPRET=1, conftest), so the same code runs in the default suite. The
suite's checks section calls the same functions and records their rows in its JSON.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("triton")

from fewstep.benchmarks import gpu_checks  # noqa: E402

# The interpreter evaluates masked-off lanes too (SiLU's exp may overflow there): numpy
# warns, the lanes are never stored.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

NEEDS_CUDA = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _cases(device: str) -> list:
    """Each check case as a param: the full SD shapes on "cuda", the scaled ones on "cpu"."""
    small = device == "cpu"
    marks = () if small else NEEDS_CUDA
    return [
        pytest.param(op, case, device, id=f"{device}-{op}-{case[0]}", marks=marks)
        for op, case in gpu_checks.check_cases(small)
    ]


@pytest.mark.parametrize(("op", "case", "device"), _cases("cpu") + _cases("cuda"))
def test_kernel_matches_fp64_within_the_rule(op, case, device):
    rows = gpu_checks.run_check(op, case, torch.device(device))
    assert rows and {row["op"] for row in rows} == {op}
    failed = [row for row in rows if not row["ok"]]
    assert not failed, failed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grid_sync_group_norm_replays_in_a_cuda_graph_bit_for_bit(monkeypatch):
    module = gpu_checks.group_norm_module
    # a failed check turns the one-launch form off for the process: restored afterwards
    monkeypatch.setattr(module, "ONE_LAUNCH_MAX_ELEMENTS", module.ONE_LAUNCH_MAX_ELEMENTS)
    result = gpu_checks.check_grid_sync_in_graph(torch.device("cuda"))
    assert result["ok"], result["error"]


def test_a_grid_sync_that_fails_its_check_turns_the_one_launch_form_off(monkeypatch):
    """The path a GPU takes when its driver refuses the cooperative launch: a failed check
    in the JSON, and two launches for the sections after, so they still measure."""
    module = gpu_checks.group_norm_module
    monkeypatch.setattr(module, "ONE_LAUNCH_MAX_ELEMENTS", 2**23)
    monkeypatch.setattr(module, "grid_sync_works", lambda device: False)
    result = gpu_checks.check_grid_sync_in_graph(torch.device("cpu"))
    assert not result["ok"] and "first-use check" in result["error"]
    assert module.ONE_LAUNCH_MAX_ELEMENTS == 0


def test_the_rule_passes_twice_torchs_error_and_fails_more_or_a_non_finite_value():
    ref64 = torch.linspace(-4, 4, 1001, dtype=torch.float64)
    same = (ref64 + 1e-3).float()  # torch's error: 1e-3
    within, beyond = same.clone(), same.clone()
    within[7] = ref64[7] + 1.9e-3
    beyond[7] = ref64[7] + 2.1e-3
    assert gpu_checks.accuracy(same, same, ref64)["ok"]
    assert gpu_checks.accuracy(within, same, ref64)["ok"]
    assert not gpu_checks.accuracy(beyond, same, ref64)["ok"]
    for bad in (float("nan"), float("inf")):
        broken = same.clone()
        broken[7] = bad
        assert not gpu_checks.accuracy(broken, same, ref64)["ok"]
