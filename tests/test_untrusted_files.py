"""Model packages and LoRA files from elsewhere: what a hostile one can make fewstep do.

- paths read from a package (fewstep.json `files` entries, ONNX external data locations) stay
  inside it, symlinks followed: nothing outside is read, hashed or overwritten;
- PEFT `alpha_pattern` keys (regular expressions from the file) match in bounded time, as
  PEFT's own `get_pattern_key` decides;
- pickle files are never unpickled;
- a fold that makes a weight inf or NaN in its dtype, and LoRA weights that are not floats,
  are refused before anything is written or changed.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.numpy import save_file  # noqa: E402

from fewstep.cli import main as cli_main  # noqa: E402
from fewstep.lora import (  # noqa: E402
    apply_loras_to_package,
    fold_lora_torch,
    load_loras,
    lora_initializers,
    read_lora,
)
from fewstep.lora.onnx_package import GraphWeights  # noqa: E402
from fewstep.lora.peft_patterns import PatternKeyMatcher  # noqa: E402
from fewstep.onnx_proto import read_onnx_index  # noqa: E402
from fewstep.package import PackageError, verify_package, write_manifest  # noqa: E402
from fewstep.pipeline import Pipeline  # noqa: E402

TARGET = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
KOHYA_TARGET = "lora_unet_" + TARGET.removesuffix(".weight").replace(".", "_")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def copy_package(tiny_package, tmp_path: Path) -> Path:
    package = tmp_path / "a" / "pkg"
    shutil.copytree(tiny_package("sd1"), package)
    return package


def rehash(package: Path) -> None:
    """Rewrite the manifest's hashes, as whoever ships a doctored package would."""
    manifest = json.loads((package / "fewstep.json").read_text())
    write_manifest(package, {k: v for k, v in manifest.items() if k not in ("files",)})


def write_kohya(path: Path, modules: dict) -> Path:
    """{kohya module name: (down, up, alpha or None)} → a LoRA safetensors file."""
    tensors = {}
    for name, (down, up, alpha) in modules.items():
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.asarray(alpha)
    save_file(tensors, str(path))
    return path


def target_lora(package: Path, path: Path, value: float = 0.1, rank: int = 4, alpha=None) -> Path:
    """A LoRA on TARGET whose delta is value² · rank everywhere (alpha = rank: factor 1)."""
    out_features, in_features = GraphWeights(package / "unet", "unet").shapes()[TARGET]
    down = np.full((rank, in_features), value, np.float32)
    up = np.full((out_features, rank), value, np.float32)
    return write_kohya(path, {KOHYA_TARGET: (down, up, alpha)})


def target_initializer(package: Path) -> str:
    weights = json.loads((package / "unet" / "lora_map.json").read_text())["weights"]
    return weights[TARGET]["initializer"]


def move_to_external(
    package: Path, initializer: str, location: str, data_file: Path, offset: str = "0"
) -> None:
    """Store `initializer` of the U-Net graph as external data at `location`, its bytes
    written to `data_file`."""
    import onnx

    path = package / "unet" / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == initializer)
    raw = tensor.raw_data
    assert raw, "the test expects the initializer's bytes in raw_data"
    data_file.write_bytes(raw)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())


INSIDE_ONLY = "must be a relative path inside"


# ---------------------------------------------------------------------------------------------
# 1. paths stay inside the package
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["absolute", "parent", "symlink"])
def test_external_data_outside_the_graph_folder_is_refused(tiny_package, tmp_path, kind):
    package = copy_package(tiny_package, tmp_path)
    lora = target_lora(package, tmp_path / "l.safetensors")
    initializer = target_initializer(package)
    outside = tmp_path / "outside.bin"  # tmp/a/pkg/unet/../../../outside.bin
    location = {"absolute": str(outside), "parent": "../../../outside.bin"}.get(kind, "w.bin")
    move_to_external(package, initializer, location, outside)
    rehash(package)  # a consistent manifest: only the location gives it away
    if kind == "symlink":
        (package / "unet" / "w.bin").symlink_to(outside)
    before = outside.read_bytes()

    with pytest.raises(PackageError, match=INSIDE_ONLY) as graph_error:
        read_onnx_index(package / "unet" / "model.onnx")
    message = str(graph_error.value)
    assert "model.onnx" in message and repr(initializer) in message and location in message
    with pytest.raises(PackageError, match=INSIDE_ONLY):
        lora_initializers(package, [(lora, 1.0)])  # what the onnxruntime backend folds with
    with pytest.raises(PackageError, match=INSIDE_ONLY):
        Pipeline.from_pretrained(package, loras=[(lora, 1.0)])
    for check_hashes in (True, False):
        out = tmp_path / "a" / "new"
        with pytest.raises(PackageError, match=INSIDE_ONLY):
            apply_loras_to_package(package, [(lora, 1.0)], out, check_hashes=check_hashes)
        assert not out.exists()
    assert outside.read_bytes() == before


