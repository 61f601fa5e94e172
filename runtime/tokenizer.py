"""CLIP tokenization with the `tokenizers` library (no transformers at run time).

A package's `tokenizer/` folder holds either a `tokenizer.json` (what fast
tokenizers save) or only `vocab.json` + `merges.txt` (what SD 1.x repositories
and optimum packages ship). For the latter we assemble the byte-level BPE
pipeline CLIP uses: NFC + whitespace collapse + lowercase, CLIP's word-splitting
pattern, byte-level mapping, BPE with the `</w>` end-of-word suffix, and
`<|startoftext|> … <|endoftext|>` around each sequence; then truncate to
`model_max_length` (77) and pad with the pad token of `special_tokens_map.json`
(`<|endoftext|>` for SD1, `!` for SD2/SDXL encoder 2).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from fewstep.package import PackageError, check_file_size, read_json

logger = logging.getLogger(__name__)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# CLIP's word pattern: contractions, letter runs, single digits, other symbol runs.
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _token_text(value: object) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_pad_and_length(folder: Path) -> tuple[str, int]:
    pad, max_length = EOS, 77
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            cfg = read_json(path)
            pad = _token_text(cfg.get("pad_token")) or pad
            length = cfg.get("model_max_length")
            if isinstance(length, int) and 0 < length < 100_000:
                max_length = length
    return pad, max_length


def build_clip_bpe(
    vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS
) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to transformers' CLIPTokenizer for this vocab.

    As in transformers, the special tokens (and the pad token, "!" for SD2) are
    matched whole in the prompt text before BPE runs.
    """
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=EOS,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, pad_token])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return tok


def _read_merges(path: Path) -> list[tuple[str, str]]:
    check_file_size(path)
    merges = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PackageError(f"corrupt package file {path}: {e}") from e
    for number, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise PackageError(f"corrupt package file {path}: line {number} is not a merge pair")
        merges.append((pair[0], pair[1]))
    return merges


def _read_tokenizer(folder: Path, pad: str) -> Tokenizer:
    path = folder / "tokenizer.json"
    if path.is_file():
        check_file_size(path)
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception for every parse error
            raise PackageError(f"corrupt package file {path}: {e}") from e
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = read_json(folder / "vocab.json")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
            raise PackageError(f"corrupt package file {folder / 'vocab.json'}: ids must be ints")
        missing = [t for t in (BOS, EOS) if t not in vocab]
        if missing:
            raise PackageError(f"{folder / 'vocab.json'} lacks CLIP's tokens {missing}")
        merges = _read_merges(folder / "merges.txt")
        try:
            return build_clip_bpe(vocab, merges, pad)
        except Exception as e:  # tokenizers' BPE rejects merges of unknown tokens
            raise PackageError(f"corrupt package files {folder}/vocab.json, merges.txt: {e}") from e
    raise PackageError(
        f"missing package file: {folder}/tokenizer.json (or vocab.json + merges.txt)"
    )


class CLIPTokenizer:
    """Prompt → int64 ids [batch, max_length], truncated and padded like diffusers does."""

    def __init__(self, tokenizer: Tokenizer, pad_token: str, max_length: int = 77):
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the tokenizer vocabulary")
        self.max_length = max_length
        self.pad_token = pad_token
        self.pad_id = pad_id
        self._tok = tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()

    @classmethod
    def from_folder(cls, folder: str | Path) -> CLIPTokenizer:
        """The tokenizer of a package's (or diffusers folder's) `tokenizer/` folder; any
        unreadable file is a PackageError naming it."""
        folder = Path(folder)
        pad, max_length = _read_pad_and_length(folder)
        tok = _read_tokenizer(folder, pad)
        if tok.token_to_id(pad) is None:
            raise PackageError(f"{folder}: the pad token {pad!r} is not in the vocabulary")
        return cls(tok, pad, max_length)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """Token ids [len(prompts), max_length]; over-long prompts are truncated with a warning."""
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        for row, enc in enumerate(self._tok.encode_batch(prompts)):
            tokens = enc.ids
            if len(tokens) > self.max_length:
                dropped = self._tok.decode(tokens[self.max_length - 1 : -1]).replace("</w>", " ")
                logger.warning(
                    "The following part of your input was truncated because CLIP can only "
                    "handle sequences up to %d tokens: %s",
                    self.max_length,
                    dropped,
                )
                tokens = tokens[: self.max_length - 1] + tokens[-1:]  # keep the closing EOS
            ids[row, : len(tokens)] = tokens
        return ids
