"""fewstep.cuda_graphs: the one capture that the torch backend, the kernel tuner and the
benchmarks share. The captures themselves need a GPU (`gpu` tests); what a graph is keyed by
and the argument checks run anywhere."""

import pytest

torch = pytest.importorskip("torch")

from fewstep.cuda_graphs import GraphedCall, capture, max_difference, signature  # noqa: E402


def test_a_signature_is_names_shapes_and_dtypes_whatever_the_order():
    a = {"sample": torch.zeros(2, 4, 8, 8), "timestep": torch.tensor(1.0)}
    b = {"timestep": torch.tensor(5.0), "sample": torch.ones(2, 4, 8, 8)}
    assert signature(a) == signature(b)  # values do not matter, order does not either
    assert signature(a) != signature({**a, "sample": torch.zeros(1, 4, 8, 8)})
    assert signature(a) != signature({**a, "sample": torch.zeros(2, 4, 8, 8).half()})


def test_max_difference_is_relative_and_covers_every_output():
    x = torch.tensor([1.0, 3.0])
    assert max_difference(x + 0.4, x) == pytest.approx(0.1)  # 0.4 / (1 + 3)
    outs = {"a": x, "b": x * 0}
    assert max_difference({"a": x, "b": x * 0 + 2}, outs) == pytest.approx(2.0)


def test_capture_counts_are_checked():
    with pytest.raises(ValueError, match="calls must be >= 1"):
        capture(lambda: None, calls=0)
    with pytest.raises(ValueError, match="warmup >= 0"):
        capture(lambda: None, warmup=-1)


@pytest.mark.gpu
def test_a_captured_graph_replays_its_calls():
    x = torch.ones(1024, device="cuda")
    captured = capture(lambda: x.mul_(2), calls=3, warmup=1)  # warm-up: x = 2
    torch.cuda.synchronize()
    assert float(x[0]) == 2.0  # capturing runs nothing
    captured.graph.replay()
    torch.cuda.synchronize()
    assert float(x[0]) == 16.0  # the three captured calls


@pytest.mark.gpu
def test_a_graphed_call_replays_new_inputs_of_its_signature():
    weight = torch.randn(64, 64, device="cuda")

    def fn(x):
        return torch.relu(x @ weight)

    first = torch.randn(8, 64, device="cuda")
    call = GraphedCall(fn, {"x": first}, torch.cuda.graph_pool_handle())
    second = torch.randn(8, 64, device="cuda")
    out = call({"x": second})
    torch.testing.assert_close(out, fn(second))
    again = call({"x": first})  # the earlier output was cloned out, not overwritten
    torch.testing.assert_close(out, fn(second))
    torch.testing.assert_close(again, fn(first))