def test_external_data_inside_the_graph_folder_still_folds(tiny_package, tmp_path):
    """The same rewrite with the data file in the graph's folder: folded as before."""
    package = copy_package(tiny_package, tmp_path)
    lora = target_lora(package, tmp_path / "l.safetensors")
    initializer = target_initializer(package)
    expected = lora_initializers(package, [(lora, 1.0)])["unet"][initializer]
    move_to_external(package, initializer, "w.bin", package / "unet" / "w.bin")
    rehash(package)
    out = apply_loras_to_package(package, [(lora, 1.0)], tmp_path / "new")
    folded = read_onnx_index(out / "unet" / "model.onnx").initializers[initializer]
    assert folded.path == out / "unet" / "w.bin"
    assert np.array_equal(folded.read(), expected)


@pytest.mark.parametrize("offset", ["-4", "1e3", "x"])
def test_external_data_offset_must_be_a_count(tiny_package, tmp_path, offset):
    package = copy_package(tiny_package, tmp_path)
    initializer = target_initializer(package)
    move_to_external(package, initializer, "w.bin", package / "unet" / "w.bin", offset)
    match = rf"{re.escape(repr(initializer))} external data offset must be an integer >= 0"
    with pytest.raises(PackageError, match=match):
        read_onnx_index(package / "unet" / "model.onnx")


@pytest.fixture
def outside_file(tmp_path) -> Path:
    path = tmp_path / "a" / "outside.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not part of any package")
    return path


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_manifest_entries_outside_the_package_are_refused(
    tiny_package, tmp_path, outside_file, kind
):
    package = copy_package(tiny_package, tmp_path)
    entry = {"parent": "../outside.txt", "absolute": str(outside_file)}.get(kind, "unet/x.txt")
    if kind == "symlink":
        (package / entry).symlink_to(outside_file)
    manifest_path = package / "fewstep.json"
    manifest = json.loads(manifest_path.read_text())
    # the right hash: before, verify_package opened and hashed the outside file and passed
    manifest["files"][entry] = hashlib.sha256(outside_file.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))

    for check_hashes in (True, False):
        with pytest.raises(PackageError, match=INSIDE_ONLY) as error:
            verify_package(package, check_hashes=check_hashes)
        assert repr(entry) in str(error.value)
    with pytest.raises(PackageError, match=INSIDE_ONLY):
        Pipeline.from_pretrained(package)
    out = tmp_path / "new"
    with pytest.raises(PackageError, match=INSIDE_ONLY):
        apply_loras_to_package(
            package, [(target_lora(package, tmp_path / "l.safetensors"), 1)], out
        )
    assert not out.exists()


def test_symlink_out_of_the_package_is_refused_even_unlisted(tiny_package, tmp_path, outside_file):
    """`lora apply` copies every file: a link out would bring the outside file along."""
    package = copy_package(tiny_package, tmp_path)
    (package / "tokenizer" / "extra.txt").symlink_to(outside_file)
    out = tmp_path / "new"
    lora = target_lora(package, tmp_path / "l.safetensors")
    with pytest.raises(PackageError, match=r"'tokenizer/extra\.txt' resolves to .*outside"):
        apply_loras_to_package(package, [(lora, 1.0)], out)
    assert not out.exists()


def test_symlink_inside_the_package_is_fine(tiny_package, tmp_path):
    package = copy_package(tiny_package, tmp_path)
    (package / "tokenizer" / "alias.json").symlink_to("vocab.json")
    rehash(package)
    assert "tokenizer/alias.json" in verify_package(package)["files"]


@pytest.mark.parametrize(
    "files,match",
    [
        (["unet/model.onnx"], "'files' must be an object"),
        ({"unet/model.onnx": 3}, r"files\['unet/model\.onnx'\] must be a sha256 string"),
    ],
)
def test_manifest_files_must_map_paths_to_hashes(tiny_package, tmp_path, files, match):
    package = copy_package(tiny_package, tmp_path)
    manifest_path = package / "fewstep.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "files": files}))
    with pytest.raises(PackageError, match=rf"fewstep\.json.*{match}"):
        verify_package(package)


