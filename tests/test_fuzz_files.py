"""Fuzzing what comes from the internet: model packages, their configs, and LoRA files.

Each case mutates a copy of a real (tiny) package or LoRA file the way damage and malice do:
truncation, flipped bytes, JSON values swapped for wrong types, huge or negative numbers,
paths out of the folder (`../`, absolute, symlinks) in the manifest and in the graphs'
external-data entries. Then fewstep loads it (`Pipeline.from_pretrained`, with and without
a LoRA folded at load), or folds the LoRA into a new package (`apply_loras_to_package`).
Every case must either succeed or raise a PackageError/ValueError whose message names a
file, and no input file may change. Half the package cases keep the manifest (whose hashes
are the first defence), half drop it as optimum's packages do, so the parsers themselves
are reached. Loading includes building onnxruntime sessions; generating with a damaged but
loadable graph is not part of the fuzz.
"""

from __future__ import annotations

import collections
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from fewstep.lora import apply_loras_to_package
from fewstep.lora.onnx_package import package_graph_weights
from fewstep.package import PackageError
from fewstep.pipeline import Pipeline

PACKAGE_CASES = 160
LORA_CASES = 160
# JSON values swapped in for a config or manifest value.
JSON_VALUES = [None, -1, 0, 10**12, 1e308, "four", "", [], {}, [1, 2], True, "../../outside"]
HOSTILE_PATHS = ["../outside.bin", "/etc/hostname", "unet/../../outside.bin", "link/escape"]


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture(scope="module")
def package(tiny_package):
    return tiny_package("sd1")


@pytest.fixture(scope="module")
def lora_file(package, tmp_path_factory):
    """A PEFT-layout LoRA on a linear and a conv weight of the tiny U-Net, alpha in metadata."""
    shapes = package_graph_weights(package)["unet"].shapes()
    rng = np.random.default_rng(0)
    tensors = {}
    for name in (
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.resnets.0.conv1.weight",
    ):
        out, inp, *kernel = shapes[name]
        module = name.removesuffix(".weight")
        tensors[f"unet.{module}.lora_A.weight"] = rng.standard_normal((4, inp, *kernel)).astype(
            np.float32
        )
        tensors[f"unet.{module}.lora_B.weight"] = rng.standard_normal(
            (out, 4, *([1, 1] if kernel else []))
        ).astype(np.float32)
    metadata = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.r": 4})}
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


# -- mutations ---------------------------------------------------------------------------------


def truncate(data: bytes, draw: st.DrawFn) -> bytes:
    return data[: draw(st.integers(0, max(len(data) - 1, 0)))]


def flip_bytes(data: bytes, draw: st.DrawFn) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        buf[draw(st.integers(0, len(buf) - 1))] ^= draw(st.integers(1, 255))
    return bytes(buf)


def mutate_json(data: bytes, draw: st.DrawFn) -> bytes:
    """A value somewhere in the document replaced or deleted (the document stays JSON)."""
    doc = json.loads(data)
    parent, key = None, None
    node = doc
    for _ in range(draw(st.integers(1, 3))):
        children = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not children:
            break
        parent, key = node, draw(st.sampled_from(children))
        node = parent[key]
        if not isinstance(node, (dict, list)) or draw(st.booleans()):
            break
    if parent is None:
        return json.dumps(draw(st.sampled_from(JSON_VALUES))).encode()
    if isinstance(parent, dict) and draw(st.integers(0, 3)) == 0:
        del parent[key]
    else:
        parent[key] = draw(st.sampled_from(JSON_VALUES))
    return json.dumps(doc).encode()


def hostile_manifest_entry(root: Path, draw: st.DrawFn) -> None:
    """A `files` entry that points out of the package (symlinks included)."""
    manifest = json.loads((root / "fewstep.json").read_text())
    entry = draw(st.sampled_from(HOSTILE_PATHS))
    if entry == "link/escape":
        (root / "link").symlink_to(root.parent)
    manifest["files"][entry] = "0" * 64
    (root / "fewstep.json").write_text(json.dumps(manifest))


def hostile_external_data(root: Path, draw: st.DrawFn) -> None:
    """Turn an initializer of the U-Net graph into external data at a path out of the folder."""
    import onnx
    from onnx.external_data_helper import set_external_data

    graph_path = root / "unet" / "model.onnx"
    model = onnx.load(str(graph_path))
    tensor = next(t for t in model.graph.initializer if t.raw_data and len(t.dims) == 2)
    (root.parent / "outside.bin").write_bytes(bytes(len(tensor.raw_data)))
    set_external_data(
        tensor, draw(st.sampled_from(["../../outside.bin", str(root.parent / "outside.bin")]))
    )
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    graph_path.write_bytes(model.SerializeToString())


