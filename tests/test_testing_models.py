"""fewstep.export.testing: tiny models load and run in diffusers, tokenize like CLIP, and survive
the trip through the original single-file layout bit for bit (the `save_single_file` fixture of
conftest.py writes it; diffusers' own loader is the judge)."""

import filecmp
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from fewstep.export import testing  # noqa: E402
from fewstep.export.testing import FAMILIES, make_tiny_model  # noqa: E402

# What each family must look like, at tiny scale.
EXPECTED = {
    "sd1": dict(
        pipeline="StableDiffusionPipeline", scheduler="PNDMScheduler", prediction="epsilon",
        spacing="leading", pad="<|endoftext|>", linear_proj=False, cond_dim=None,
        tokenizer_json=False, guidance=7.5,
    ),
    "sd2": dict(
        pipeline="StableDiffusionPipeline", scheduler="DDIMScheduler", prediction="v_prediction",
        spacing="leading", pad="!", linear_proj=True, cond_dim=None, tokenizer_json=True,
        guidance=7.5,
    ),
    "lcm": dict(
        pipeline="LatentConsistencyModelPipeline", scheduler="LCMScheduler", prediction="epsilon",
        spacing="leading", pad="<|endoftext|>", linear_proj=False, cond_dim=32,
        tokenizer_json=False, guidance=8.5,
    ),
    "turbo": dict(
        pipeline="StableDiffusionPipeline", scheduler="EulerDiscreteScheduler",
        prediction="epsilon", spacing="trailing", pad="!", linear_proj=True, cond_dim=None,
        tokenizer_json=True, guidance=0.0,
    ),
}  # fmt: skip

PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "A RED circle  on the   left, a blue square at the top-right corner",
    "zebra's 12 unicorns don't fly; they're café-bound!",
    "hello! world!! <|endoftext|> again",
    "",
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_model(root / family, family) for family in FAMILIES}


def _pipeline_class(family):
    return getattr(diffusers, EXPECTED[family]["pipeline"])


def _load(folder):
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_unknown_family_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"family must be one of .*'sd1'.*'sdxl_turbo'.*got 'sd3'"):
        make_tiny_model(tmp_path / "m", "sd3")
    assert not (tmp_path / "m").exists()