# ---------------------------------------------------------------------------------------------
# 3. alpha_pattern keys
# ---------------------------------------------------------------------------------------------

EVIL = "(.*.*.*.*.*.*.*.*.*.*.*.*)*X"


def peft_file(path: Path, modules: list[str], config: dict, rank: int = 2) -> Path:
    """A diffusers-layout LoRA file on `modules` with `config` as its U-Net LoraConfig."""
    rng = np.random.default_rng(0)
    tensors = {}
    for module in modules:
        tensors[f"unet.{module}.lora_A.weight"] = rng.standard_normal((rank, 8), np.float32)
        tensors[f"unet.{module}.lora_B.weight"] = rng.standard_normal((8, rank), np.float32)
    metadata = json.dumps({f"unet.{k}": v for k, v in config.items()})
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": metadata})
    return path


def test_catastrophic_alpha_pattern_is_matched_in_bounded_time(tmp_path):
    """re.match(rf"(.*\\.)?({EVIL})$", name) backtracks for hours on a 60-character name."""
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    config = {"lora_alpha": 4, "alpha_pattern": {EVIL: 99}, "rank_pattern": {EVIL: 8}}
    path = peft_file(tmp_path / "evil.safetensors", [module], config)
    code = (
        "import sys, time; from fewstep.lora import read_lora; t = time.perf_counter(); "
        "layer, = read_lora(sys.argv[1]).layers; print(layer.alpha, time.perf_counter() - t)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    alpha, seconds = run.stdout.split()
    assert float(alpha) == 4.0  # no match: lora_alpha
    assert float(seconds) < 5.0


@pytest.mark.parametrize(
    "key,match",
    [
        ("(", "is not a regular expression"),
        ("a{", "which fewstep does not match"),
        ("(?=to_q)to_q", "which fewstep does not match"),
        (r"(a)\1", "which fewstep does not match"),
        ("a" * 300, "more than 256"),
    ],
)
def test_bad_alpha_pattern_key_names_the_file_and_the_key(tmp_path, key, match):
    path = peft_file(tmp_path / "bad.safetensors", ["x"], {"alpha_pattern": {key: 2}})
    with pytest.raises(ValueError, match=match) as error:
        read_lora(path)
    message = str(error.value)
    assert "bad.safetensors" in message and "unet.alpha_pattern" in message
    assert repr(key)[:40] in message


@pytest.mark.parametrize(
    "config,match",
    [
        ({"alpha_pattern": {"x": "big"}}, r"unet\.alpha_pattern\['x'\] must be a finite number"),
        ({"alpha_pattern": ["x"]}, r"unet\.alpha_pattern must be an object"),
        ({"lora_alpha": 1e400}, r"unet\.lora_alpha must be a finite number"),
    ],
)
def test_bad_peft_config_values(tmp_path, config, match):
    if "lora_alpha" in config:  # JSON has no inf literal: write the overflowing number
        path = peft_file(tmp_path / "bad.safetensors", ["x"], {})
        metadata = '{"unet.lora_alpha": 1e400}'
        from safetensors.numpy import load_file

        save_file(load_file(str(path)), str(path), metadata={"lora_adapter_metadata": metadata})
    else:
        path = peft_file(tmp_path / "bad.safetensors", ["x"], config)
    with pytest.raises(ValueError, match=match):
        read_lora(path)


REAL_MODULES = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v",
    "down_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "down_blocks.1.resnets.0.conv1",
    "mid_block.attentions.0.proj_in",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k",
    "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.2.attentions.0.proj_out",
    "text_model.encoder.layers.11.self_attn.q_proj",
]
REAL_PATTERNS = {  # diffusers writes module names; people write PEFT regexes too
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 8,
    "ff.net.2": 16,
    "to_out.0": 3,
    "^up_blocks.1.*to_k": 5,
    r"mid_block\.attentions\.0\.proj_(in|out)": 6,
    r"down_blocks\.[0-9]+\..*attn2\.to_[qv]": 7,
    "layers.\\d+.self_attn.q_proj": 9,
    "resnets.0.conv": 10,  # matches no module: `conv1` ends it
    "proj": 11,  # `…ff.net.0.proj` only: a suffix starts after a dot
}


