"""Every flag of `fewstep export`, `lora apply`, `quantize`, `bench`, `demo` and `info` reaches
the function the command calls, with the value given (the `generate` flags: test_cli.py, end
to end).

The called functions are replaced by recorders where the command looks them up (the commands
import them at call time, so the recorder sits on the defining module), so nothing is exported,
built or benchmarked. Each flag is checked against the call the command makes without it: a
flag that is dropped, renamed or forwarded as something else fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import fewstep
from fewstep.cli import main
from fewstep.package import read_model_info


class Recorder:
    """Stands in for a function: keeps each call's (args, kwargs) and returns `returns`, or
    calls through to `real` when one is given."""

    def __init__(self, returns=None, real=None):
        self.calls: list[tuple[tuple, dict]] = []
        self.returns = returns
        self.real = real

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.real(*args, **kwargs) if self.real else self.returns

    @property
    def only_call(self) -> tuple[tuple, dict]:
        assert len(self.calls) == 1, f"expected one call, got {self.calls}"
        return self.calls[0]


@pytest.fixture
def record(monkeypatch):
    """record("module.attr", ...) -> the Recorder that replaces that attribute for the test."""

    def install(target: str, returns=None, call_through: bool = False) -> Recorder:
        module_name, _, name = target.rpartition(".")
        module = pytest.importorskip(module_name)  # export and bench need their extra
        recorder = Recorder(returns, getattr(module, name) if call_through else None)
        monkeypatch.setattr(module, name, recorder)
        return recorder

    return install


def cases(table):
    """pytest params of (flags, ...) rows, each named by its flags ("no flags" for none)."""
    return [pytest.param(*row, id=" ".join(row[0]) or "no flags") for row in table]


# -- export ----------------------------------------------------------------------------------------

EXPORT_DEFAULTS = {"dtype": "fp32", "opset": 18, "config": None, "loras": [], "vae": None}
EXPORT_FLAGS = [
    (["--dtype", "fp16"], {"dtype": "fp16"}),
    (["--opset", "17"], {"opset": 17}),
    (["--config", "configs/sd15"], {"config": "configs/sd15"}),
    (["--vae", "taesd"], {"vae": "taesd"}),
    (["--lora", "a.safetensors:0.5"], {"loras": [("a.safetensors", 0.5)]}),
    (
        ["--lora", "a.safetensors", "--lora", "b.safetensors:-0.25"],
        {"loras": [("a.safetensors", 1.0), ("b.safetensors", -0.25)]},
    ),
]


@pytest.mark.parametrize("flags,given", cases([([], {}), *EXPORT_FLAGS]))
def test_export_flags_reach_export_package(record, capsys, flags, given):
    export = record("fewstep.export.export_package")
    assert main(["export", "model-src", "model-out", *flags]) == 0
    assert export.only_call == (("model-src", "model-out"), {**EXPORT_DEFAULTS, **given})
    assert all(EXPORT_DEFAULTS[k] != v for k, v in given.items())  # the flag changes the call
    assert capsys.readouterr().out == "wrote model package model-out\n"


# -- lora apply ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,loras",
    cases(
        [
            (["--lora", "style.safetensors"], [("style.safetensors", 1.0)]),
            (
                ["--lora", "a.safetensors:0.7", "--lora", "b.safetensors:1.5"],
                [("a.safetensors", 0.7), ("b.safetensors", 1.5)],
            ),
        ]
    ),
)
def test_lora_apply_flags_reach_apply_loras_to_package(record, flags, loras):
    apply = record("fewstep.lora.apply_loras_to_package")
    assert main(["lora", "apply", "pkg", *flags, "--out", "pkg-styled"]) == 0
    assert apply.only_call == (("pkg", loras, "pkg-styled"), {})


def test_lora_apply_needs_a_lora_and_an_out(record, capsys):
    apply = record("fewstep.lora.apply_loras_to_package")
    assert main(["lora", "apply", "pkg", "--out", "pkg-styled"]) == 2
    assert "needs at least one --lora" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: --out is required
        main(["lora", "apply", "pkg", "--lora", "a.safetensors"])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
    assert apply.calls == []


# -- quantize --------------------------------------------------------------------------------------

QUANTIZE_FLAGS = [
    (["--steps", "8"], {"num_inference_steps": 8}),
    (["--prompt", "a cat"], {"prompts": ["a cat"]}),
    (["--prompt", "a cat", "--prompt", "a dog"], {"prompts": ["a cat", "a dog"]}),
    (["--prompts-file", "PROMPTS"], {"prompts": ["a lake", "a tree"]}),
    (
        ["--prompt", "a cat", "--prompts-file", "PROMPTS"],
        {"prompts": ["a cat", "a lake", "a tree"]},
    ),
]


@pytest.mark.parametrize("flags,given", cases([([], {}), *QUANTIZE_FLAGS]))
def test_quantize_flags_reach_quantize_package(record, tmp_path, flags, given):
    """Without flags the function's own defaults apply (the built-in prompts, 4 steps)."""
    quantize = record("fewstep.export.quantize.quantize_package")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a lake\n\n  a tree  \n")
    flags = [str(prompts_file) if f == "PROMPTS" else f for f in flags]
    assert main(["quantize", "pkg", "--out", "pkg-int8", *flags]) == 0
    assert quantize.only_call == (("pkg", "pkg-int8"), given)