def mutate_package(root: Path, draw: st.DrawFn) -> str:
    """Damage one thing in the package at `root`; returns what was done, for messages."""
    kind = draw(st.sampled_from(["file", "file", "file", "manifest-path", "external-data"]))
    if kind == "manifest-path" and (root / "fewstep.json").exists():
        hostile_manifest_entry(root, draw)
        return kind
    if kind == "external-data":
        hostile_external_data(root, draw)
        return kind
    files = sorted(p for p in root.rglob("*") if p.is_file())
    target = draw(st.sampled_from(files))
    data = target.read_bytes()
    how = draw(
        st.sampled_from(
            ["truncate", "flip", "json"] if target.suffix == ".json" else ["truncate", "flip"]
        )
    )
    mutation = {"truncate": truncate, "flip": flip_bytes, "json": mutate_json}[how]
    target.write_bytes(mutation(data, draw))
    return f"{how} {target.relative_to(root)}"


def mutate_lora(path: Path, draw: st.DrawFn) -> str:
    """Damage the safetensors file: its bytes, or its JSON header (shapes, dtypes, offsets,
    metadata such as PEFT's alpha_pattern)."""
    data = path.read_bytes()
    how = draw(st.sampled_from(["truncate", "flip", "header", "header", "metadata"]))
    if how in ("truncate", "flip"):
        path.write_bytes((truncate if how == "truncate" else flip_bytes)(data, draw))
        return how
    size = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + size]), data[8 + size :]
    if how == "metadata":
        pattern = draw(
            st.sampled_from(["(.*.*.*.*.*.*.*.*.*.*.*.*)*X", "(", "a" * 5000, "mid_block"])
        )
        header["__metadata__"] = {
            "lora_adapter_metadata": json.dumps(
                {
                    "unet.lora_alpha": draw(st.sampled_from(JSON_VALUES)),
                    "unet.alpha_pattern": {pattern: draw(st.sampled_from(JSON_VALUES))},
                }
            )
        }
    else:
        key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[key][field] = draw(
            st.sampled_from(
                [
                    "I32",
                    "BOOL",
                    "F64",
                    "BF16",
                    "X9",
                    [1],
                    [10**9, 10**9],
                    [-1, 4],
                    [0, 10**12],
                    None,
                ]
            )
        )
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + body)
    return how


def check_outcome(call, names: list[str], outcomes: collections.Counter, failures: list) -> None:
    """Run `call`; a PackageError/ValueError must name one of `names` (files)."""
    try:
        call()
    except (PackageError, ValueError) as e:
        named = any(name in str(e) for name in names)
        outcomes[f"{type(e).__name__}{'' if named else ' (names no file)'}"] += 1
        if not named:
            failures.append(repr(e))
        return
    except Exception as e:
        outcomes[type(e).__name__] += 1
        failures.append(repr(e))
        return
    outcomes["succeeded"] += 1


def test_mutated_packages_raise_package_or_value_errors(package, lora_file, capsys):
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list = []

    @settings(max_examples=PACKAGE_CASES)
    @given(st.data())
    def case(data: st.DataObject) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch) / "a" / "package"
            shutil.copytree(package, root)
            if data.draw(st.booleans()):
                (root / "fewstep.json").unlink()  # optimum-style: parsers, not hashes
            done = mutate_package(root, data.draw)
            before = tree_hashes(Path(scratch))
            loras = [(lora_file, 0.5)] if data.draw(st.booleans()) else None
            names = [str(root), lora_file.name]
            count = len(failures)
            check_outcome(
                lambda: Pipeline.from_pretrained(root, loras=loras), names, outcomes, failures
            )
            if len(failures) > count:
                failures[-1] = f"{done}: {failures[-1]}"
            assert tree_hashes(Path(scratch)) == before, done

    case()
    with capsys.disabled():
        total = sum(outcomes.values())
        print(f"\nfuzzed packages: {total} cases, {dict(outcomes)}")
    assert not failures, failures[:5]
    assert sum(outcomes.values()) >= PACKAGE_CASES


def test_mutated_lora_files_raise_value_errors_and_write_nothing(package, lora_file, capsys):
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list = []
    pristine = tree_hashes(package)

    @settings(max_examples=LORA_CASES)
    @given(st.data())
    def case(data: st.DataObject) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            lora = Path(scratch) / lora_file.name
            shutil.copy(lora_file, lora)
            done = mutate_lora(lora, data.draw)
            before = lora.read_bytes()
            out = Path(scratch) / "out"
            count = len(failures)
            check_outcome(
                lambda: apply_loras_to_package(package, [(lora, 1.0)], out),
                [lora.name],
                outcomes,
                failures,
            )
            if len(failures) > count:
                failures[-1] = f"{done}: {failures[-1]}"
            if not out.exists():  # a refusal leaves nothing behind, not even a work folder
                assert sorted(p.name for p in Path(scratch).iterdir()) == [lora.name], done
            assert lora.read_bytes() == before, done

    case()
    with capsys.disabled():
        print(f"\nfuzzed LoRA files: {sum(outcomes.values())} cases, {dict(outcomes)}")
    assert tree_hashes(package) == pristine
    assert not failures, failures[:5]
    assert sum(outcomes.values()) >= LORA_CASES