def test_alpha_patterns_resolve_as_peft_does(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils.other import get_pattern_key

    config = {"lora_alpha": 4, "alpha_pattern": REAL_PATTERNS}
    path = peft_file(tmp_path / "real.safetensors", REAL_MODULES, config)
    got = {layer.module: layer.alpha for layer in read_lora(path).layers}
    expected = {
        m: float(REAL_PATTERNS.get(get_pattern_key(REAL_PATTERNS.keys(), m), 4))
        for m in REAL_MODULES
    }
    assert got == expected
    assert len(set(expected.values())) >= 7, f"too few patterns exercised ({peft.__version__})"


def test_automaton_agrees_with_re():
    """Keys outside the module-path form run on the automaton: the same answer as `re` on
    random keys of its subset and random names."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    atoms = st.sampled_from(
        ["a", "b", ".", r"\.", "_", "1", "^", "$", "()", "[ab]", "[^a]", "[a-c_]", "[]a]", "[^]]"]
        + [r"[\d.]", r"\d", r"\w", r"\W", r"\s", r"\S"]
    )

    def combine(children):
        return st.one_of(
            st.tuples(children, children).map("".join),
            st.tuples(children, children).map(lambda t: f"({t[0]}|{t[1]})"),
            st.tuples(children, st.sampled_from(["*", "+", "?", "*?", "{2}", "{1,2}", "{,2}"])).map(
                lambda t: f"(?:{t[0]}){t[1]}"
            ),
        )

    keys = st.recursive(atoms, combine, max_leaves=8)
    names = st.text(alphabet="ab._1 \n", max_size=10)

    @hypothesis.settings(max_examples=400, deadline=None, database=None)
    @hypothesis.given(keys, st.lists(names, min_size=1, max_size=5))
    def check(key, some_names):
        try:
            regex = re.compile(rf"(.*\.)?({key})$")
        except re.error:
            hypothesis.assume(False)
        matcher = PatternKeyMatcher(key, "test")  # every key of the subset is accepted
        for name in some_names:
            assert matcher.matches(name) == (regex.match(name) is not None), (key, name)

    check()


# ---------------------------------------------------------------------------------------------
# 4. pickles never load
# ---------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize(
    "name", ["lora.bin", "lora.pt", "lora.ckpt", "lora.pth", "lora.safetensors"]
)
def test_pickled_lora_never_runs(tiny_package, tmp_path, name):
    marker = tmp_path / "ran"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({f"{KOHYA_TARGET}.lora_down.weight": _RunsCode(marker)}))
    pickle.loads(path.read_bytes())  # the file does run code when unpickled
    assert marker.exists()
    marker.unlink()

    match = "not a readable safetensors" if name.endswith(".safetensors") else "pickle files"
    package = tiny_package("sd1")
    out = tmp_path / "new"
    with pytest.raises(ValueError, match=match):
        read_lora(path)
    with pytest.raises(ValueError, match=match):
        load_loras([(path, 1.0)])
    with pytest.raises(ValueError, match=match):
        Pipeline.from_pretrained(package, loras=[(path, 1.0)])
    with pytest.raises(ValueError, match=match):
        apply_loras_to_package(package, [(path, 1.0)], out)
    with pytest.raises(ValueError, match=match):
        fold_lora_torch({"unet": _Toy(torch.float32)}, [(path, 1.0)])
    assert cli_main(["lora", "apply", str(package), "--lora", str(path), "--out", str(out)]) == 2
    assert not marker.exists()
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 6. folds that overflow, LoRA weights that are not floats
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_package(tiny_model, tmp_path_factory):
    from fewstep.export import export_package

    out = tmp_path_factory.mktemp("fp16") / "package"
    return export_package(tiny_model("sd1"), out, dtype="fp16", progress=False, verify=False)


def assert_onnx_fold_refused(package: Path, loras, match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        lora_initializers(package, loras)
    with pytest.raises(ValueError, match=match):
        Pipeline.from_pretrained(package, loras=loras)
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=match):
        apply_loras_to_package(package, loras, out)
    assert not out.exists() and not list(tmp_path.glob(".never*"))


NON_FINITE = rf"{KOHYA_TARGET}\.lora_down\.weight.* into unet\.{re.escape(TARGET)} makes \d+ of"


@pytest.mark.parametrize("case", ["scale 1e38", "alpha 1e308"])
def test_fold_to_inf_is_refused(tiny_package, tmp_path, case):
    package = tiny_package("sd1")
    if case == "scale 1e38":
        loras = [(target_lora(package, tmp_path / "l.safetensors", value=1.0), 1e38)]
    else:
        alpha = np.float64(1e308)
        loras = [(target_lora(package, tmp_path / "l.safetensors", alpha=alpha), 1.0)]
    assert_onnx_fold_refused(package, loras, NON_FINITE + r".* in float32", tmp_path)


def test_fold_past_fp16_range_is_refused_in_an_fp16_package(tiny_package, fp16_package, tmp_path):
    # delta = 4 · 1 · 1 · 3e4 = 1.2e5: a float32 number, past float16's 65504
    lora = target_lora(fp16_package, tmp_path / "l.safetensors", value=1.0)
    loras = [(lora, 3e4)]
    fp32 = lora_initializers(tiny_package("sd1"), loras)["unet"]
    assert all(np.isfinite(v).all() for v in fp32.values())  # fine in the fp32 package
    assert_onnx_fold_refused(fp16_package, loras, NON_FINITE + r".* in float16", tmp_path)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
@pytest.mark.parametrize("role", ["down", "up"])
def test_non_float_lora_weights_are_refused(tiny_package, tmp_path, dtype, role):
    package = tiny_package("sd1")
    out_features, in_features = GraphWeights(package / "unet", "unet").shapes()[TARGET]
    down = np.ones((2, in_features), np.float32)
    up = np.ones((out_features, 2), np.float32)
    arrays = {"down": down, "up": up}
    arrays[role] = arrays[role].astype(dtype)
    path = write_kohya(
        tmp_path / "l.safetensors", {KOHYA_TARGET: (arrays["down"], arrays["up"], 2.0)}
    )
    match = rf"'{KOHYA_TARGET}\.lora_{role}\.weight' has dtype {np.dtype(dtype)}"
    assert_onnx_fold_refused(package, [(path, 1.0)], match, tmp_path)
    with pytest.raises(ValueError, match=match):
        fold_lora_torch({"unet": _Toy(torch.float32)}, [(path, 1.0)])


def test_bool_alpha_is_refused(tmp_path):
    one = np.ones((1, 3), np.float32)
    path = write_kohya(tmp_path / "l.safetensors", {"lora_unet_a": (one, one.T, np.True_)})
    with pytest.raises(ValueError, match=r"'lora_unet_a\.alpha' has dtype bool"):
        read_lora(path)


class _Toy(torch.nn.Module):
    """Two linear layers, `a` and `b`: the weights `unet.a.weight`, `unet.b.weight` [4, 3]."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(3, 4).to(dtype)
        self.b = torch.nn.Linear(3, 4).to(dtype)


def toy_lora(tmp_path: Path, name: str, a: float, b: float, b_alpha=None) -> Path:
    """A rank-1 LoRA on a and b with deltas a and b everywhere (alpha = rank unless given)."""
    one = np.ones((1, 3), np.float32)
    return write_kohya(
        tmp_path / name,
        {
            "lora_unet_a": (one, np.full((4, 1), a, np.float32), None),
            "lora_unet_b": (one, np.full((4, 1), b, np.float32), b_alpha),
        },
    )


def state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize(
    "dtype,scale,b_delta,b_alpha",
    [
        (torch.float32, 1e38, 10.0, None),  # scale 1e38 on b's delta 10
        (torch.float32, 1.0, 1.0, np.float64(1e308)),
        (torch.float16, 1.0, 1e5, None),  # finite in float32, past float16's 65504
    ],
)
def test_torch_fold_to_inf_is_refused_before_any_weight_changes(
    tmp_path, dtype, scale, b_delta, b_alpha
):
    toy = _Toy(dtype)
    good = toy_lora(tmp_path, "good.safetensors", 0.5, 0.25)
    fold_lora_torch({"unet": toy}, [(good, 1.0)])  # a LoRA already folded in
    folded = state(toy)
    bad = toy_lora(tmp_path, "bad.safetensors", 1.0, b_delta, b_alpha)
    name = str(dtype).removeprefix("torch.")
    match = (
        r"bad\.safetensors key 'lora_unet_b\.lora_down\.weight'.* into unet\.b\.weight makes "
        rf"12 of its values inf or NaN in {name}"
    )
    with pytest.raises(ValueError, match=match):
        fold_lora_torch({"unet": toy}, [(bad, scale)])
    assert same(state(toy), folded)  # `a`, folded first in the loop, untouched too
    if dtype == torch.float16:  # the same LoRA fits a float32 copy
        toy32 = _Toy(torch.float32)
        fold_lora_torch({"unet": toy32}, [(bad, scale)])
        assert torch.isfinite(toy32.b.weight).all()