def test_module_imports_without_diffusers_or_transformers():
    """Importing the module costs no more than the export package itself: the model libraries
    load when a model is made."""
    code = (
        "import sys, fewstep.export.testing; "
        "heavy = {'diffusers', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_pipeline_loads_and_generates(models, family):
    expected = EXPECTED[family]
    pipe = _load(models[family])
    assert type(pipe) is _pipeline_class(family)
    assert type(pipe.scheduler).__name__ == expected["scheduler"]
    assert pipe.scheduler.config.prediction_type == expected["prediction"]
    assert pipe.scheduler.config.timestep_spacing == expected["spacing"]
    assert pipe.unet.config.use_linear_projection == expected["linear_proj"]
    assert pipe.unet.config.time_cond_proj_dim == expected["cond_dim"]
    assert pipe.tokenizer.pad_token == expected["pad"]
    assert pipe.vae_scale_factor == 8

    image = pipe(
        "a red circle on a blue background",
        num_inference_steps=1,
        guidance_scale=expected["guidance"],
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3)  # default size: unet sample_size 8 x VAE factor 8
    assert np.isfinite(image).all()
    assert image.std() > 0.05, f"near-constant image, std {image.std()}"
    # The random VAE must not just saturate: most pixels inside (0, 1).
    assert ((image > 0.0) & (image < 1.0)).mean() > 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_output_depends_on_prompt(models, family):
    pipe = _load(models[family])

    def embed(prompt):
        ids = pipe.tokenizer(
            prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        return pipe.text_encoder(ids)[0]  # [1, 77, 32]

    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    extra = {}
    if EXPECTED[family]["cond_dim"]:
        extra["timestep_cond"] = torch.randn(1, EXPECTED[family]["cond_dim"], generator=g)
    with torch.no_grad():
        a = pipe.unet(latents, 500, embed("a red circle"), **extra).sample
        b = pipe.unet(latents, 500, embed("a blue square"), **extra).sample
    assert a.std() > 0.1
    # The prompt moves the output by a sizeable fraction of its spread, not by rounding noise.
    assert (a - b).std() > 0.05 * a.std()


def _files(folder):
    return sorted(
        os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, family):
    from safetensors.torch import load_file

    first = make_tiny_model(tmp_path / "a", family, seed=7)
    again = make_tiny_model(tmp_path / "b", family, seed=7)
    other = make_tiny_model(tmp_path / "c", family, seed=8)
    assert _files(first) == _files(again) == _files(other)
    for name in _files(first):
        assert filecmp.cmp(first / name, again / name, shallow=False), name
    weights = [n for n in _files(first) if n.endswith(".safetensors")]
    assert len(weights) == 3
    for name in weights:
        a, c = load_file(first / name), load_file(other / name)
        assert a.keys() == c.keys()
        assert all(v.dtype == torch.float32 for v in a.values())
        same = [k for k in a if torch.equal(a[k], c[k])]
        assert not same, f"{name}: unchanged by the seed: {same[:3]}"


def test_no_parameter_left_constant(models):
    from safetensors.torch import load_file

    for name in ("unet", "vae"):
        weights = load_file(models["lcm"] / name / "diffusion_pytorch_model.safetensors")
        constant = [k for k, v in weights.items() if v.numel() > 1 and v.std() == 0]
        assert not constant, constant[:5]


# --- tokenizer ------------------------------------------------------------------------------


class SlowClipReference:
    """The semantics of transformers 4's slow `CLIPTokenizer` (openai/CLIP simple_tokenizer):
    special tokens split out first; the rest whitespace-cleaned and lower-cased, split by CLIP's
    regex, byte-encoded, and merged by BPE rank. Written from those sources, independently of
    fewstep.export.testing."""

    pattern = (
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"""
        r"""|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    )

    def __init__(self, folder, specials):
        self.regex = pytest.importorskip("regex")
        self.vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines) if line}
        bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        cs, n = list(bs), 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_encoder = {b: chr(c) for b, c in zip(bs, cs, strict=True)}
        ordered = sorted(set(specials), key=len, reverse=True)
        self.split = re.compile("(" + "|".join(re.escape(s) for s in ordered) + ")")
        self.specials = set(specials)

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            first, second = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if (first, second) not in self.ranks:
                break
            new, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new.extend(word[i:])
                    break
                new.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        return word

    def __call__(self, text):
        ids = [self.vocab["<|startoftext|>"]]
        for chunk in self.split.split(text):
            if chunk in self.specials:
                ids.append(self.vocab[chunk])
                continue
            chunk = re.sub(r"\s+", " ", chunk).strip().lower()
            for token in self.regex.findall(self.pattern, chunk):
                encoded = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
                ids.extend(self.vocab[t] for t in self.bpe(encoded))
        return ids + [self.vocab["<|endoftext|>"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_matches_slow_clip_semantics(models, family):
    folder = models[family] / "tokenizer"
    expected = EXPECTED[family]
    assert (folder / "tokenizer.json").exists() == expected["tokenizer_json"]
    assert (folder / "vocab.json").exists() and (folder / "merges.txt").exists()

    pad = expected["pad"]
    reference = SlowClipReference(folder, ["<|startoftext|>", "<|endoftext|>", pad])
    loaded = [transformers.CLIPTokenizer.from_pretrained(folder)]
    fast = getattr(transformers, "CLIPTokenizerFast", None)  # an alias in transformers 5
    if fast is not None:
        loaded.append(fast.from_pretrained(folder))
    for tokenizer in loaded:
        assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|startoftext|>", "<|endoftext|>")
        assert tokenizer.pad_token == pad
        assert tokenizer.model_max_length == 77
        for prompt in PROMPTS:
            assert tokenizer(prompt).input_ids == reference(prompt), (type(tokenizer), prompt)
        padded = tokenizer("a cat", padding="max_length", max_length=77).input_ids
        vocab = reference.vocab
        assert padded[:4] == [
            vocab["<|startoftext|>"],
            vocab["a</w>"],
            vocab["cat</w>"],
            vocab["<|endoftext|>"],
        ]
        assert padded[4:] == [vocab[pad]] * 73


def test_tokenizer_words_are_single_tokens(models):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(models["sd1"] / "tokenizer")
    vocab = tokenizer.get_vocab()
    for word in testing.TOKENIZER_WORDS:
        assert tokenizer(word, add_special_tokens=False).input_ids == [vocab[word + "</w>"]], word
    # Everything else still tokenizes, byte by byte at worst, and decodes back (digits would
    # come back space-separated: CLIP makes each digit a word).
    text = "quixotic zephyrs vex jumbled wyverns"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    # CLIP's id layout: 256 bytes, 256 bytes + </w>, merges, then the two specials last.
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (len(vocab) - 2, len(vocab) - 1)


LAYOUT_FILES = {
    "vocab": ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"],
    "vocab+json": [
        "merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
        "vocab.json",
    ],
    "json": ["tokenizer.json", "tokenizer_config.json"],  # what transformers 5 saves
}  # fmt: skip


@pytest.mark.parametrize(
    "family, layout", [("sd1", "vocab+json"), ("sd2", "vocab"), ("sd1", "json"), ("sd2", "json")]
)
def test_tokenizer_layout_can_be_chosen(models, tmp_path, family, layout):
    tokenizers = pytest.importorskip("tokenizers")
    folder = make_tiny_model(tmp_path / family, family, tokenizer_layout=layout) / "tokenizer"
    assert sorted(p.name for p in folder.iterdir()) == LAYOUT_FILES[layout]
    # The vocabulary is the family's default one, whatever the files.
    reference = SlowClipReference(
        models[family] / "tokenizer", ["<|startoftext|>", "<|endoftext|>", EXPECTED[family]["pad"]]
    )
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token == EXPECTED[family]["pad"]
    for prompt in PROMPTS:
        assert tokenizer(prompt).input_ids == reference(prompt)
        if layout != "vocab":  # what the lean runtime reads: the tokenizers library alone
            raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
            assert raw.encode(prompt).ids == reference(prompt)


def test_unknown_tokenizer_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer_layout must be one of .*got 'fast'"):
        make_tiny_model(tmp_path / "m", "sd1", tokenizer_layout="fast")
    assert not (tmp_path / "m").exists()


# --- single file ----------------------------------------------------------------------------

# diffusers 0.42's converter has no rule for LCM's guidance embedding; it stays unloaded.
UNLOADED_BY_DIFFUSERS = {"lcm": {"time_embedding.cond_proj.weight"}}


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip_is_bit_exact(models, tmp_path, family, save_single_file):
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file

    folder = models[family]
    out = save_single_file(folder, tmp_path / f"{family}.safetensors")
    checkpoint = load_file(out)
    assert {k.split(".")[0] for k in checkpoint} == {
        "model",
        "first_stage_model",
        "cond_stage_model",
    }
    reference = _pipeline_class(family).from_pretrained(folder, local_files_only=True)
    unloaded = UNLOADED_BY_DIFFUSERS.get(family, set())

    # The keys diffusers' converters derive from the file are exactly the modules' keys.
    unet_keys = set(sfu.convert_ldm_unet_checkpoint(checkpoint, dict(reference.unet.config)))
    assert unet_keys == set(reference.unet.state_dict()) - unloaded
    vae_keys = set(sfu.convert_ldm_vae_checkpoint(checkpoint, dict(reference.vae.config)))
    assert vae_keys == set(reference.vae.state_dict())
    if EXPECTED[family]["pad"] == "!":  # SD2: OpenCLIP layout
        assert sfu.is_open_clip_model(checkpoint) and not sfu.is_clip_model(checkpoint)
        text = sfu.convert_open_clip_checkpoint(reference.text_encoder, checkpoint)
    else:
        assert sfu.is_clip_model(checkpoint)
        text = sfu.convert_ldm_clip_checkpoint(checkpoint)
    text_keys = {k.removeprefix("text_model.") for k in text}
    model_keys = {k.removeprefix("text_model.") for k in reference.text_encoder.state_dict()}
    assert text_keys == model_keys - {"embeddings.position_ids"}

    # The whole pipeline from the single file: every tensor equal to the folder's, bit for bit.
    # Default (meta-device) loading would crash on an unloaded LCM weight; plain init keeps it.
    kwargs = {"low_cpu_mem_usage": False} if unloaded else {}
    pipe = _pipeline_class(family).from_single_file(
        str(out), config=str(folder), local_files_only=True, **kwargs
    )
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(reference, name).state_dict(), getattr(pipe, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        differ = {k for k in ours if not torch.equal(ours[k], theirs[k])}
        assert differ == (unloaded if name == "unet" else set()), (name, sorted(differ)[:5])
    for key in unloaded:  # still in the file, under the name diffusers' reverse script uses
        stored = checkpoint["model.diffusion_model." + key]
        assert torch.equal(stored, reference.unet.state_dict()[key])


def test_ldm_tables_invert_diffusers_on_the_full_sd_block_pattern(to_ldm):
    """SD 1.5's real block pattern (4 blocks, 2 layers each, 3 cross-attention levels) and an
    SD-shaped VAE (2 layers per block), at tiny width: diffusers' converters undo our tables."""
    from diffusers.loaders import single_file_utils as sfu

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, block_out_channels=(8, 16, 16, 16), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
        )  # fmt: skip
        vae = diffusers.AutoencoderKL(
            block_out_channels=(4, 8, 8, 8), layers_per_block=2, norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )  # fmt: skip
    for model, write_ldm, convert in (
        (unet, to_ldm["unet"], sfu.convert_ldm_unet_checkpoint),
        (vae, to_ldm["vae"], sfu.convert_ldm_vae_checkpoint),
    ):
        state = model.state_dict()
        back = convert(checkpoint=write_ldm(state, dict(model.config)), config=dict(model.config))
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)


def test_single_file_vae_attention_is_1x1_conv(models, tmp_path, save_single_file):
    from safetensors.torch import load_file

    checkpoint = load_file(save_single_file(models["sd1"], tmp_path / "sd1.safetensors"))
    for part in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            assert checkpoint[f"first_stage_model.{part}.mid.attn_1.{name}.weight"].shape == (
                32,
                32,
                1,
                1,
            )
