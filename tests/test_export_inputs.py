"""What `fewstep export` accepts from a diffusers folder: model_index.json's classes (never a
module the folder ships) and both tokenizer layouts (vocab.json + merges.txt, tokenizer.json
alone as transformers 5 saves it), written so that fewstep's runtime and transformers' slow
(vocab/merges) and fast (tokenizer.json) tokenizers give the same ids from the package."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from fewstep.export import export_package  # noqa: E402
from fewstep.export.source import check_source  # noqa: E402
from fewstep.export.testing import make_tiny_model  # noqa: E402
from fewstep.package import verify_package  # noqa: E402
from fewstep.pipeline import Pipeline  # noqa: E402
from fewstep.tokenizer import CLIPTokenizer as RuntimeTokenizer  # noqa: E402

MAX_LENGTH = 77


def _copy_with_model_index(src: Path, dst: Path, **entries) -> Path:
    shutil.copytree(src, dst)
    index = json.loads((dst / "model_index.json").read_text())
    (dst / "model_index.json").write_text(json.dumps({**index, **entries}))
    return dst


# ---------------------------------------------------------------------------------------------
# model_index.json: only the classes fewstep reads
# ---------------------------------------------------------------------------------------------

EVIL_MODULE = """
from pathlib import Path
Path(__file__).with_name("imported.marker").write_text("model_index.json ran this module")
CLIPTextModel = UNet2DConditionModel = object
"""
COMPONENT_LIBRARIES = {"text_encoder": "transformers", "unet": "diffusers"}


@pytest.mark.parametrize(
    "component, cls", [("text_encoder", "CLIPTextModel"), ("unet", "UNet2DConditionModel")]
)
def test_module_named_by_model_index_is_never_imported(
    component, cls, tiny_model, tmp_path, monkeypatch
):
    entry = {component: ["evilmod", cls]}
    src = _copy_with_model_index(tiny_model("sd1"), tmp_path / "src", **entry)
    (src / "evilmod.py").write_text(EVIL_MODULE)
    monkeypatch.syspath_prepend(str(src))  # as under `python -m` or a notebook started there
    assert importlib.util.find_spec("evilmod") is not None  # importing it would run it
    out = tmp_path / "pkg"
    with pytest.raises(ValueError) as raised:
        export_package(src, out, progress=False)
    message = str(raised.value)
    assert f"component {component!r} is ['evilmod', {cls!r}]" in message
    assert f"accepts [{COMPONENT_LIBRARIES[component]!r}, {cls!r}]" in message
    assert not (src / "imported.marker").exists()
    assert not out.exists()


@pytest.mark.parametrize(
    "component, entry",
    [
        ("unet", ["diffusers", "DiffusionPipeline"]),  # an allowed library, another class
        ("vae", ["diffusers", "AutoencoderTiny"]),
        ("text_encoder", ["transformers", "AutoModel"]),
        ("tokenizer", ["evilmod", "CLIPTokenizer"]),
        ("scheduler", ["evilmod", "EulerDiscreteScheduler"]),
        ("scheduler", ["diffusers", "os"]),
        ("tokenizer", "CLIPTokenizer"),  # not a [library, class] pair
    ],
)
def test_other_classes_are_refused_by_name(component, entry, tiny_model, tmp_path):
    src = _copy_with_model_index(tiny_model("sd1"), tmp_path / "src", **{component: entry})
    with pytest.raises(ValueError, match=rf"component '{component}' is .*; fewstep accepts \["):
        check_source(src, None)


def test_hub_model_index_of_sd15_is_accepted(tiny_model, tmp_path):
    """runwayml/stable-diffusion-v1-5 names components fewstep does not export (never read)."""
    src = _copy_with_model_index(
        tiny_model("sd1"),
        tmp_path / "src",
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
        tokenizer=["transformers", "CLIPTokenizerFast"],
        scheduler=["diffusers", "DPMSolverMultistepScheduler"],
    )
    assert check_source(src, None).kind == "diffusers"


# ---------------------------------------------------------------------------------------------
# Tokenizer layouts
# ---------------------------------------------------------------------------------------------

PROMPTS = [
    "a red circle",
    "A Photo of an astronaut riding a horse on Mars!!",
    "  ünï\tcafé 東京 🙂 naïve — “quoted” <|endoftext|> ok",
    "zebra's 12 unicorns don't fly; they're café-bound!",
    # over 77 tokens: known words and words tokenized byte by byte
    " ".join(["a big red circle on the left of a blue square"] * 8),
    "quixotic zephyrs vex jumbled wyverns " * 6 + "ÆØÅ ß ñ",
    "",
]


@pytest.fixture(scope="module")
def json_layout_package(tmp_path_factory):
    """An SD2 (pad "!") source whose tokenizer/ is what transformers 5 saves, and its package."""
    root = tmp_path_factory.mktemp("json-layout")
    src = make_tiny_model(root / "src", "sd2", tokenizer_layout="json")
    return src, export_package(src, root / "pkg", progress=False)


@pytest.fixture(params=["sd1 vocab", "sd2 vocab+json", "sd2 json"])
def exported(request, tiny_model, tiny_package, json_layout_package):
    """(source folder, its package) for each tokenizer layout of the source."""
    if request.param == "sd2 json":
        return json_layout_package
    family = request.param.split()[0]
    return tiny_model(family), tiny_package(family)


def _transformers_ids(tokenizer) -> np.ndarray:
    encoded = tokenizer(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    return np.asarray(encoded.input_ids, dtype=np.int64)


def _only(folder: Path, dst: Path, names: tuple[str, ...]) -> Path:
    dst.mkdir()
    for name in names:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, dst / name)
    return dst


def test_source_layouts_are_as_named(tiny_model, json_layout_package):
    def files(folder):
        return sorted(p.name for p in (folder / "tokenizer").iterdir())

    vocab = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert files(tiny_model("sd1")) == vocab
    assert files(tiny_model("sd2")) == sorted([*vocab, "tokenizer.json"])
    assert files(json_layout_package[0]) == ["tokenizer.json", "tokenizer_config.json"]


def test_package_tokenizer_holds_both_layouts_with_the_same_ids(exported, tmp_path):
    src, pkg = exported
    tokenizer = pkg / "tokenizer"
    manifest = verify_package(pkg)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert f"tokenizer/{name}" in manifest["files"], name
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # as the source has them
        assert (tokenizer / name).is_file() == (src / "tokenizer" / name).is_file(), name

    # The reference: transformers' tokenizer of the source folder, as diffusers loads it.
    reference = transformers.CLIPTokenizer.from_pretrained(src / "tokenizer")
    assert len(reference(PROMPTS[4]).input_ids) > MAX_LENGTH  # truncation is exercised
    expected = _transformers_ids(reference)

    vocab_only = _only(
        tokenizer,
        tmp_path / "vocab-only",
        ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"),
    )
    pipe = Pipeline.from_pretrained(pkg)  # fewstep's runtime: tokenizer.json
    got = {
        "runtime, package": pipe.tokenizer(PROMPTS),
        "runtime, vocab.json + merges.txt": RuntimeTokenizer.from_folder(vocab_only)(PROMPTS),
        "transformers, vocab.json + merges.txt": _transformers_ids(
            transformers.CLIPTokenizer.from_pretrained(vocab_only)
        ),
        "transformers AutoTokenizer, package": _transformers_ids(
            transformers.AutoTokenizer.from_pretrained(tokenizer)
        ),
    }
    fast = getattr(transformers, "CLIPTokenizerFast", None)  # an alias in transformers 5
    if fast is not None:
        got["transformers CLIPTokenizerFast, package"] = _transformers_ids(
            fast.from_pretrained(tokenizer)
        )
    for name, ids in got.items():
        np.testing.assert_array_equal(ids, expected, err_msg=name)


def test_tokenizer_json_is_required_without_vocab_files(tiny_model, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_model("sd1"), src)
    (src / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(ValueError, match=r"tokenizer must hold tokenizer\.json or vocab\.json"):
        check_source(src, None)
    (src / "tokenizer" / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    with pytest.raises(ValueError, match=r"tokenizer\.json must hold a BPE model.*'WordPiece'"):
        check_source(src, None)


def test_merges_in_both_tokenizers_formats_give_the_same_files(json_layout_package, tmp_path):
    """tokenizers >= 0.20 writes merges as [a, b] pairs, older versions as "a b" strings."""
    src, pkg = json_layout_package
    data = json.loads((src / "tokenizer" / "tokenizer.json").read_text())
    assert isinstance(data["model"]["merges"][0], list)  # what the installed version wrote
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    old = _copy_with_model_index(src, tmp_path / "old")
    (old / "tokenizer" / "tokenizer.json").write_text(json.dumps(data))
    from fewstep.export.package_writer import _write_tokenizer

    _write_tokenizer(old / "tokenizer", tmp_path / "written")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "written" / name).read_bytes() == (pkg / "tokenizer" / name).read_bytes()