def test_quantize_refuses_a_prompts_file_too_big_to_be_prompts(record, capsys, tmp_path):
    quantize = record("fewstep.export.quantize.quantize_package")
    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * ((1 << 20) + 1))
    assert main(["quantize", "pkg", "--out", "o", "--prompts-file", str(big)]) == 2
    assert "--prompts-file" in capsys.readouterr().err and quantize.calls == []


# -- bench -----------------------------------------------------------------------------------------

BENCH_DEFAULTS = {
    "models": ["tiny", "mid"],
    "steps": [1, 4, 25],
    "repeats": 3,
    "workdir": Path("fewstep-bench"),
    "out": None,
    "backends": ["onnxruntime", "openvino-fp32", "openvino-bf16"],
    "note": None,
}
BENCH_FLAGS = [
    (["--models", "tiny"], {"models": ["tiny"]}),
    (["--steps", "2,8"], {"steps": [2, 8]}),
    (["--repeats", "5"], {"repeats": 5}),
    (["--workdir", "bench-work"], {"workdir": Path("bench-work")}),
    (["--output", "results/bench.json"], {"out": Path("results/bench.json")}),
    (
        ["--backends", "onnxruntime-unfused,openvino-fp32"],
        {"backends": ["onnxruntime-unfused", "openvino-fp32"]},
    ),
    (["--note", "another job running"], {"note": "another job running"}),
]


@pytest.mark.parametrize("flags,given", cases([([], {}), *BENCH_FLAGS]))
def test_bench_flags_reach_run_bench(record, flags, given):
    bench = record("fewstep.benchmarks.pipeline_bench.run_bench", returns={})
    assert main(["bench", *flags]) == 0
    assert bench.only_call == ((), {**BENCH_DEFAULTS, **given})
    assert all(BENCH_DEFAULTS[k] != v for k, v in given.items())


# -- demo ------------------------------------------------------------------------------------------

# A few generation flags (they are generate's, whose forwarding test_cli.py checks end to end):
# (flag, the attribute of the parsed arguments demo hands to generate_to_files, its value).
DEMO_GENERATION_FLAGS = [
    (["--seed", "7"], "seed", 7),
    (["--num-inference-steps", "3"], "num_inference_steps", 3),
    (["--scheduler", "euler"], "scheduler", "euler"),
    (["--output", "cat.png"], "output", "cat.png"),
    (["--lora", "a.safetensors:0.5"], "lora", ["a.safetensors:0.5"]),
]


@pytest.fixture
def demo(record):
    """The three steps `fewstep demo` takes, each a recorder."""
    return {
        "make_tiny_model": record("fewstep.export.testing.make_tiny_model"),
        "export_package": record("fewstep.export.export_package"),
        "generate_to_files": record("fewstep.cli.generate_to_files"),
    }


@pytest.mark.parametrize("flags,family,workdir", cases([
    ([], "sd1", Path("fewstep-demo")),
    (["--family", "lcm"], "lcm", Path("fewstep-demo")),
    (["--workdir", "demo-work"], "sd1", Path("demo-work")),
    (["--family", "sd2", "--workdir", "demo-work"], "sd2", Path("demo-work")),
]))  # fmt: skip
def test_demo_family_and_workdir_reach_the_build_export_and_generate(
    demo, tmp_path, monkeypatch, flags, family, workdir
):
    monkeypatch.chdir(tmp_path)  # nothing is written, but the defaults are relative paths
    assert main(["demo", "a cat", *flags]) == 0
    source, package = workdir / f"tiny-{family}", workdir / f"tiny-{family}-onnx"
    assert demo["make_tiny_model"].only_call == ((source,), {"family": family, "seed": 0})
    assert demo["export_package"].only_call == ((source, package), {})
    (model, prompt, _), kwargs = demo["generate_to_files"].only_call
    assert (model, prompt, kwargs) == (package, "a cat", {})


@pytest.mark.parametrize("flag,name,value", cases(DEMO_GENERATION_FLAGS))
def test_demo_generation_flags_reach_generate_to_files(demo, tmp_path, flag, name, value):
    workdir = ["--workdir", str(tmp_path)]
    assert main(["demo", *workdir]) == 0
    (_, _, default_args), _ = demo["generate_to_files"].only_call
    demo["generate_to_files"].calls.clear()
    assert main(["demo", *workdir, *flag]) == 0
    (_, _, args), _ = demo["generate_to_files"].only_call
    assert getattr(args, name) == value != getattr(default_args, name)


# -- info ------------------------------------------------------------------------------------------


def test_info_reads_and_prints_the_package_given(record, capsys, tmp_path):
    package = str(tmp_path / "copy")  # not the default model: the path given must be read
    shutil.copytree(fewstep.default_model(), package)
    verify = record("fewstep.package.verify_package", call_through=True)
    read = record("fewstep.package.read_model_info", call_through=True)
    assert main(["info", package]) == 0
    assert verify.only_call == ((package,), {}) and read.only_call == ((package,), {})
    printed = json.loads(capsys.readouterr().out)
    info = read_model_info(package)
    assert printed["family"] == info.family
    assert printed["prediction_type"] == info.prediction_type
    assert printed["default_size"] == f"{info.default_width}x{info.default_height}"
    assert printed["default_num_inference_steps"] == info.default_num_inference_steps
    assert printed["precision"] == verify.real(package)["precision"]
